"""What processes write on stderr: one log format per run (JSON lines when stderr is not a
terminal, console text on one), Celery's and the stdlib's records included; and
`worker policies check`'s compiler format, one `FILE:LINE: message` line per problem."""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import select
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import structlog

from tests.helpers import wait_until, write_images
from tests.processes import REPO, cli, python, run_python
from worker.log import configure_logging, get_logger

pytestmark = pytest.mark.integration

#: A GitHub Actions problem matcher's pattern for compiler output.
PROBLEM = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<msg>.+)$")


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line of ``text`` as a JSON log object; fails on any other line."""
    events = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line on stderr: {line!r}\n---\n{text}")
        assert isinstance(event, dict), line
        assert {"event", "level", "timestamp"} <= set(event), line
        events.append(event)
    return events


class Serve:
    """`worker serve` with stdout and stderr in separate files (or stderr on a pty)."""

    def __init__(self, env: dict[str, str], directory: Path, tty: bool = False) -> None:
        self.stdout_path = directory / "serve.stdout"
        self.stderr_path = directory / "serve.stderr"
        self._stdout: IO[bytes] = self.stdout_path.open("wb")
        self._stderr: IO[bytes] | None = None
        self._master: int | None = None
        self._tty_output = b""
        self._tty = tty
        if tty:
            self._master, slave = pty.openpty()
            stderr: Any = slave
        else:
            self._stderr = self.stderr_path.open("wb")
            stderr = self._stderr
        self.proc = subprocess.Popen(
            python("-m", "worker", "serve"),
            env=env,
            stdout=self._stdout,
            stderr=stderr,
            start_new_session=True,
            cwd=REPO,
        )
        if tty:
            os.close(slave)

    def stderr(self) -> str:
        if not self._tty:
            return self.stderr_path.read_text(errors="replace")
        while self._master is not None and select.select([self._master], [], [], 0)[0]:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            self._tty_output += chunk
        return self._tty_output.decode(errors="replace").replace("\r\n", "\n")

    def wait_for(self, text: str, timeout: float = 120) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.stderr()}")
            return text in self.stderr()

        wait_until(seen, timeout, text)

    def stop(self) -> int:
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self.stderr()
            self._stdout.close()
            if self._stderr is not None:
                self._stderr.close()
            if self._master is not None:
                os.close(self._master)
                self._master = None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def serving(queue_env: dict[str, str], tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for serve in started:
        serve.kill()


def test_serve_writes_only_json_lines_when_stderr_is_not_a_tty(
    tmp_path: Path, queue_env: dict[str, str], serving: list[Serve]
) -> None:
    env = {**queue_env, "WORKER_LOG_FORMAT": "auto", "WORKER_BATCH__MAX_WAIT_MS": "300"}
    serve = Serve(env, tmp_path)
    serving.append(serve)
    serve.wait_for('"worker.consuming"')
    images = write_images(tmp_path / "imgs", 2)
    corrupt = tmp_path / "imgs" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    out = tmp_path / "out"
    jobs = [
        {
            "job_id": f"log-{i}",
            "image": {"uri": str(p)},
            "sinks": [{"type": "local", "path": str(out)}],
        }
        for i, p in enumerate([*images, corrupt])
    ]
    code = (
        "from worker.client import submit\n"
        + "".join(f"submit({job!r})\n" for job in jobs)
        + "from worker.queue.app import create_app\n"
        "from worker.settings import load_settings\n"
        "app = create_app(load_settings())\n"
        "app.send_task('moderation.score', args=[1, 2], queue='moderation')\n"
    )
    assert run_python(code, env).returncode == 0
    wait_until(lambda: len(list(out.glob("*.json"))) == 3, 60, "three results")
    serve.wait_for('"message.refused"', 30)
    assert serve.stop() == 0

    events = json_lines(serve.stderr())
    names = {e["event"] for e in events}
    assert {"model.loaded", "worker.consuming", "job.scored", "message.refused"} <= names
    assert "worker.stopped" in names
    if os.geteuid() == 0:  # Celery warns about running as root: a stdlib warning, as JSON
        assert any(e.get("logger") == "py.warnings" for e in events)
    stdout = serve.stdout_path.read_text()
    assert "[tasks]" not in stdout  # no Celery banner
    assert "[config]" not in stdout


def test_serve_writes_console_lines_on_a_tty(
    tmp_path: Path, queue_env: dict[str, str], serving: list[Serve]
) -> None:
    env = {**queue_env, "WORKER_LOG_FORMAT": "auto", "COLUMNS": "200"}
    serve = Serve(env, tmp_path, tty=True)
    serving.append(serve)
    serve.wait_for("worker.consuming")
    assert serve.stop() == 0
    lines = [line for line in serve.stderr().splitlines() if line.strip()]
    assert any("model.loaded" in line for line in lines)
    assert not [line for line in lines if line.lstrip().startswith("{")]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_stdlib_records_come_out_in_the_same_format(
    fmt: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("info", fmt)  # type: ignore[arg-type]
    get_logger("test").info("job.scored", job_id="j1")
    logging.getLogger("celery.worker.consumer").warning("Connection to broker lost: %s", "x")
    logging.getLogger("botocore.credentials").error("no credentials")
    logging.getLogger("kombu").info("third-party info is kept quiet")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library warning", UserWarning, stacklevel=1)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("celery.app.trace").exception("task failed")
    err = capsys.readouterr().err
    assert "third-party info" not in err
    if fmt == "console":
        assert not [x for x in err.splitlines() if x.startswith("{")]
        assert "Connection to broker lost: x" in err
        assert "ValueError: boom" in err
        return
    events = {e["event"].strip(): e for e in json_lines(err)}
    assert events["job.scored"]["job_id"] == "j1"
    assert events["Connection to broker lost: x"]["logger"] == "celery.worker.consumer"
    assert events["Connection to broker lost: x"]["level"] == "warning"
    assert events["no credentials"]["logger"] == "botocore.credentials"
    assert "ValueError: boom" in events["task failed"]["exception"]
    [warned] = [e for e in events.values() if e.get("logger") == "py.warnings"]
    assert "a library warning" in warned["event"]


BAD_POLICY = """\
name: long
kind: moderation
background: [an ordinary photo]
categories:
  - id: a-very-long-category-identifier-that-does-not-fit-in-forty-columns
    prompts: [a thing]
    threshold: 1.5
  - id: "odd[red]id"
    prompts: [another thing]
"""


def check_problems(lines: list[str], path: Path) -> list[re.Match[str]]:
    matches = []
    for line in lines:
        found = PROBLEM.match(line)
        assert found is not None, f"not FILE:LINE: message: {line!r}"
        assert found["file"] == str(path)
        assert 1 <= int(found["line"]) <= len(BAD_POLICY.splitlines())
        matches.append(found)
    return matches


def test_policies_check_prints_one_compiler_line_per_problem(
    tmp_path: Path, worker_env: dict[str, str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_POLICY)
    proc = cli({**os.environ, **worker_env, "COLUMNS": "40"}, "policies", "check", str(bad))
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    messages = [m["msg"] for m in check_problems(lines, bad)]
    [threshold] = [line for line in lines if "threshold must be between 0 and 1" in line]
    assert threshold.endswith(", got 1.5")
    assert len(threshold) > 80  # much longer than COLUMNS
    assert any("odd[red]id" in m for m in messages)  # no markup eaten
    assert len(lines) == len(messages) >= 2


def test_policies_check_on_a_narrow_terminal(tmp_path: Path, worker_env: dict[str, str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_POLICY)
    master, slave = pty.openpty()
    env = {**os.environ, **worker_env, "COLUMNS": "40", "TERM": "xterm-256color"}
    proc = subprocess.Popen(
        python("-m", "worker", "policies", "check", str(bad)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=slave,
        cwd=REPO,
    )
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(30) == 1
    text = output.decode()
    assert "\x1b[" not in text  # no colour or cursor codes
    lines = [line for line in text.replace("\r\n", "\n").splitlines() if line]
    assert len(check_problems(lines, bad)) == len(lines) >= 2
