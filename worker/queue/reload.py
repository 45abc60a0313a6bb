"""Hot policy reload: watch the policy directory, recompile on change, swap atomically.

The files policies list (a blocklist's hash files, exemplar and known images) are watched
too, by size, mtime and inode: replacing a hash file reloads like editing a policy.

The watcher hashes the directory's policy files every ``interval_s`` (content, not mtimes,
so ConfigMap symlink swaps and editors that preserve mtimes are seen). A valid change is
compiled (only new prompts reach the text tower) and swapped into the engine; batches in
flight finish with the set they started with. An invalid change is logged as
``policy.rejected`` with ``file:line:`` messages and the last good set stays in service.

A hostile file cannot take the worker down: hashing reads only regular files, at most
:data:`~worker.policy.MAX_POLICY_BYTES` + 1 bytes each and never blocking (a FIFO, a
device or a symlink to ``/dev/zero`` is hashed by its kind, a larger file by its size and
mtime); loading refuses it quickly (see the limits in :mod:`worker.policy`); any failure
of a reload, a PolicyError or not (MemoryError, RecursionError, OSError, a compile error),
keeps the last good set and is reported as ``policy.rejected`` with at most
:data:`MAX_REJECTED` lines of at most :data:`MAX_REJECTED_CHARS` characters, which
``/readyz`` shows as ``rejected_edit``; and the watcher thread survives anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from worker.engine import Engine
from worker.errors import PolicyError
from worker.log import get_logger
from worker.materials import listed_files_signature
from worker.policy.loading import (
    MAX_POLICY_BYTES,
    LoadedPolicy,
    load_policies,
    policy_files,
    read_capped,
)
from worker.policy.policyset import PolicySet

log = get_logger(__name__)

#: Most ``file:line: message`` lines kept in ``PolicyWatcher.rejected`` (and logged); the
#: rest are summed up in one more line, "DIR:0: … and K more problems". One file's own
#: bounded list (MAX_PROBLEMS_PER_FILE + its "… and K more") always fits.
MAX_REJECTED = 25
#: Longest line kept in ``PolicyWatcher.rejected`` (path included), in characters.
MAX_REJECTED_CHARS = 500


def _file_fingerprint(path: Path) -> bytes:
    """What a file contributes to the directory signature, without blocking or reading
    more than MAX_POLICY_BYTES + 1 bytes."""
    try:
        status, data = read_capped(path, MAX_POLICY_BYTES)
    except OSError as exc:
        return f"<unreadable {exc.errno}>".encode()
    if not stat.S_ISREG(status.st_mode):
        return f"<not a regular file {stat.S_IFMT(status.st_mode):o}>".encode()
    if data is None:  # over the limit: refused on load anyway; stat says when it changes
        return f"<large {status.st_size} {status.st_mtime_ns} {status.st_ino}>".encode()
    return hashlib.sha256(data).digest()


def directory_signature(directory: Path) -> str:
    """sha256 over the names and contents of the directory's policy files (see
    :func:`_file_fingerprint` for FIFOs, devices and files over the size limit)."""
    digest = hashlib.sha256()
    try:
        files = policy_files(directory)
    except OSError:
        return "missing"
    for path in files:
        digest.update(os.fsencode(path.name) + b"\0")
        digest.update(_file_fingerprint(path))
        digest.update(b"\0")
    return digest.hexdigest()


def _clip(line: str) -> str:
    line = " ".join(line.splitlines())
    return line if len(line) <= MAX_REJECTED_CHARS else line[: MAX_REJECTED_CHARS - 1] + "…"


def bounded_lines(lines: list[str], directory: Path) -> list[str]:
    """At most MAX_REJECTED lines of at most MAX_REJECTED_CHARS characters each, then one
    line saying how many more there were."""
    shown = [_clip(line) for line in lines[:MAX_REJECTED]]
    rest = len(lines) - MAX_REJECTED
    if rest > 0:
        shown.append(_clip(f"{directory}:0: … and {rest} more problem{'s' * (rest > 1)}"))
    return shown


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
        #: ``file:line: message`` of the last rejected edit, until a valid one replaces it
        #: (bounded: MAX_REJECTED lines of MAX_REJECTED_CHARS characters at most).
        self.rejected: list[str] = []
        super().__init__(name="policy-watcher", daemon=True)
        self.engine = engine
        self.directory = directory
        self.compile_fn = compile_fn
        self.interval_s = interval_s
        self.signature = self._signature()
        self._stop_event = threading.Event()

    def _signature(self) -> str:
        """The policy files' contents, and the size and mtime of every file the policies
        in service list (hash files, exemplar and known images)."""
        listed = listed_files_signature(self.engine.policies.sources.values())
        return f"{directory_signature(self.directory)}:{listed}"

    def _reject(self, problems: list[str], error: BaseException | None = None) -> None:
        self.rejected = bounded_lines(problems, self.directory)
        fields: dict[str, object] = {"problems": self.rejected}
        if error is not None:
            fields["error"] = type(error).__name__
            # A traceback helps with a compile bug; not for these two (huge, or no memory).
            if not isinstance(error, MemoryError | RecursionError):
                fields["exc_info"] = error
        log.error("policy.rejected", kept=self.engine.policies.versions(), **fields)

    def check(self) -> bool:
        """Reload if the directory changed; True when a new set was swapped in.

        Any failure keeps the set in service and is reported in ``rejected``; the same
        content is not retried until the directory changes again.
        """
        signature = self._signature()
        if signature == self.signature:
            return False
        self.signature = signature
        try:
            loaded = load_policies([self.directory])
            policies = self.compile_fn(loaded)
        except PolicyError as exc:
            self._reject([str(p) for p in exc.problems])
            return False
        except Exception as exc:  # MemoryError, RecursionError, OSError, compile errors
            self._reject([f"{self.directory}:0: reload failed: {type(exc).__name__}: {exc}"], exc)
            return False
        self.engine.policies = policies
        self.signature = self._signature()  # with the files the new set lists
        self.rejected = []
        if self.on_reload is not None:
            self.on_reload(policies)
        log.info("policy.reloaded", versions=policies.versions())
        return True

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.check()
            except BaseException:  # never let the watcher die: the worker keeps serving
                with contextlib.suppress(BaseException):  # e.g. MemoryError while logging
                    log.exception("policy.reload_failed")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        self.join(timeout)
