"""One GPU per worker process on a multi-GPU host: claims taken with file locks.

``docker compose up --scale worker=4`` starts four identical containers. Docker cannot
give each its own GPU: a device request with ``count: N`` is turned into
``NVIDIA_VISIBLE_DEVICES=0,…,N-1`` for every container (moby, ``countToDevices``). So the
compose file gives every replica all GPUs, and a process with ``WORKER_DEVICE=auto`` that
sees several CUDA devices claims one here before it loads the model:

- A claim is an exclusive, non-blocking ``flock`` on ``<lock dir>/<index>.lock`` (the lock
  directory is ``<WORKER_CACHE_DIR>/gpu-claims``, on the cache volume every replica
  mounts). It is held for the life of the process and released by the kernel when the
  process dies, however it dies: nothing to clean up, nothing stale.
- Processes choose one at a time (a short ``flock`` on ``<lock dir>/.claiming``): the
  least-loaded GPU, the lowest index among equals. With more processes than GPUs the
  extra ones **share** the least-loaded GPU (``<index>.<n>.lock``) and log
  ``gpu.shared``; a replica that cannot have a GPU of its own still serves.
- A forked child (a prefork pool) inherits its parent's claim: the open lock file and
  this module's record of it. ``worker serve --pool prefork`` claims in the parent
  before it forks, so one worker is one GPU, whatever its concurrency.

One device, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``: nothing is claimed, nothing changes.
Every process sharing a lock directory must see the same GPUs in the same order (true for
the replicas of one compose service on one host); keep the directory on a local
filesystem, not one shared by several hosts.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import ConfigurationError
from worker.log import get_logger

log = get_logger(__name__)

#: The lock directory's name under ``WORKER_CACHE_DIR``.
CLAIMS_DIR = "gpu-claims"
_MUTEX = ".claiming"
_LOCK_NAME = re.compile(r"(\d+)(?:\.(\d+))?\.lock")


@dataclass
class GpuClaim:
    """A GPU this process holds: CUDA ordinal ``index`` among the visible devices, and
    ``holders``, the processes on it when it was claimed (1: this process has it alone)."""

    index: int
    holders: int
    path: Path
    _fd: int = field(repr=False)
    _pid: int = field(default_factory=os.getpid, repr=False)

    @property
    def exclusive(self) -> bool:
        return self.holders == 1

    def release(self) -> None:
        """Give the GPU back (a process that exits gives it back anyway). In a forked child
        this only closes the inherited descriptor: the parent keeps its claim."""
        if self._fd < 0:
            return
        if os.getpid() == self._pid:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = -1


def _lock_path(lock_dir: Path, index: int, slot: int) -> Path:
    return lock_dir / (f"{index}.lock" if slot == 0 else f"{index}.{slot}.lock")


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on ``path``, or None if it is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}:
            return None
        raise
    return fd


def _held_slots(lock_dir: Path, count: int) -> list[set[int]]:
    """Per GPU, the slots some process holds now (a free slot is locked and unlocked)."""
    held: list[set[int]] = [set() for _ in range(count)]
    for path in lock_dir.iterdir():
        match = _LOCK_NAME.fullmatch(path.name)
        if not match or int(match[1]) >= count:
            continue
        fd = _try_lock(path)
        if fd is None:
            held[int(match[1])].add(int(match[2] or 0))
        else:
            os.close(fd)  # closing the only descriptor drops the probe's lock
    return held


@contextmanager
def _choosing(lock_dir: Path) -> Iterator[None]:
    """One process at a time looks at the claims and takes one (a blocking flock; the
    kernel drops it if the process dies while it holds it)."""
    fd = os.open(lock_dir / _MUTEX, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def claim_gpu(lock_dir: Path, count: int) -> GpuClaim:
    """Claim one of ``count`` GPUs in ``lock_dir``: a free one if there is one, otherwise
    a share of the least-loaded one (lowest index among equals). The claim lasts until
    :meth:`GpuClaim.release` or the end of the process."""
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        with _choosing(lock_dir):
            held = _held_slots(lock_dir, count)
            index = min(range(count), key=lambda i: (len(held[i]), i))
            slot = 0
            while True:
                if slot not in held[index]:
                    path = _lock_path(lock_dir, index, slot)
                    fd = _try_lock(path)
                    if fd is not None:
                        return GpuClaim(index, len(held[index]) + 1, path, fd)
                slot += 1
    except OSError as exc:
        raise ConfigurationError(
            f"cannot claim a GPU in {lock_dir}: {exc.strerror or exc}. Make WORKER_CACHE_DIR "
            "writable, or choose the GPU yourself with WORKER_DEVICE=cuda:N"
        ) from exc


def cuda_device_count() -> int:
    """CUDA devices this process can see (0 without a CUDA build of torch)."""
    import torch

    return int(torch.cuda.device_count())


def fork_safe_cuda_device_count() -> int:
    """:func:`cuda_device_count` without initialising CUDA in this process, for a parent
    that forks afterwards (CUDA does not survive a fork): NVML, as torch counts before CUDA
    is initialised, or else (NVML missing, a driver present) a throw-away interpreter."""
    import torch

    if torch.version.cuda is None:  # a CPU (or ROCm) build of torch
        return 0
    nvml_count: Callable[[], int] | None = getattr(torch.cuda, "_device_count_nvml", None)
    if nvml_count is not None:
        found = nvml_count()
        if found >= 0:
            return found
    try:
        ctypes.CDLL("libcuda.so.1")  # loading the driver library initialises nothing
    except OSError:
        return 0  # no NVIDIA driver on this host
    done = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        capture_output=True,
        text=True,
        check=False,
    )
    return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


_held: dict[Path, GpuClaim] = {}
_held_lock = threading.Lock()


def held_claim(lock_dir: Path, count: int) -> GpuClaim:
    """This process's claim in ``lock_dir``, taken on first use and kept for the life of
    the process (inherited by forked children, so they share it)."""
    key = lock_dir.resolve()
    with _held_lock:
        claim = _held.get(key)
        if claim is None:
            claim = _held[key] = claim_gpu(key, count)
            if claim.exclusive:
                log.info("gpu.claimed", index=claim.index, devices=count, lock=str(claim.path))
            else:
                log.warning(
                    "gpu.shared",
                    index=claim.index,
                    devices=count,
                    holders=claim.holders,
                    lock=str(claim.path),
                    hint="more workers than GPUs: this one shares the least-loaded GPU",
                )
        return claim


def resolve_auto_device(
    requested: str, lock_dir: Path, count: Callable[[], int] | None = None
) -> str:
    """``requested`` as it is, unless it is ``auto`` and ``count()`` (default:
    :func:`cuda_device_count`) finds several CUDA devices: then ``cuda:N`` for the GPU this
    process claimed in ``lock_dir``."""
    if requested != "auto":
        return requested
    devices = (count or cuda_device_count)()
    if devices <= 1:
        return requested
    return f"cuda:{held_claim(lock_dir, devices).index}"
