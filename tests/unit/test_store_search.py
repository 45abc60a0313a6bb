"""`worker search` and `worker store stats|index|compact` over a real LanceDB store.

Every search is checked against a brute force computed here with numpy over the rows read
back from the store: the same job ids in the same order, scores within 1e-5.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from tests.cli_runner import CliResult, run_cli
from tests.helpers import write_images
from worker.cli.classify import job_id_for
from worker.model import LoadedModel
from worker.retrieval import MIN_INDEX_ROWS, TopK, top_indices
from worker.store import EmbeddingRow, EmbeddingStore, row_filter, vectors

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=40)


# ---------------------------------------------------------------------- helpers


@dataclass
class Stored:
    """Every row of one fingerprint, as the store holds it."""

    job_ids: list[str]
    uris: list[str | None]
    embeddings: np.ndarray  # (n, D) float32
    created_at: list[datetime]


def read_back(uri: str, fingerprint: str) -> Stored:
    table = EmbeddingStore(uri).table()
    found = (
        table.search()
        .where(row_filter(fingerprint))
        .select(["job_id", "uri", "embedding", "created_at"])
        .to_arrow()
    )
    dim = found.schema.field("embedding").type.list_size
    return Stored(
        found.column("job_id").to_pylist(),
        found.column("uri").to_pylist(),
        vectors(found.column("embedding"), dim),
        found.column("created_at").to_pylist(),
    )


def brute_force(
    query: np.ndarray, stored: Stored, k: int, since: datetime | None = None
) -> list[tuple[str, float]]:
    """(job id, cosine) of the k best rows: every row, numpy, no store code involved."""
    keep = [i for i, t in enumerate(stored.created_at) if since is None or t >= since]
    scores = stored.embeddings[keep].astype(np.float64) @ query.astype(np.float64)
    order = np.argsort(-scores, kind="stable")[:k]
    return [(stored.job_ids[keep[i]], float(scores[i])) for i in order]


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    normed: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return normed


def make_rows(
    embeddings: np.ndarray,
    fingerprint: str,
    prefix: str,
    created_at: datetime = NOW,
) -> list[EmbeddingRow]:
    return [
        EmbeddingRow(
            job_id=f"{prefix}-{i}",
            image_sha256=None,
            fingerprint=fingerprint,
            embedding=np.ascontiguousarray(e, dtype=np.float32),
            frames=None,
            uri=f"s3://bucket/{prefix}/{i}.jpg",
            created_at=created_at,
            metadata="{}",
            result="{}",
        )
        for i, e in enumerate(embeddings)
    ]


def hits(proc: CliResult) -> list[tuple[str, float]]:
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all(set(line) == {"uri", "job_id", "score"} for line in lines)
    return [(line["job_id"], line["score"]) for line in lines]


def events(proc: CliResult) -> dict[str, dict[str, Any]]:
    """The JSON log events on stderr, by name (WORKER_LOG_FORMAT=json)."""
    found = {}
    for line in proc.stderr.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            found[event["event"]] = event
    return found


def assert_same(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [job for job, _ in got] == [job for job, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)


def store_uri(env: dict[str, str]) -> str:
    return str(Path(env["WORKER_CACHE_DIR"]) / "store")


@pytest.fixture
def classified(tmp_path: Path, worker_env: dict[str, str]) -> list[Path]:
    """Six images scored by `worker classify`, so their rows come through the served path."""
    paths = write_images(tmp_path / "imgs", 6)
    # the writer commits at once instead of waiting out its usual second for more rows
    worker_env["WORKER_STORE__FLUSH_INTERVAL_S"] = "0.01"
    proc = run_cli("classify", str(tmp_path / "imgs"), env=worker_env)
    assert proc.returncode == 0, proc.stderr
    return paths


# ---------------------------------------------------------------------- the pure part


def test_running_top_k_over_batches_equals_one_sort() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=1000).astype(np.float32)
    ids = pa.array([f"j{i}" for i in range(1000)])
    best = TopK(7)
    for start in range(0, 1000, 64):  # batches smaller and larger than k
        part = slice(start, start + 64)
        best.add(scores[part], ids[part], pa.array([None] * len(scores[part]), pa.string()))
    expected = np.argsort(-scores)[:7]
    assert [h.job_id for h in best.hits] == [f"j{i}" for i in expected]
    assert list(top_indices(scores[:5], 7)) == list(np.argsort(-scores[:5]))


def test_vectors_of_a_sliced_column_are_its_own_rows() -> None:
    """Arrow slices keep the whole buffer: the rows must start at the slice's offset."""
    column = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(12, dtype=np.float32)), 3)
    assert vectors(column.slice(2, 2), 3).tolist() == [[6, 7, 8], [9, 10, 11]]
    chunked = pa.chunked_array([column.slice(1, 1), column.slice(3, 1)])
    assert vectors(chunked, 3).tolist() == [[3, 4, 5], [9, 10, 11]]


# ---------------------------------------------------------------------- search by scan


def test_text_search_is_the_exact_cosine_of_the_text_as_given(
    classified: list[Path], worker_env: dict[str, str], tiny_model: LoadedModel
) -> None:
    # more rows than k, so the top k is a real choice
    store = EmbeddingStore(store_uri(worker_env))
    store.add(make_rows(unit(np.random.default_rng(1), 300, 64), tiny_model.fingerprint, "r"))
    text = "a red circle"
    proc = run_cli("search", text, "--k", "10", env=worker_env)
    stored = read_back(store_uri(worker_env), tiny_model.fingerprint)
    assert len(stored.job_ids) == 306
    # no template: exactly the text's own embedding
    query = tiny_model.encode_texts([text])[0].numpy()
    assert_same(hits(proc), brute_force(query, stored, 10))
    assert events(proc)["search.finished"]["method"] == "scan"


def test_image_search_finds_the_classified_image_first(
    classified: list[Path], worker_env: dict[str, str], tmp_path: Path
) -> None:
    target = classified[4]
    proc = run_cli("search", "--image", str(target), "--k", "3", env=worker_env)
    found = hits(proc)
    assert found[0][0] == job_id_for(str(target))
    assert found[0][1] == pytest.approx(1.0, abs=1e-4)
    assert len(found) == 3
    assert found[1][1] < found[0][1]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["uri"] == str(target)
    (tmp_path / "notes.png").write_text("not an image")
    refused = run_cli("search", "--image", str(tmp_path / "notes.png"), env=worker_env)
    assert (refused.returncode, refused.stdout) == (2, "")
    assert "--image" in refused.stderr


def test_other_fingerprints_are_counted_never_returned(
    classified: list[Path], worker_env: dict[str, str], tiny_model: LoadedModel
) -> None:
    mine = read_back(store_uri(worker_env), tiny_model.fingerprint)
    # another model's rows identical to this model's: they would all score 1.0
    EmbeddingStore(store_uri(worker_env)).add(make_rows(mine.embeddings, "0ther0model0000", "x"))
    proc = run_cli("search", "--image", str(classified[0]), "--k", "20", env=worker_env)
    found = hits(proc)
    assert {job for job, _ in found} == set(mine.job_ids)
    assert events(proc)["search.other_models"]["rows"] == 6


def test_since_leaves_out_older_rows(
    classified: list[Path], worker_env: dict[str, str], tiny_model: LoadedModel
) -> None:
    mine = read_back(store_uri(worker_env), tiny_model.fingerprint)
    target = job_id_for(str(classified[2]))
    copy = mine.embeddings[mine.job_ids.index(target)][None]
    store = EmbeddingStore(store_uri(worker_env))
    store.add(make_rows(copy, tiny_model.fingerprint, "old", created_at=OLD))
    everything = hits(run_cli("search", "--image", str(classified[2]), env=worker_env))
    assert {job for job, _ in everything[:2]} == {target, "old-0"}
    recent = hits(
        run_cli("search", "--image", str(classified[2]), "--since", "30d", env=worker_env)
    )
    assert "old-0" not in {job for job, _ in recent}
    assert recent[0][0] == target
    stored = read_back(store_uri(worker_env), tiny_model.fingerprint)
    query = stored.embeddings[stored.job_ids.index(target)]
    assert_same(recent, brute_force(query, stored, 10, since=NOW - timedelta(days=30)))


def test_usage_mistakes_exit_2_and_an_empty_store_exits_0(
    tmp_path: Path, worker_env: dict[str, str]
) -> None:
    neither = run_cli("search", env=worker_env)
    both = run_cli("search", "cat", "--image", "x.png", env=worker_env)
    assert (neither.returncode, both.returncode) == (2, 2)
    assert "give TEXT or --image SRC" in neither.stderr
    assert "not both" in both.stderr
    missing = run_cli("search", "--image", str(tmp_path / "missing.png"), env=worker_env)
    assert missing.returncode == 2
    assert "--image" in missing.stderr
    empty = run_cli("search", "cat", env=worker_env)
    assert (empty.returncode, empty.stdout) == (0, "")
    assert "search.empty" in events(empty)
    off = {**worker_env, "WORKER_STORE__URI": "none"}
    for args in (["search", "cat"], ["store", "stats"], ["store", "index"], ["store", "compact"]):
        proc = run_cli(*args, env=off)
        assert proc.returncode == 2
        assert "WORKER_STORE__URI=none" in proc.stderr


# ---------------------------------------------------------------------- search over an index

CLUSTERS = 40
MEMBERS = 5
QUERY_TEXT = "a blue square"


@dataclass
class Indexed:
    env: dict[str, str]
    centres: np.ndarray  # (CLUSTERS, D): [the image's embedding, the text's, random…]
    image: Path


@pytest.fixture(scope="module")
def indexed(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_name: str, tiny_model: LoadedModel
) -> Indexed:
    """20,000 rows of the tiny model's fingerprint under an ANN index, with 40 tight
    clusters among them: one around an image's embedding, one around a text's, 38 random.

    Each cluster is 5 rows within cosine ~0.99 of its centre; the other 19,800 rows are
    uniform on the sphere, where (64-d) none comes within cosine ~0.6 of a centre. So a
    centre's 5 nearest rows lie far inside the 100 candidates the index returns (from the
    centre's own partition and the 19 next to it), and what the approximate search can
    get wrong is their order and distances (8-bit scalar quantisation blurs the small
    differences between them): the exact re-rank makes both exact, which is what the tests
    check. 100 copies of cluster rows under another fingerprint sit at cosine ~1.0 to
    their centres and must never come back (the prefilter)."""
    from worker.cli.store import image_query
    from worker.settings import Settings

    rng = np.random.default_rng(7)
    cache = tmp_path_factory.mktemp("indexed")
    [image] = write_images(cache / "imgs", 1)
    settings = Settings(model={"name": tiny_model_name, "pretrained": ""}, device="cpu")
    centres = np.concatenate(
        [
            image_query(tiny_model, settings, str(image), image.read_bytes())[None],
            tiny_model.encode_texts([QUERY_TEXT]).numpy(),
            unit(rng, CLUSTERS - 2, 64),
        ]
    )
    noise = 0.015 * rng.normal(size=(CLUSTERS * MEMBERS, 64)).astype(np.float32)
    members = np.repeat(centres, MEMBERS, axis=0) + noise
    members /= np.linalg.norm(members, axis=1, keepdims=True)
    background = unit(rng, 20_000 - len(members), 64)
    env = {
        "WORKER_MODEL__NAME": tiny_model_name,
        "WORKER_CACHE_DIR": str(cache),
        "WORKER_DEVICE": "cpu",
        "WORKER_LOG_FORMAT": "json",
    }
    store = EmbeddingStore(store_uri(env))
    store.add(make_rows(np.concatenate([members, background]), tiny_model.fingerprint, "r"))
    store.add(make_rows(members[::2], "0ther0model0000", "x"))
    proc = run_cli("store", "index", env=env)
    assert proc.returncode == 0, proc.stderr
    return Indexed(env, centres, image)


def test_index_search_reranked_equals_brute_force(
    indexed: Indexed, tiny_model: LoadedModel
) -> None:
    from worker.retrieval import index_search, nprobes_for, vector_index

    stored = read_back(store_uri(indexed.env), tiny_model.fingerprint)
    assert len(stored.job_ids) == 20_000 >= MIN_INDEX_ROWS
    table = EmbeddingStore(store_uri(indexed.env)).table()
    found = vector_index(table)
    assert found is not None
    assert found[1] == 20_100  # every row, the other fingerprint's too
    where = row_filter(tiny_model.fingerprint)
    assert where is not None
    for centre in indexed.centres:  # see the fixture for why this is exact
        got, candidates = index_search(table, centre, where, MEMBERS, nprobes_for(found[1]))
        assert candidates == 100
        assert_same([(h.job_id, h.score) for h in got], brute_force(centre, stored, MEMBERS))


def test_cli_search_over_the_index(indexed: Indexed, tiny_model: LoadedModel) -> None:
    stored = read_back(store_uri(indexed.env), tiny_model.fingerprint)
    env = indexed.env
    by_image = run_cli("search", "--image", str(indexed.image), "--k", "5", env=env)
    by_text = run_cli("search", QUERY_TEXT, "--k", "5", env=env)
    for proc, centre in ((by_image, indexed.centres[0]), (by_text, indexed.centres[1])):
        assert events(proc)["search.finished"]["method"] == "index"
        assert events(proc)["search.other_models"]["rows"] == 100
        assert_same(hits(proc), brute_force(centre, stored, 5))
    # --exact scans every row, index or not: the text's top 10 reaches past its cluster
    exact = run_cli("search", QUERY_TEXT, "--exact", env=env)
    assert events(exact)["search.finished"]["method"] == "scan"
    assert_same(hits(exact), brute_force(indexed.centres[1], stored, 10))


# ---------------------------------------------------------------------- store commands


def test_stats_counts_rows_per_fingerprint(
    classified: list[Path], worker_env: dict[str, str], tiny_model: LoadedModel
) -> None:
    EmbeddingStore(store_uri(worker_env)).add(
        make_rows(unit(np.random.default_rng(2), 4, 64), "0ther0model0000", "x")
    )
    proc = run_cli("store", "stats", "--json", env=worker_env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["rows"] == 10
    assert report["dim"] == 64
    by_fingerprint = {f["fingerprint"]: f for f in report["fingerprints"]}
    assert by_fingerprint[tiny_model.fingerprint]["rows"] == 6
    assert by_fingerprint[tiny_model.fingerprint]["configured"] is True
    assert by_fingerprint["0ther0model0000"]["rows"] == 4
    assert by_fingerprint["0ther0model0000"]["configured"] is False
    human = run_cli("store", "stats", env=worker_env)
    assert tiny_model.fingerprint in human.stdout
    assert "configured" in human.stdout


def test_stats_of_an_empty_store(worker_env: dict[str, str]) -> None:
    proc = run_cli("store", "stats", env=worker_env)
    assert proc.returncode == 0
    assert "is empty" in proc.stdout


def test_compact_older_than_deletes_exactly_the_old_rows(
    worker_env: dict[str, str], tiny_model: LoadedModel
) -> None:
    rng = np.random.default_rng(4)
    store = EmbeddingStore(store_uri(worker_env))
    store.add(make_rows(unit(rng, 5, 64), tiny_model.fingerprint, "old", created_at=OLD))
    for i in range(3):  # several commits: several small files to merge
        store.add(make_rows(unit(rng, 3, 64), tiny_model.fingerprint, f"new{i}"))
    run = ("store", "compact", "--older-than", "30d", "--keep-versions", "0s", "--json")
    proc = run_cli(*run, env=worker_env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["deleted"], report["rows_before"], report["rows_after"]) == (5, 14, 9)
    assert report["bytes_after"] < report["bytes_before"]
    assert report["versions"] == 1
    left = read_back(store_uri(worker_env), tiny_model.fingerprint)
    assert sorted(left.job_ids) == sorted(f"new{i}-{j}" for i in range(3) for j in range(3))


def test_index_refuses_a_small_store(classified: list[Path], worker_env: dict[str, str]) -> None:
    proc = run_cli("store", "index", env=worker_env)
    assert proc.returncode == 2
    assert "holds 6 rows" in proc.stderr
    assert f"{MIN_INDEX_ROWS:,}" in proc.stderr
