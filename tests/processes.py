"""The one place tests start a process running our code: `worker ARGS…` (:func:`cli`,
:class:`WorkerProcess`), a snippet of Python (:func:`run_python`) or a function in a pool
of fresh interpreters (:func:`starmap_in_processes`), all with this interpreter
(:func:`python`).

Only integration tests use it: unit tests stay in-process (`tests.cli_runner`).
Every helper takes the whole environment of the child; build it on ``os.environ`` (as the
``queue_env`` fixture does) to keep this process's variables.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

from tests.helpers import wait_until

T = TypeVar("T")

#: The checkout: the working directory of the children, so `import tests…` and
#: `import worker…` find this tree.
REPO = Path(__file__).resolve().parents[1]


def python(*args: str) -> list[str]:
    """The command line of this interpreter with ``args`` (``-m worker …``, ``-c CODE``)."""
    return [sys.executable, *args]


def cli(
    env: Mapping[str, str] | None, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """`worker ARGS…` in a subprocess with ``env`` (None: this process's environment);
    stdout and stderr captured as text."""
    return subprocess.run(
        python("-m", "worker", *args),
        env=None if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_python(
    code: str, env: Mapping[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a separate Python process (an upload service, say)."""
    return subprocess.run(
        python("-c", code),
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


def starmap_in_processes(
    function: Callable[..., T], arguments: Iterable[tuple[Any, ...]], processes: int
) -> list[T]:
    """``[function(*args) for args in arguments]``, run by a pool of ``processes`` freshly
    spawned interpreters (``function`` must be importable: defined at a module's top)."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return pool.starmap(function, arguments)


def read_events(log_path: Path, name: str | None = None) -> list[dict[str, Any]]:
    """structlog JSON lines from a worker's log (other lines are skipped)."""
    events: list[dict[str, Any]] = []
    if not log_path.exists():
        return events
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if name is None or event.get("event") == name:
            events.append(event)
    return events


class WorkerProcess:
    """`worker serve ARGS…` (or `worker COMMAND… ARGS…`) as a subprocess in its own
    session, stdout and stderr together in the file ``log_path``."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        args: list[str],
        command: tuple[str, ...] = ("serve",),
    ) -> None:
        self.log_path = log_path
        self._log: IO[str] = log_path.open("w")
        self.proc = subprocess.Popen(
            python("-m", "worker", *command, *args),
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
        )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return read_events(self.log_path, name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        """Until the log says ``worker.consuming``; fails at once if the process exits."""
        self.wait_for("worker.consuming", timeout)

    def wait_for(self, event: str, timeout: float) -> list[dict[str, Any]]:
        """The ``event`` lines of the log, once there is one; fails if the process exits
        first."""

        def found() -> list[dict[str, Any]]:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()}")
            return self.events(event)

        events: list[dict[str, Any]] = wait_until(found, timeout, event)
        return events

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self, timeout: float = 10) -> int:
        """SIGKILL (no clean-up at all), then wait for it."""
        self.signal(signal.SIGKILL)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, SIGKILL after ``timeout`` seconds; the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.proc.wait(10)
        finally:
            self._log.close()
