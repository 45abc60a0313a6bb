"""worker/gpu_claim.py in one process: every claim opens its own lock file, and flock
locks on separate open files exclude each other even within a process, so one process
stands in for several replicas here (tests/integration/test_docker.py uses real ones)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from worker import gpu_claim
from worker.errors import ConfigurationError
from worker.gpu_claim import CLAIMS_DIR, GpuClaim, claim_gpu, resolve_auto_device
from worker.settings import Settings


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[Path, GpuClaim]]:
    """This process's claims start empty and are given back after the test."""
    claims: dict[Path, GpuClaim] = {}
    monkeypatch.setattr(gpu_claim, "_held", claims)
    yield claims
    for claim in claims.values():
        claim.release()


@pytest.fixture
def taken() -> Iterator[list[GpuClaim]]:
    claims: list[GpuClaim] = []
    yield claims
    for claim in claims:
        claim.release()


def test_each_claim_gets_its_own_gpu_then_they_share_the_least_loaded(
    tmp_path: Path, taken: list[GpuClaim]
) -> None:
    taken.extend(claim_gpu(tmp_path, 3) for _ in range(3))
    assert [(c.index, c.holders, c.exclusive) for c in taken] == [
        (0, 1, True),
        (1, 1, True),
        (2, 1, True),
    ]
    assert [c.path.name for c in taken] == ["0.lock", "1.lock", "2.lock"]
    taken.extend(claim_gpu(tmp_path, 3) for _ in range(4))
    assert [(c.index, c.holders) for c in taken[3:]] == [(0, 2), (1, 2), (2, 2), (0, 3)]
    assert taken[-1].path.name == "0.2.lock"
    assert not taken[-1].exclusive


def test_a_released_gpu_is_the_next_one_claimed(tmp_path: Path, taken: list[GpuClaim]) -> None:
    taken.extend(claim_gpu(tmp_path, 4) for _ in range(4))
    taken[2].release()
    taken[2].release()  # twice is harmless
    again = claim_gpu(tmp_path, 4)
    taken.append(again)
    assert (again.index, again.holders) == (2, 1)


def test_a_gap_left_by_a_sharer_is_filled_on_the_least_loaded_gpu(
    tmp_path: Path, taken: list[GpuClaim]
) -> None:
    taken.extend(claim_gpu(tmp_path, 2) for _ in range(4))  # two on each
    taken[0].release()  # GPU 0 keeps one holder, in its second slot
    again = claim_gpu(tmp_path, 2)
    taken.append(again)
    assert (again.index, again.holders, again.path.name) == (0, 2, "0.lock")


def test_locks_of_other_device_counts_are_ignored(tmp_path: Path, taken: list[GpuClaim]) -> None:
    taken.extend(claim_gpu(tmp_path, 8) for _ in range(8))  # GPUs 4..7 are not visible now
    taken.extend(claim_gpu(tmp_path, 4) for _ in range(2))
    assert [(c.index, c.holders) for c in taken[8:]] == [(0, 2), (1, 2)]


def test_a_lock_directory_that_cannot_be_made_names_the_settings(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigurationError, match=r"WORKER_CACHE_DIR.*WORKER_DEVICE=cuda:N"):
        claim_gpu(tmp_path / "file" / CLAIMS_DIR, 2)
    with pytest.raises(ValueError, match="at least 1"):
        claim_gpu(tmp_path, 0)


def test_only_auto_with_several_gpus_claims(tmp_path: Path, held: dict[Path, GpuClaim]) -> None:
    lock_dir = tmp_path / CLAIMS_DIR
    asked: list[str] = []

    def count(devices: int) -> Callable[[], int]:
        def counted() -> int:
            asked.append("counted")
            return devices

        return counted

    for device in ("cpu", "cuda", "cuda:1", "mps"):
        assert resolve_auto_device(device, lock_dir, count(4)) == device
    assert not asked  # an explicit device is never counted
    assert resolve_auto_device("auto", lock_dir, count(0)) == "auto"
    assert resolve_auto_device("auto", lock_dir, count(1)) == "auto"
    assert not lock_dir.exists()  # CPU and single-GPU hosts: nothing written, no change
    with capture_logs() as logs:
        assert resolve_auto_device("auto", lock_dir, count(2)) == "cuda:0"
        assert resolve_auto_device("auto", lock_dir, count(2)) == "cuda:0"  # kept, not retaken
    assert [log["event"] for log in logs] == ["gpu.claimed"]
    assert logs[0]["index"] == 0
    assert logs[0]["devices"] == 2
    assert list(held) == [lock_dir.resolve()]


def test_a_process_beyond_the_gpus_warns_that_it_shares(
    tmp_path: Path, held: dict[Path, GpuClaim], taken: list[GpuClaim]
) -> None:
    taken.extend(claim_gpu(tmp_path, 2) for _ in range(2))  # two other replicas
    with capture_logs() as logs:
        assert resolve_auto_device("auto", tmp_path, lambda: 2) == "cuda:0"
    assert [(log["event"], log["log_level"]) for log in logs] == [("gpu.shared", "warning")]
    assert logs[0]["holders"] == 2


def test_the_model_loads_on_the_claimed_gpu(
    monkeypatch: pytest.MonkeyPatch,
    make_settings: Callable[..., Settings],
    held: dict[Path, GpuClaim],
    taken: list[GpuClaim],
) -> None:
    """The hook in worker/runtime.py: load_configured_model asks for the claimed GPU."""
    from worker import runtime

    loads: list[dict[str, Any]] = []
    model = object()

    def load_model(*_: Any, **kwargs: Any) -> object:
        loads.append(kwargs)
        return model

    monkeypatch.setattr(runtime, "load_model", load_model)
    monkeypatch.setattr(gpu_claim, "cuda_device_count", lambda: 2)
    settings = make_settings(device="auto")
    taken.append(claim_gpu(settings.cache_dir / CLAIMS_DIR, 2))  # another replica has GPU 0
    assert runtime.load_configured_model(settings) is model
    assert loads[-1]["device"] == "cuda:1"
    runtime.load_configured_model(make_settings(device="cpu", cache_dir=settings.cache_dir))
    assert loads[-1]["device"] == "cpu"


def test_a_prefork_parent_claims_before_it_forks(
    monkeypatch: pytest.MonkeyPatch,
    make_settings: Callable[..., Settings],
    held: dict[Path, GpuClaim],
) -> None:
    """The hook in worker/queue/serving.py: the children get the parent's GPU as their
    device (they claim nothing); solo and threads pools claim when they load the model."""
    from worker.queue import serving

    apps: list[Settings] = []

    class StopError(Exception):
        pass

    def create_app(settings: Settings, **_: Any) -> None:
        apps.append(settings)
        raise StopError

    monkeypatch.setattr(serving, "create_app", create_app)
    monkeypatch.setattr(serving, "fork_safe_cuda_device_count", lambda: 3)
    settings = make_settings(device="auto")
    for pool in ("prefork", "solo"):
        with pytest.raises(StopError):
            serving.run_worker(settings, pool=pool, concurrency=2, name=None)
    assert [s.device for s in apps] == ["cuda:0", "auto"]
    assert [claim.index for claim in held.values()] == [0]
