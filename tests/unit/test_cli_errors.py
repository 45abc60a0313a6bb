"""Every mistake a user can make at the command line: exit 2, one line naming the fix,
never a traceback. Run in-process with typer's CliRunner against the real `worker` app."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from typer.testing import CliRunner

from tests.cli_runner import run_cli
from tests.helpers import write_images, write_policy
from worker.cli import app
from worker.cli.common import TRACEBACK_ENV
from worker.policy import ModerationPolicy, load_policies
from worker.redact import redact_text as redact
from worker.tuning.thresholds import float_text, update_thresholds

pytestmark = pytest.mark.fault

#: Nothing listens on port 1 of the loopback interface: connections are refused at once.
REDIS_DOWN = "redis://127.0.0.1:1/0"
SECRET = "whsec_SECRETVALUE"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No WORKER_* setting leaks in from the outside; logging is put back afterwards
    (loading settings points structlog and the root logger at CliRunner's stderr)."""
    import os

    for key in list(os.environ):
        if key.startswith("WORKER_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("WORKER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WORKER_LOG_FORMAT", "json")
    saved_structlog = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    yield
    structlog.configure(**saved_structlog)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, seconds) of `worker ARGS…`; an uncaught exception fails."""
    started = time.monotonic()
    result = run_cli(*args, env=env)
    seconds = time.monotonic() - started
    return result.returncode, result.stdout, result.stderr, seconds


def assert_one_line(code: int, stderr: str, expected_code: int = 2) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == expected_code, stderr
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# Every command, with the arguments it needs to get as far as reading its settings.
COMMANDS = {
    "classify": ["classify", "x.jpg"],
    "serve": ["serve"],
    "submit": ["submit", "x.jpg"],
    "result": ["result", "job-1"],
    "dlq list": ["dlq", "list"],
    "dlq requeue": ["dlq", "requeue", "--all"],
    "dlq purge": ["dlq", "purge", "--yes"],
    "eval": ["eval", "--data", "data.csv", "--policy", "moderation"],
    "finetune": ["finetune", "--data", "data.csv", "--out", "ft-out"],
    "policies check": ["policies", "check"],
    "policies compile": ["policies", "compile"],
    "bench": ["bench", "--no-queue"],
    "health": ["health"],
    "webhooks enable": ["webhooks", "enable", "https://example.com/hook"],
    "schemas": ["schemas", "--check"],
}
REDIS_COMMANDS = ["serve", "submit", "result", "dlq list", "dlq requeue", "dlq purge"]
REDIS_COMMANDS += ["webhooks enable"]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"WORKER_BATCH__MAX_SIZE": "abc"}, "WORKER_BATCH__MAX_SIZE"),
        ({"WORKER_DEVICE": "gpu7"}, "WORKER_DEVICE"),
        ({"WORKER_FILE_ROOTS": '["/srv/images"'}, "WORKER_FILE_ROOTS"),
        ({"WORKER_BROKER_URL": "redis://127.0.0.1:6379/0", "WORKER_MAX_ATTEMPTS": "0"}, None),
    ],
    ids=["not-an-int", "bad-device", "bad-json", "out-of-range"],
)
def test_invalid_setting(command: str, env: dict[str, str], names: str | None) -> None:
    code, stdout, stderr, _ = invoke(*COMMANDS[command], env=env)
    line = assert_one_line(code, stderr)
    assert line.startswith("error invalid settings: ")
    assert (names or "WORKER_MAX_ATTEMPTS") in line
    assert stdout == ""


@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_config_file(command: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[batch\nmax_size = 3\n")
    code, _, stderr, _ = invoke("--config", str(broken), *COMMANDS[command])
    line = assert_one_line(code, stderr)
    assert f"config file {broken} is not valid TOML" in line

    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[batch]\nmax_size = "many"\n')
    code, _, stderr, _ = invoke("--config", str(wrong), *COMMANDS[command])
    line = assert_one_line(code, stderr)
    assert "WORKER_BATCH__MAX_SIZE" in line
    assert str(wrong) in line

    code, _, stderr, _ = invoke("--config", str(tmp_path / "missing.toml"), *COMMANDS[command])
    line = assert_one_line(code, stderr)
    assert f"config file {tmp_path / 'missing.toml'} does not exist" in line


@pytest.mark.parametrize("command", REDIS_COMMANDS)
def test_redis_down_exits_2_at_once(command: str) -> None:
    code, stdout, stderr, seconds = invoke(
        *COMMANDS[command], env={"WORKER_BROKER_URL": REDIS_DOWN}
    )
    line = assert_one_line(code, stderr)
    assert line.startswith(f"error cannot reach Redis at {REDIS_DOWN}: ")
    assert line.endswith("(set WORKER_BROKER_URL)")
    assert seconds < 5
    assert stdout == ""


def test_redis_down_for_submit_with_files(tmp_path: Path) -> None:
    image = write_images(tmp_path / "imgs", 1)[0]
    code, _, stderr, seconds = invoke(
        "submit", "--wait", "30", str(image), env={"WORKER_BROKER_URL": REDIS_DOWN}
    )
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in assert_one_line(code, stderr)
    assert seconds < 5


def test_redis_password_is_not_shown() -> None:
    url = "redis://:hunter2pw@127.0.0.1:1/0"
    code, _, stderr, _ = invoke("dlq", "list", env={"WORKER_BROKER_URL": url})
    line = assert_one_line(code, stderr)
    assert "hunter2pw" not in line
    assert "redis://:REDACTED@127.0.0.1:1/0" in line


def test_not_a_redis_url() -> None:
    code, _, stderr, _ = invoke("result", "job-1", env={"WORKER_BROKER_URL": "http://x/"})
    assert "WORKER_BROKER_URL=http://x/ is not a Redis URL" in assert_one_line(code, stderr)


def test_bench_redis_url_down() -> None:
    code, _, stderr, _ = invoke("bench", "--redis-url", REDIS_DOWN)
    line = assert_one_line(code, stderr)
    assert f"cannot reach Redis at {REDIS_DOWN}" in line
    assert "(set --redis-url)" in line


@pytest.mark.parametrize("command", ["classify", "submit"])
def test_glob_that_matches_nothing(command: str, tmp_path: Path) -> None:
    pattern = str(tmp_path / "nothing" / "*.jpg")
    code, stdout, stderr, _ = invoke(command, pattern)
    assert assert_one_line(code, stderr) == f"error no files match {pattern!r} (check the pattern)"
    assert stdout == ""


def test_classify_missing_file_and_empty_directory(tmp_path: Path) -> None:
    code, _, stderr, _ = invoke("classify", str(tmp_path / "missing.jpg"))
    line = assert_one_line(code, stderr)
    assert line == f"error no such file or directory: {tmp_path / 'missing.jpg'}"
    (tmp_path / "empty").mkdir()
    code, _, stderr, _ = invoke("classify", str(tmp_path / "empty"))
    assert f"no image files in {tmp_path / 'empty'}" in assert_one_line(code, stderr)


def test_classify_out_in_a_missing_directory(tmp_path: Path) -> None:
    image = write_images(tmp_path / "imgs", 1)[0]
    out = tmp_path / "nowhere" / "out.jsonl"
    code, _, stderr, _ = invoke("classify", str(image), "--out", str(out))
    assert f"directory {out.parent} does not exist" in assert_one_line(code, stderr)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["eval", "--data", "{tmp}/none.csv", "--policy", "moderation"], "--data {tmp}/none.csv"),
        (["finetune", "--data", "{tmp}/none", "--out", "{tmp}/o"], "--data {tmp}/none"),
        (["policies", "check", "{tmp}/none.yaml"], "no such policy file or directory"),
        (["policies", "compile", "{tmp}/none.yaml"], "no such policy file or directory"),
    ],
    ids=["eval", "finetune", "policies-check", "policies-compile"],
)
def test_missing_file(args: list[str], expected: str, tmp_path: Path) -> None:
    code, _, stderr, _ = invoke(*[a.format(tmp=tmp_path) for a in args])
    assert expected.format(tmp=tmp_path) in assert_one_line(code, stderr)


@pytest.mark.parametrize("command", ["classify", "submit"])
@pytest.mark.parametrize(
    "spec",
    [
        f"webhook:https://h/x,secret={SECRET},bogus=1",
        f"webhook:https://h/x,secret={SECRET},bogus",
        f"webhook:https://h/x,token={SECRET},key={SECRET}2,bogus",
        f"webhook:https://user:{SECRET}@h/x,password={SECRET},colour=red",
        f"webhook:https://h/x,{SECRET}",
        "ftp:ftp://host/",
        "nonsense",
    ],
)
def test_bad_sink_spec_never_echoes_a_secret(command: str, spec: str, tmp_path: Path) -> None:
    image = write_images(tmp_path / "imgs", 1)[0]
    code, stdout, stderr, _ = invoke(command, str(image), "--sink", spec)
    line = assert_one_line(code, stderr)
    assert "SECRETVALUE" not in stdout + stderr
    assert "sink" in line


def test_redact() -> None:
    assert redact("x,secret=whsec_abc,token=t0k,password=pw,key=k,api_key=a") == (
        "x,secret=REDACTED,token=REDACTED,password=REDACTED,key=REDACTED,api_key=REDACTED"
    )
    assert (
        redact("redis://:pw@host:6379/0 https://u:pw@h/")
        == "redis://:REDACTED@host:6379/0 https://u:REDACTED@h/"
    )
    # Placeholders in help texts stay readable.
    assert redact("TYPE:TARGET[,key=value...]") == "TYPE:TARGET[,key=value...]"
    assert redact("give the sink secret=whsec_...") == "give the sink secret=whsec_..."
    assert redact(f"'{SECRET}' is not key=value") == "'whsec_REDACTED' is not key=value"


@pytest.mark.parametrize(
    "args",
    [
        ["classify", "--batch-size", "0", "x.jpg"],
        ["--log-level", "verbose", "classify", "x.jpg"],
        ["--bogus"],
        ["nosuchcommand"],
        ["serve", "--pool", "gevent"],
        ["submit", "--wait", "-1", "x.jpg"],
        ["submit", "--job-id", "not a valid id!", "x.jpg"],
        ["submit", "--job-id", "j1", "a.jpg", "b.jpg"],
        ["eval", "--data", ".", "--policy", "moderation", "--target-precision", "2"],
        ["eval", "--data", ".", "--policy", "moderation", "--split", "holdout"],
        ["finetune", "--data", ".", "--out", "o", "--method", "sgd"],
        ["health", "--url", "not-a-url"],
        ["bench", "--untrained", "NoSuchNet", "--no-queue"],
        ["dlq", "requeue"],
    ],
)
def test_bad_option_is_one_line(args: list[str]) -> None:
    code, stdout, stderr, _ = invoke(*args)
    line = assert_one_line(code, stderr)
    assert line.startswith("error ")
    assert "Usage" not in stderr
    assert stdout == ""


def test_no_arguments_still_shows_help() -> None:
    code, stdout, stderr, _ = invoke()
    assert code == 2
    assert "Usage" in stdout + stderr


def test_health_unreachable_is_a_failed_check_not_a_traceback() -> None:
    code, _, stderr, _ = invoke("health", "--url", "http://127.0.0.1:1")
    assert "unreachable http://127.0.0.1:1" in assert_one_line(code, stderr, expected_code=1)


def _validation_error() -> Exception:
    from worker.documents import Job

    try:
        Job.model_validate({"image": {"uri": "x"}, "job_id": "bad id", "secret": SECRET})
    except Exception as exc:
        return exc
    raise AssertionError("expected a ValidationError")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: FileNotFoundError(2, "No such file or directory", "/srv/x"), "no such file"),
        (lambda: PermissionError(13, "Permission denied", "/srv/x"), "permission denied: /srv/x"),
        (lambda: IsADirectoryError(21, "Is a directory", "/srv"), "/srv is a directory"),
        (lambda: OSError(28, "No space left on device"), "no space left"),
        (lambda: __import__("redis").ConnectionError("Connection reset by peer"), "cannot reach"),
        (lambda: __import__("redis").TimeoutError("Timeout reading"), "cannot reach Redis"),
        (lambda: __import__("kombu").exceptions.OperationalError("refused"), "cannot reach"),
        (lambda: __import__("typer").BadParameter("must be even"), "must be even"),
        (_validation_error, "invalid Job: job_id: String should match pattern"),
    ],
    ids=[
        "not-found",
        "permission",
        "is-a-directory",
        "disk-full",
        "redis-connection",
        "redis-timeout",
        "kombu",
        "bad-parameter",
        "validation",
    ],
)
def test_user_caused_exceptions_are_one_line(
    make: Callable[[], Exception], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever raises them, these exception classes mean something to fix, not a bug."""

    def raises(sources: list[str]) -> list[str]:
        raise make()

    monkeypatch.setattr("worker.cli.queue.expand_sources", raises)
    code, _, stderr, _ = invoke("--log-level", "debug", "submit", "x.jpg")  # still no traceback
    line = assert_one_line(code, stderr)
    assert expected in line
    assert "SECRETVALUE" not in line


def test_internal_error_is_one_line_unless_debugging(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def boom(sources: list[str]) -> list[str]:
        raise RuntimeError("boom")

    monkeypatch.setattr("worker.cli.queue.expand_sources", boom)
    code, _, stderr, _ = invoke("submit", "x.jpg")
    line = assert_one_line(code, stderr, expected_code=1)
    assert line.startswith("internal error: RuntimeError: boom")
    assert "--log-level debug" in line

    for args, env in [(["--log-level", "debug"], {}), ([], {TRACEBACK_ENV: "1"})]:
        result = CliRunner().invoke(app, [*args, "submit", "x.jpg"], env=env)
        assert isinstance(result.exception, RuntimeError)  # raised: Python prints it


# ---------------------------------------------------------------- thresholds


POLICY = """\
name: precise
kind: moderation
background: [an ordinary photo]
categories:
  - id: almost_never
    prompts: [a gun]
    threshold: 0.5   # high bar
  - id: almost_always
    prompts: [a photo]
    threshold: 0.5
  - id: untouched
    prompts: [a cat]
    threshold: 0.25
"""


def test_written_thresholds_keep_their_precision(tmp_path: Path) -> None:
    path = write_policy(tmp_path, POLICY, "precise.yaml")
    suggested = {"almost_never": 0.99996, "almost_always": 0.00004}
    text, diff = update_thresholds(path, "precise", suggested)
    path.write_text(text)
    [loaded] = load_policies([path])
    assert isinstance(loaded.policy, ModerationPolicy)
    read = {c.id: c.threshold for c in loaded.policy.categories}
    assert read == {"almost_never": 0.99996, "almost_always": 0.00004, "untouched": 0.25}
    assert "threshold: 0.99996 # high bar" in text  # the comment survives
    assert "threshold: 4.0e-05" in text
    assert "+    threshold: 0.99996" in diff
    # Any float survives the trip, not only short ones.
    for value in (0.7361948299407959, 1e-12, 1 - 1e-12, 0.1, 1.0, 0.0):
        assert float(float_text(value)) == value
        text, _ = update_thresholds(path, "precise", {"untouched": value})
        path.write_text(text)
        [again] = load_policies([path])
        assert isinstance(again.policy, ModerationPolicy)
        assert again.policy.categories[2].threshold == value
