"""A hostile file dropped into a running worker's policy directory never takes it down.

A real PolicyWatcher, in-process, around an engine built from settings with the tiny model:
each hostile file is refused, the last good policies keep serving (and scoring), the
`policy.rejected` event and `watcher.rejected` (what /readyz shows) say why in a bounded
message naming the file, and a good edit afterwards is applied. Failures that are not
PolicyErrors (MemoryError, RecursionError, OSError) keep the old set the same way, and the
watcher thread survives them.
"""

from __future__ import annotations

import os
import random
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.helpers import SHAPES_POLICY, write_images, write_policy
from worker.documents import ImageRef, ModerationResult
from worker.engine import Engine, WorkItem
from worker.model import LoadedModel
from worker.policy import MAX_POLICY_BYTES, LoadedPolicy
from worker.policy.policyset import PolicySet
from worker.queue.reload import MAX_REJECTED, MAX_REJECTED_CHARS, PolicyWatcher, directory_signature
from worker.queue.service import Service
from worker.runtime import build_engine, compile_configured
from worker.settings import Settings

pytestmark = [pytest.mark.fault, pytest.mark.integration]

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
needs_dev_zero = pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")

#: The good edit: the shapes policy with one more category.
EDITED = SHAPES_POLICY.replace(
    "  - id: blue\n", "  - id: green\n    prompts: [a green shape]\n  - id: blue\n"
)


def laughs() -> str:
    text = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    return text


def sparse(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


def fifo(path: Path) -> None:
    os.mkfifo(path)


def dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def text(body: str | bytes) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.write_bytes(body.encode() if isinstance(body, str) else body)

    return make


#: (file name, how to make it, what the rejection says)
HOSTILE: list[Any] = [
    pytest.param("bomb.yaml", text(laughs()), "alias *", id="billion-laughs"),
    pytest.param("rec.yaml", text("name: r\nkind: tags\ntags: &t [a, *t]\n"), "recursive"),
    pytest.param("deep.yaml", text("[" * 10_000 + "]" * 10_000), "nested more than 32"),
    pytest.param("deepmap.yaml", text("{a: " * 10_000), "nested more than 32"),
    pytest.param("huge.yaml", lambda p: sparse(p, 50 << 20), "limited to 1 MiB"),
    pytest.param("long.yaml", text("name: l\ndescription: " + "x" * 200_000), "characters"),
    pytest.param("docs.yaml", text("---\n" * 100_000), "YAML documents"),
    pytest.param("fifo.yaml", fifo, "a FIFO", marks=needs_fifo),
    pytest.param("zero.yaml", dev_zero, "a character device", marks=needs_dev_zero),
    pytest.param("junk.yaml", text(random.Random(1).randbytes(1 << 16)), "not UTF-8"),
    pytest.param("latin1.yaml", text("name: caf\xe9\n".encode("latin-1")), "not UTF-8"),
    pytest.param("nul.yaml", text(b"\0" * 4096), "control character U+0000"),
    pytest.param(
        "many.yaml",
        text(
            "name: m\nkind: moderation\nbackground: [x]\ncategories:\n"
            + "".join(f"  - id: c{i}\n    prompts: []\n" for i in range(1000))
        ),
        "has no prompts",
    ),
]


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def engine(settings: Settings, tiny_model: LoadedModel) -> Iterator[Engine]:
    eng = build_engine(settings, model=tiny_model)
    yield eng
    eng.close()


def make_watcher(
    engine: Engine, settings: Settings, compile_fn: Callable[..., PolicySet] | None = None
) -> PolicyWatcher:
    """The watcher `worker serve` builds (worker/queue/service.py), not started."""

    def recompile(loaded: list[LoadedPolicy]) -> PolicySet:
        return compile_configured(settings, engine.model, loaded)

    return PolicyWatcher(engine, settings.policy_dir, compile_fn or recompile, interval_s=0.05)


@pytest.fixture
def watcher(engine: Engine, settings: Settings) -> PolicyWatcher:
    return make_watcher(engine, settings)


@pytest.fixture
def items(tmp_path: Path) -> list[WorkItem]:
    paths = write_images(tmp_path / "imgs", 3)
    return [WorkItem(job_id=f"job-{i}", image=ImageRef(uri=str(p))) for i, p in enumerate(paths)]


def assert_scores(engine: Engine, items: list[WorkItem], categories: set[str]) -> None:
    for result in engine.process(items):
        assert result.status == "ok", result
        assert set(result.policies) == {"shapes", "shape-tags"}
        section = result.policies["shapes"]
        assert isinstance(section, ModerationResult)
        assert set(section.scores) == categories


def assert_bounded(rejected: list[str]) -> None:
    assert 1 <= len(rejected) <= MAX_REJECTED + 1
    assert all(len(line) <= MAX_REJECTED_CHARS and "\n" not in line for line in rejected)


def rejections(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == "policy.rejected"]


def test_hostile_files_leave_the_last_good_policies_serving(
    engine: Engine, watcher: PolicyWatcher, settings: Settings, items: list[WorkItem]
) -> None:
    directory = settings.policy_dir
    good = engine.policies.versions()
    for param in HOSTILE:
        name, make, fragment = param.values
        if any(m.name == "skipif" and m.args[0] for m in param.marks):
            continue
        path = directory / name
        make(path)
        started = time.perf_counter()
        with capture_logs() as logs:
            assert watcher.check() is False, name
        assert time.perf_counter() - started < 5.0, name
        assert engine.policies.versions() == good, name
        rejected = watcher.rejected
        assert_bounded(rejected)
        assert all(line.startswith(f"{path}:") for line in rejected), rejected
        assert fragment in rejected[0], rejected
        [event] = rejections(logs)
        assert event["log_level"] == "error"
        assert event["problems"] == rejected
        assert event["kept"] == good
        assert_scores(engine, items, {"red", "circle", "blue"})
        path.unlink()
        with capture_logs() as logs:
            assert watcher.check() is True, name  # back to the good files
        assert watcher.rejected == []
        assert engine.policies.versions() == good
        assert "policy.reloaded" in [e["event"] for e in logs]
        assert not rejections(logs)
    # a good edit is still applied
    write_policy(directory, EDITED)
    assert watcher.check() is True
    assert engine.policies.versions()["shapes"] != good["shapes"]
    assert engine.policies.versions()["shape-tags"] == good["shape-tags"]
    assert_scores(engine, items, {"red", "green", "circle", "blue"})


@pytest.mark.parametrize(("name", "make", "fragment"), HOSTILE)
def test_each_hostile_file_is_refused_quickly_in_bounded_memory(
    engine: Engine,
    watcher: PolicyWatcher,
    settings: Settings,
    name: str,
    make: Callable[[Path], None],
    fragment: str,
) -> None:
    path = settings.policy_dir / name
    make(path)
    good = engine.policies.versions()
    tracemalloc.start()
    try:
        cpu = time.process_time()
        assert watcher.check() is False
        cpu = time.process_time() - cpu
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20, f"peak {peak / 1e6:.1f} MB"
    assert cpu < 10.0  # traced: several times slower than the < 1 s it takes untraced
    assert engine.policies.versions() == good
    assert_bounded(watcher.rejected)
    assert fragment in watcher.rejected[0]


def test_a_good_file_replaced_by_junk_keeps_its_old_version(
    engine: Engine, watcher: PolicyWatcher, settings: Settings, items: list[WorkItem]
) -> None:
    good = engine.policies.versions()
    path = settings.policy_dir / "shapes.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + random.Random(2).randbytes(4096))
    assert watcher.check() is False
    assert watcher.rejected[0].startswith(f"{path}:1: not UTF-8 text")
    assert engine.policies.versions() == good
    assert_scores(engine, items, {"red", "circle", "blue"})
    assert watcher.check() is False  # the same content is not reloaded again
    write_policy(settings.policy_dir, EDITED)
    assert watcher.check() is True
    assert_scores(engine, items, {"red", "green", "circle", "blue"})


def test_many_bad_files_are_capped_in_rejected(
    engine: Engine, watcher: PolicyWatcher, settings: Settings
) -> None:
    for i in range(60):
        write_policy(settings.policy_dir, laughs(), f"bomb{i:02d}.yaml")
    with capture_logs() as logs:
        assert watcher.check() is False
    assert_bounded(watcher.rejected)
    assert len(watcher.rejected) == MAX_REJECTED + 1
    rest = 60 - MAX_REJECTED
    assert watcher.rejected[-1] == f"{settings.policy_dir}:0: … and {rest} more problems"
    [event] = rejections(logs)
    assert event["problems"] == watcher.rejected


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RecursionError("maximum recursion depth exceeded"),
        OSError(24, "Too many open files"),
        RuntimeError("x" * 100_000),
    ],
    ids=lambda e: type(e).__name__,
)
def test_any_failure_keeps_the_old_set_and_is_reported(
    engine: Engine, settings: Settings, items: list[WorkItem], error: BaseException
) -> None:
    def failing(loaded: list[LoadedPolicy]) -> PolicySet:
        raise error

    watcher = make_watcher(engine, settings, failing)
    good = engine.policies.versions()
    write_policy(settings.policy_dir, EDITED)
    with capture_logs() as logs:
        assert watcher.check() is False
    assert engine.policies.versions() == good
    assert_bounded(watcher.rejected)
    [line] = watcher.rejected
    assert line.startswith(f"{settings.policy_dir}:0: reload failed: {type(error).__name__}")
    [event] = rejections(logs)
    assert event["problems"] == watcher.rejected
    assert event["error"] == type(error).__name__
    assert event["kept"] == good
    assert_scores(engine, items, {"red", "circle", "blue"})


def test_loader_failures_other_than_policy_errors_are_caught(
    engine: Engine, watcher: PolicyWatcher, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exploding(paths: list[Path]) -> list[LoadedPolicy]:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("worker.queue.reload.load_policies", exploding)
    good = engine.policies.versions()
    write_policy(settings.policy_dir, EDITED)
    assert watcher.check() is False
    assert engine.policies.versions() == good
    assert "RecursionError" in watcher.rejected[0]


def test_the_watcher_thread_survives_everything(
    engine: Engine, settings: Settings, items: list[WorkItem]
) -> None:
    errors: list[BaseException] = [MemoryError(), OSError(5, "I/O error"), KeyError("boom")]

    def flaky(loaded: list[LoadedPolicy]) -> PolicySet:
        if errors:
            raise errors.pop(0)
        return compile_configured(settings, engine.model, loaded)

    watcher = make_watcher(engine, settings, flaky)
    good = engine.policies.versions()
    bad: list[tuple[str, Callable[[Path], None]]] = [
        ("bomb.yaml", text(laughs())),
        ("junk.yaml", text(b"\xff\xfe")),
        ("huge.yaml", lambda p: sparse(p, 50 << 20)),
    ]
    if hasattr(os, "mkfifo"):
        bad.append(("fifo.yaml", fifo))

    def rejected(fragment: str) -> Callable[[], bool]:
        return lambda: any(fragment in line for line in watcher.rejected)

    watcher.start()
    try:
        for step, expected in enumerate(["MemoryError", "OSError", "KeyError"]):
            write_policy(settings.policy_dir, EDITED + f"# edit {step}\n")
            wait_for(rejected(expected))
            assert watcher.is_alive()
            assert engine.policies.versions() == good
        for name, make in bad:  # each one dropped in while the previous ones are still there
            make(settings.policy_dir / name)
            wait_for(rejected(name))
            assert watcher.is_alive()
            assert engine.policies.versions() == good
            assert_scores(engine, items, {"red", "circle", "blue"})
        for name, _ in bad:
            (settings.policy_dir / name).unlink()
        wait_for(lambda: not watcher.rejected)
        assert engine.policies.versions()["shapes"] != good["shapes"]
        assert_scores(engine, items, {"red", "green", "circle", "blue"})
    finally:
        watcher.stop()
    assert not watcher.is_alive()


def wait_for(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_readyz_shows_the_bounded_rejection(
    engine: Engine, watcher: PolicyWatcher, settings: Settings
) -> None:
    path = settings.policy_dir / "bomb.yaml"
    path.write_text(laughs())
    watcher.check()
    service = SimpleNamespace(
        jobs=SimpleNamespace(redis=SimpleNamespace(ping=lambda: True)),
        engine=engine,
        watcher=watcher,
    )
    # A stand-in with only what readiness() reads (a real Service needs Redis and threads);
    # not a Service to mypy, so the fields it has are checked by running it.
    ready, checks = Service.readiness(service)  # type: ignore[arg-type]
    assert ready  # still serving the last good policies
    assert checks["policies"]["valid"] is False
    assert checks["policies"]["versions"] == {
        k: v[:16] for k, v in engine.policies.versions().items()
    }
    [line] = checks["policies"]["rejected_edit"]
    assert line.startswith(f"{path}:5: the alias *d")
    assert len(line) <= MAX_REJECTED_CHARS


# --------------------------------------------------------------------------- signature


@needs_fifo
def test_signature_never_blocks_or_reads_big_files(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    write_policy(directory)
    os.mkfifo(directory / "fifo.yaml")
    if Path("/dev/zero").exists():
        (directory / "zero.yaml").symlink_to("/dev/zero")
    sparse(directory / "huge.yaml", 50 << 20)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        first = directory_signature(directory)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0
    assert peak < 4 * MAX_POLICY_BYTES
    assert directory_signature(directory) == first


def test_signature_follows_content_and_big_files_by_stat(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    path = write_policy(directory)
    first = directory_signature(directory)
    stamp = path.stat()
    path.write_text(EDITED)  # the content changes, the mtime is put back
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    second = directory_signature(directory)
    assert second != first
    big = directory / "big.yaml"
    sparse(big, 2 * MAX_POLICY_BYTES)
    third = directory_signature(directory)
    assert third != second
    sparse(big, 3 * MAX_POLICY_BYTES)
    assert directory_signature(directory) != third


def test_signature_of_odd_names_and_missing_directories(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    write_policy(directory)
    odd = os.fsdecode(b"\xff\xfe-odd.yaml")
    try:
        (directory / odd).write_text("name: x\n")
    except (OSError, UnicodeEncodeError):  # a filesystem that refuses such names
        pytest.skip("cannot create a non-UTF-8 file name here")
    assert len(directory_signature(directory)) == 64
    assert directory_signature(tmp_path / "nope") == "missing"
