"""Hot policy reload: watch the policy directory, recompile on change, swap atomically.

The watcher hashes the directory's policy files every ``interval_s`` (content, not mtimes,
so ConfigMap symlink swaps and editors that preserve mtimes are seen). A valid change is
compiled (only new prompts reach the text tower) and swapped into the engine; batches in
flight finish with the set they started with. An invalid change is logged as
``policy.rejected`` with ``file:line:`` messages and the last good set stays in service.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

from worker.engine import Engine
from worker.errors import PolicyError
from worker.log import get_logger
from worker.policy import LoadedPolicy, load_policies, policy_files
from worker.policyset import PolicySet

log = get_logger(__name__)


def directory_signature(directory: Path) -> str:
    """sha256 over the names and contents of the directory's policy files."""
    digest = hashlib.sha256()
    try:
        files = policy_files(directory)
    except OSError:
        return "missing"
    for path in files:
        digest.update(path.name.encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"<unreadable>")
        digest.update(b"\0")
    return digest.hexdigest()


class PolicyWatcher(threading.Thread):
    """Reloads ``engine.policies`` from ``directory`` whenever its files change."""

    def __init__(
        self,
        engine: Engine,
        directory: Path,
        compile_fn: Callable[[list[LoadedPolicy]], PolicySet],
        interval_s: float = 1.0,
        on_reload: Callable[[PolicySet], None] | None = None,
    ) -> None:
        self.on_reload = on_reload
        #: ``file:line: message`` of the last rejected edit, until a valid one replaces it.
        self.rejected: list[str] = []
        super().__init__(name="policy-watcher", daemon=True)
        self.engine = engine
        self.directory = directory
        self.compile_fn = compile_fn
        self.interval_s = interval_s
        self.signature = directory_signature(directory)
        self._stop_event = threading.Event()

    def check(self) -> bool:
        """Reload if the directory changed; True when a new set was swapped in."""
        signature = directory_signature(self.directory)
        if signature == self.signature:
            return False
        self.signature = signature
        try:
            loaded = load_policies([self.directory])
            policies = self.compile_fn(loaded)
        except PolicyError as exc:
            self.rejected = [str(p) for p in exc.problems]
            log.error(
                "policy.rejected", problems=self.rejected, kept=self.engine.policies.versions()
            )
            return False
        self.engine.policies = policies
        self.rejected = []
        if self.on_reload is not None:
            self.on_reload(policies)
        log.info("policy.reloaded", versions=policies.versions())
        return True

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # never let the watcher die: the worker keeps serving
                log.exception("policy.reload_failed")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        self.join(timeout)
