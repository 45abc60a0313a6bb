"""The embedding store at a million rows: preview, search, rescore and appends, end to end.

    python benchmarks/store_scale.py [--rows 1000000] [--dir /tmp] [--keep]
    python benchmarks/store_scale.py --reuse /tmp/store-scale-XXXX   # measure it again

Builds a CLIP with 512-dimensional embeddings but tiny, random towers (the store's
commands never encode an image; the text tower only encodes prompts and queries), saves
it as a ``local-dir`` checkpoint and fills a LanceDB store with --rows rows of that
model's fingerprint: clustered, L2-normalised float32 embeddings (some clusters around
the policy's prompts, a small one around each search query), ``created_at`` spread over
the last --days days in time order (so ``--since 30d`` holds about half), a ~1 KB result
document JSON and an ``s3://`` URI per row. The bulk load writes Arrow tables straight
into the table (``merge_insert`` would be needlessly slow for a load); the serving
write path (``EmbeddingStore.add``: merge_insert on ``job_id``) is timed apart,
--append-batches batches of --append-rows rows into the full table, before and after
the indexes.

Then each command as a user runs it (a subprocess: wall time includes start-up; peak RSS
and CPU time from /usr/bin/time):

- ``worker policies compile``: cold (empty prompt cache) and warm;
- ``worker policies preview EDITED --since 30d --json`` for a 20-category policy (target
  <= 15 s including start-up), once first (the edit's new prompts get encoded);
- ``worker store index`` (skipped on a --reuse store that has one, unless
  --rebuild-index);
- --repeat rounds of: the import baseline (``python -c "import torch, open_clip,
  lancedb, pyarrow, worker.cli"``), preview, ``worker search "a red car" --k 10
  --exact`` (a scan), ``worker search "a red car" --k 10`` (the ANN index; target <= 3 s
  beyond the baseline), preview and the scan again with OMP_NUM_THREADS=1. Each round
  starts with the baseline, so "beyond the baseline" compares runs at about the same
  load. Search's scores are checked against the exact cosines (numpy) and its top 10
  against the brute-force top 10 (recall@10);
- ``worker rescore --policy moderation --since 30d --out /dev/null`` (a file on disk,
  deleted after, where /dev/null is refused).

No timed assertions: it prints the figures. The folder is deleted at the end unless
--keep (or --reuse).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

DIM = 512
#: 512-d embeddings, tiny towers: prompts and queries encode in milliseconds.
MODEL_CFG = {
    "embed_dim": DIM,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
QUERIES = ("a red car", "a dog on a beach", "a bowl of soup", "a crowded stadium")
CATEGORIES = {
    "sexual_content": ["a naked person", "explicit nudity", "pornography"],
    "suggestive": ["a person in lingerie", "a provocative pose", "a swimsuit photo shoot"],
    "violence": ["a violent fight", "people punching each other", "a beating"],
    "gore": ["a bloody wound", "a dead body", "graphic injury"],
    "weapons": ["a gun", "a rifle", "a person holding a knife as a weapon"],
    "drugs": ["drug paraphernalia", "a pile of white powder", "a syringe with drugs"],
    "alcohol": ["a glass of beer", "bottles of liquor", "people drinking alcohol"],
    "tobacco": ["a person smoking a cigarette", "a vape pen", "a pack of cigarettes"],
    "gambling": ["a casino table", "slot machines", "poker chips and cards"],
    "hate_symbols": ["a swastika", "a hate symbol", "an extremist flag"],
    "self_harm": ["self harm cuts on an arm", "a person about to jump", "a noose"],
    "child_safety": ["a child in an unsafe situation", "an unattended toddler near water"],
    "spam_text": ["an advertisement with a phone number", "a spam flyer", "a QR code ad"],
    "scam": ["a fake giveaway", "a cryptocurrency scam", "a fake lottery win"],
    "personal_data": ["a passport", "an identity card", "a credit card"],
    "medical": ["a surgery", "a medical x-ray", "an injection"],
    "animal_cruelty": ["an injured animal", "animal abuse", "a dog fight"],
    "extremism": ["a terrorist", "an armed militia", "a propaganda poster"],
    "disaster": ["a burning building", "a car crash", "a flood"],
    "shocking": ["a disgusting image", "vomit", "a shocking scene"],
}
BACKGROUND = [
    "an ordinary everyday photo",
    "a photo of people talking",
    "a photo of a landscape",
    "a photo of food on a table",
    "a selfie",
    "a product photo",
]
#: Fractions of the rows drawn around a category prompt, a background prompt, a query.
CATEGORY_SHARE, BACKGROUND_SHARE, QUERY_ROWS_PER_MILLION = 0.05, 0.15, 100
RANDOM_CENTRES = 256
METADATA = '{"user":"u-1234","source":"upload"}'


def policy_yaml(edited: bool) -> str:
    """The deployed moderation policy, or an edit: two thresholds moved, a prompt added."""
    lines = ["name: moderation", "kind: moderation", "templates: simple", "background:"]
    lines += [f"  - {b}" for b in BACKGROUND]
    lines.append("categories:")
    for n, (name, prompts) in enumerate(CATEGORIES.items()):
        threshold = 0.5
        if edited and name in ("weapons", "drugs"):
            threshold = 0.35
        listed = [*prompts, "an online betting site"] if edited and name == "gambling" else prompts
        lines.append(f"  - id: {name}")
        lines.append("    prompts: [" + ", ".join(listed) + "]")
        lines.append(f"    threshold: {threshold}")
        lines.append(f"    action: {('flag', 'review', 'block')[n % 3]}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the model


def build_model(directory: Path) -> tuple[str, str, np.ndarray, np.ndarray]:
    """Save the model; returns (model name, fingerprint, (C, D) cluster centres, the query
    embeddings)."""
    import torch

    from worker.checkpoint import build_untrained, save_checkpoint
    from worker.model import load_model

    name = f"local-dir:{directory}"
    if not (directory / "open_clip_config.json").is_file():
        model = build_untrained(MODEL_CFG, seed=0)
        with torch.no_grad():
            model.logit_scale.fill_(float(np.log(100.0)))  # a trained CLIP's scale
        name = save_checkpoint(model, MODEL_CFG, directory)
    loaded = load_model(name, "", device="cpu")
    prompts = [p for ps in CATEGORIES.values() for p in ps]
    texts = loaded.encode_texts([*prompts, *BACKGROUND, *QUERIES]).numpy()
    rng = np.random.default_rng(1)
    random_centres = rng.standard_normal((RANDOM_CENTRES, DIM)).astype(np.float32)
    random_centres /= np.linalg.norm(random_centres, axis=1, keepdims=True)
    centres = np.concatenate([texts, random_centres])
    return name, loaded.fingerprint, centres, texts[-len(QUERIES) :]


# --------------------------------------------------------------------------- the rows


@dataclass
class Layout:
    categories: int  # centres [0, categories) are category prompts
    background: int  # then the background prompts
    queries: int  # then the queries
    total: int  # then random directions


def centre_choices(layout: Layout, rows: int, rng: np.random.Generator) -> np.ndarray:
    kind = rng.random(rows)
    per_query = QUERY_ROWS_PER_MILLION / 1_000_000
    picks = layout.categories + layout.background + layout.queries
    choice = rng.integers(picks, layout.total, rows)  # random clusters by default
    is_cat = kind < CATEGORY_SHARE
    is_bg = (kind >= CATEGORY_SHARE) & (kind < CATEGORY_SHARE + BACKGROUND_SHARE)
    is_query = kind >= 1 - per_query * layout.queries
    choice[is_cat] = rng.integers(0, layout.categories, int(is_cat.sum()))
    start = layout.categories
    choice[is_bg] = rng.integers(start, start + layout.background, int(is_bg.sum()))
    start += layout.background
    choice[is_query] = rng.integers(start, start + layout.queries, int(is_query.sum()))
    return choice


def embeddings(centres: np.ndarray, choice: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows at cosine 0.5-0.95 from their centre (random directions otherwise)."""
    noise = rng.standard_normal((len(choice), DIM), dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    near = rng.uniform(0.5, 0.95, (len(choice), 1)).astype(np.float32)
    out: np.ndarray = centres[choice] * near + noise * np.sqrt(1 - near**2)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def result_json(job_id: str, uri: str, sha: str, fingerprint: str, created: str) -> str:
    """A result document of about 1 KB, as the engine delivers one."""
    return (
        f'{{"job_id":"{job_id}","status":"ok","image":{{"uri":"{uri}","filename":null,'
        f'"sha256":"{sha}","width":1024,"height":768,"format":"JPEG"}},'
        f'"model":{{"name":"bench","pretrained":"","fingerprint":"{fingerprint}"}},'
        f'"policies":{{"moderation":{{"version":"{sha}","mode":"live","scores":{{'
        + ",".join(f'"{c}":0.0{len(c) % 9}12' for c in CATEGORIES)
        + '},"flags":[]}},"flags":[],"labels":[],'
        + '"decision":{"action":"allow","categories":[]},'
        + '"metadata":{"user":"u-1234","source":"upload"},'
        + '"timings_ms":{"fetch":12.1,"decode":4.3,"encode":21.7,"score":0.4,"total":38.5},'
        + f'"worker":"host-1/1234","created_at":"{created}"}}'
    )


def load_rows(
    store_dir: Path,
    rows: int,
    days: float,
    fingerprint: str,
    centres: np.ndarray,
    layout: Layout,
    chunk: int,
    seed: int,
) -> tuple[float, int]:
    """Bulk-load ``rows`` rows in time order, ``chunk`` rows an Arrow write; returns
    (seconds spent writing, bytes of result JSON)."""
    import pyarrow as pa

    from worker.store import EmbeddingStore, table_schema

    rng = np.random.default_rng(seed)
    store = EmbeddingStore(str(store_dir))
    table = store.table(DIM)
    schema = table_schema(DIM)
    now = datetime.now(UTC)
    first = now - timedelta(days=days)
    span_us = int(days * 86_400 * 1e6)
    offsets = np.sort(rng.integers(0, span_us, rows))  # uniform over the window, in order
    write_s, result_bytes = 0.0, 0
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        n = stop - start
        emb = embeddings(centres, centre_choices(layout, n, rng), rng)
        created = [first + timedelta(microseconds=int(o)) for o in offsets[start:stop]]
        stamps = [c.strftime("%Y-%m-%dT%H:%M:%S.%fZ") for c in created]
        shas = rng.bytes(32 * n).hex()
        job_ids = [f"job-{i:09d}" for i in range(start, stop)]
        uris = [f"s3://bucket/uploads/{i:09d}.jpg" for i in range(start, stop)]
        sha_list = [shas[64 * k : 64 * (k + 1)] for k in range(n)]
        results = [
            result_json(j, u, s, fingerprint, t)
            for j, u, s, t in zip(job_ids, uris, sha_list, stamps, strict=True)
        ]
        result_bytes += sum(len(r) for r in results)
        data = pa.table(
            {
                "job_id": pa.array(job_ids, pa.string()),
                "image_sha256": pa.array(sha_list, pa.string()),
                "fingerprint": pa.array([fingerprint] * n, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(emb.ravel(), pa.float32()), DIM
                ),
                "frames": pa.nulls(n, schema.field("frames").type),
                "uri": pa.array(uris, pa.string()),
                "created_at": pa.array(created, pa.timestamp("us", tz="UTC")),
                "metadata": pa.array([METADATA] * n, pa.string()),
                "result": pa.array(results, pa.string()),
            },
            schema=schema,
        )
        started = time.perf_counter()
        table.add(data)
        write_s += time.perf_counter() - started
        print(f"  loaded {stop:>9,} rows", file=sys.stderr, flush=True)
    return write_s, result_bytes


# --------------------------------------------------------------------------- commands


@dataclass
class Run:
    wall: float
    rss_mb: float
    cpu: float  # user + system seconds
    rc: int
    stdout: str
    stderr: str


def run(command: list[str], env: dict[str, str]) -> Run:
    """Run a command, its output to files; wall time and its own peak RSS.

    The RSS comes from /usr/bin/time: a child forked from this (large) process would
    report this process's RSS as its own peak, which Linux carries across exec."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path, rss_path = (Path(tmp) / n for n in ("stdout", "stderr", "rss"))
        timer = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss_path)]
        with out_path.open("wb") as out, err_path.open("wb") as err:
            started = time.perf_counter()
            rc = subprocess.run(
                timer + command, check=False, env=env, stdout=out, stderr=err
            ).returncode
            wall = time.perf_counter() - started
        words = rss_path.read_text().split()  # "Command exited with ..." comes first
        rss_mb, cpu = float("nan"), float("nan")
        if len(words) >= 3:
            rss_mb, cpu = int(words[-3]) / 1024, float(words[-2]) + float(words[-1])
        stdout = out_path.read_text(errors="replace")
        return Run(wall, rss_mb, cpu, rc, stdout, err_path.read_text())


def worker_command() -> list[str]:
    script = Path(sys.executable).with_name("worker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "worker"]


def checked(result: Run, what: str) -> Run:
    if result.rc != 0:
        print(f"{what} failed (exit {result.rc}):\n{result.stderr[-3000:]}", file=sys.stderr)
    return result


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def exact_top(store_dir: Path, fingerprint: str, query: np.ndarray, k: int) -> dict[str, float]:
    """Brute-force top ``k`` (job id -> cosine) over the stored rows, streamed."""
    from worker.store import EmbeddingStore, vectors

    store = EmbeddingStore(str(store_dir))
    ids: list[str] = []
    scores: list[np.ndarray] = []
    for batch in store.scan(["job_id", "embedding"], fingerprint):
        sims = vectors(batch.column("embedding"), DIM) @ query
        top = np.argpartition(-sims, min(k, len(sims) - 1))[:k]
        ids.extend(batch.column("job_id").take(top.tolist()).to_pylist())
        scores.append(sims[top])
    flat = np.concatenate(scores)
    order = np.argsort(-flat)[:k]
    return {ids[i]: float(flat[i]) for i in order}


def cosines(store_dir: Path, job_ids: list[str], query: np.ndarray) -> dict[str, float]:
    from worker.store import EmbeddingStore, vectors

    table = EmbeddingStore(str(store_dir)).table()
    quoted = ", ".join("'" + j + "'" for j in job_ids)
    found = table.search().where(f"job_id IN ({quoted})").select(["job_id", "embedding"])
    data = found.limit(len(job_ids)).to_arrow()
    sims = vectors(data.column("embedding"), DIM) @ query
    return dict(zip(data.column("job_id").to_pylist(), map(float, sims), strict=True))


def has_vector_index(store_dir: Path) -> bool:
    from worker.store import EmbeddingStore

    return EmbeddingStore(str(store_dir)).has_vector_index()


def hits(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=60.0, help="created_at spread")
    parser.add_argument("--since", default="30d", help="the window of preview and rescore")
    parser.add_argument("--chunk", type=int, default=100_000, help="rows per bulk write")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true", help="keep the store and model")
    parser.add_argument(
        "--reuse",
        type=Path,
        help="a folder kept by an earlier --keep run: measure its store again (no load)",
    )
    parser.add_argument(
        "--rebuild-index", action="store_true", help="with --reuse: build the index again"
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the timed commands")
    parser.add_argument("--append-batches", type=int, default=10)
    parser.add_argument("--append-rows", type=int, default=512)
    parser.add_argument("--skip-rescore", action="store_true")
    parser.add_argument(
        "--skip-index", action="store_true", help="no `worker store index`, no indexed search"
    )
    parser.add_argument("--query", default=QUERIES[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.query not in QUERIES:
        parser.error(f"--query must be one of {QUERIES} (the rows hold clusters around them)")

    need = int(args.rows * (DIM * 4 + 1400) * 1.3)
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if free < need and not args.reuse:
        sys.exit(f"{args.dir}: {free / 2**30:.1f} GiB free, about {need / 2**30:.1f} GiB needed")
    if args.reuse:
        folder, args.keep = args.reuse, True
    else:
        folder = Path(tempfile.mkdtemp(prefix="store-scale-", dir=args.dir))
    print(f"working in {folder}", file=sys.stderr)
    bench = Bench(args, folder)
    try:
        bench.measure()
    finally:
        if args.keep:
            print(f"kept {folder} (measure it again with --reuse {folder})", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        bench.print()


class Bench:
    """One benchmark run: the store, the model, the CLI environment, the figures."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.store_dir = folder / "cache" / "store"
        self.figures: list[tuple[str, str]] = []
        self.worker = worker_command()
        self.name = self.fingerprint = ""
        self.centres = self.queries = np.zeros(0)
        self.layout = Layout(0, 0, 0, 0)
        self.env: dict[str, str] = {}

    def note(self, label: str, value: str) -> None:
        self.figures.append((label, value))
        print(f"  {label}: {value}", file=sys.stderr, flush=True)

    def print(self) -> None:
        if not self.figures:
            return
        width = max(len(label) for label, _ in self.figures)
        print()
        for label, value in self.figures:
            print(f"{label:<{width}}  {value}")

    def measure(self) -> None:
        args = self.args
        self.note("CPU cores / load average at start", f"{os.cpu_count()} / {load_average()}")
        self.name, self.fingerprint, self.centres, self.queries = build_model(self.folder / "model")
        self.layout = Layout(
            sum(len(p) for p in CATEGORIES.values()),
            len(BACKGROUND),
            len(QUERIES),
            len(self.centres),
        )
        self.fill()
        self.setup_cli()
        self.compile_and_first_preview()
        if not args.reuse and not args.skip_index:
            self.time_appends("before the indexes")
        if not args.skip_index:
            self.index()
        self.rounds()
        if not args.skip_rescore:
            self.rescore()
        self.time_appends("with the indexes" if self.has_index() else "without indexes")
        self.note("load average at end", load_average())

    # ------------------------------------------------------------------ the store

    def fill(self) -> None:
        args = self.args
        if args.reuse:
            from worker.store import EmbeddingStore

            rows = EmbeddingStore(str(self.store_dir)).count()
            self.note("rows (reused store)", f"{rows:,} x {DIM}-dim float32")
            (self.folder / "cache" / "embeddings.sqlite3").unlink(missing_ok=True)  # cold
        else:
            self.note("rows", f"{args.rows:,} x {DIM}-dim float32")
            started = time.perf_counter()
            write_s, result_bytes = load_rows(
                self.store_dir,
                args.rows,
                args.days,
                self.fingerprint,
                self.centres,
                self.layout,
                args.chunk,
                args.seed,
            )
            self.note(
                f"bulk load (Arrow writes of {args.chunk:,} rows)",
                f"{time.perf_counter() - started:.1f} s with the generation; writes "
                f"{write_s:.1f} s = {args.rows / write_s:,.0f} rows/s",
            )
            self.note("result JSON a row", f"{result_bytes / args.rows:.0f} B")
        size = sum(p.stat().st_size for p in self.store_dir.rglob("*") if p.is_file())
        self.note("store size on disk", f"{size / 2**30:.2f} GiB")

    def setup_cli(self) -> None:
        policy_dir = self.folder / "policies"
        policy_dir.mkdir(exist_ok=True)
        (policy_dir / "moderation.yaml").write_text(policy_yaml(edited=False))
        self.edited = self.folder / "edited" / "moderation.yaml"
        self.edited.parent.mkdir(exist_ok=True)
        self.edited.write_text(policy_yaml(edited=True))
        self.env = {
            **os.environ,
            "WORKER_MODEL__NAME": self.name,
            "WORKER_MODEL__PRETRAINED": "",
            "WORKER_CACHE_DIR": str(self.folder / "cache"),
            "WORKER_POLICY_DIR": str(policy_dir),
            "WORKER_DEVICE": "cpu",
            "WORKER_LOG_FORMAT": "json",
        }

    # ------------------------------------------------------------------ commands

    def compile_and_first_preview(self) -> None:
        for label in ("cold", "warm"):
            done = checked(run([*self.worker, "policies", "compile"], self.env), "compile")
            self.note(f"worker policies compile ({label} prompt cache)", f"{done.wall:.2f} s")
        first = checked(run(self.preview_command(), self.env), "preview")
        self.note(
            "first preview (encodes the edit's new prompts)",
            f"{first.wall:.2f} s, {first.rss_mb:.0f} MB RSS (load {load_average()})",
        )
        document = json.loads(first.stdout) if first.rc == 0 else {}
        report = document.get("policies", {}).get("moderation", {})
        cats = report.get("categories", {})
        totals = [
            sum(c[key] for c in cats.values())
            for key in ("flagged_now", "flagged_with_edit", "newly_flagged", "no_longer_flagged")
        ]
        self.note(
            "preview: rows in window / flagged now / with edit / newly / no longer",
            " / ".join(str(v) for v in [report.get("rows"), *totals]),
        )

    def preview_command(self) -> list[str]:
        return [
            *self.worker,
            "policies",
            "preview",
            str(self.edited),
            "--since",
            self.args.since,
            "--json",
        ]

    def has_index(self) -> bool:
        return has_vector_index(self.store_dir)

    def index(self) -> None:
        if has_vector_index(self.store_dir) and not self.args.rebuild_index:
            self.note("worker store index", "index already there (--reuse): not rebuilt")
            return
        print(f"  store index, load {load_average()}", file=sys.stderr, flush=True)
        built = checked(run([*self.worker, "store", "index"], self.env), "store index")
        self.note(
            "worker store index",
            f"{built.wall:.1f} s ({built.cpu:.0f} s CPU), {built.rss_mb:.0f} MB RSS, "
            f"rc {built.rc} (load {load_average()})",
        )

    def rounds(self) -> None:
        """Each command --repeat times, in rounds that start with the import baseline, so
        each "beyond the baseline" difference is taken at about the same load.
        OMP_NUM_THREADS=1: torch (and OpenBLAS) in one thread, the other core left to
        Lance's scan threads (see docs/benchmarks.md)."""
        search = [*self.worker, "search", self.args.query, "--k", "10"]
        imports = [sys.executable, "-c", "import torch, open_clip, lancedb, pyarrow, worker.cli"]
        one = {**self.env, "OMP_NUM_THREADS": "1"}
        commands = {
            "import baseline": (imports, self.env),
            "preview": (self.preview_command(), self.env),
            "preview, OMP_NUM_THREADS=1": (self.preview_command(), one),
            "search --exact (scan)": ([*search, "--exact"], self.env),
            "search --exact, OMP_NUM_THREADS=1": ([*search, "--exact"], one),
            "search (ANN index)": (search, self.env),
        }
        if self.args.skip_index:
            del commands["search (ANN index)"]
        runs: dict[str, list[tuple[Run, float]]] = {label: [] for label in commands}
        for n in range(self.args.repeat):
            for label, (command, env) in commands.items():
                load = os.getloadavg()[0]
                print(f"  round {n + 1}: {label}, load {load:.2f}", file=sys.stderr, flush=True)
                runs[label].append((checked(run(command, env), label), load))
        base = [r.wall for r, _ in runs["import baseline"]]
        for label, done in runs.items():
            walls = [r.wall for r, _ in done]
            line = (
                f"median {statistics.median(walls):.2f} s, min {min(walls):.2f} s "
                f"({', '.join(f'{w:.2f}' for w in walls)}); "
                f"CPU {statistics.median(r.cpu for r, _ in done):.2f} s; "
                f"{max(r.rss_mb for r, _ in done):.0f} MB RSS; load "
                + "/".join(f"{ld:.1f}" for _, ld in done)
            )
            if label != "import baseline":
                beyond = [w - b for w, b in zip(walls, base, strict=True)]
                line += (
                    f"; beyond the baseline: median {statistics.median(beyond):.2f} s, "
                    f"max {max(beyond):.2f} s"
                )
            self.note(label, line)
        self.check_search(runs)

    def check_search(self, runs: dict[str, list[tuple[Run, float]]]) -> None:
        query = self.queries[QUERIES.index(self.args.query)]
        exact = exact_top(self.store_dir, self.fingerprint, query, 10)
        for label in ("search --exact (scan)", "search (ANN index)"):
            if label not in runs:
                continue
            last = runs[label][-1][0]
            found = hits(last.stdout) if last.rc == 0 else []
            if not found:
                self.note(f"  {label}", f"no hits (rc {last.rc}): {last.stderr[-300:]!r}")
                continue
            true = cosines(self.store_dir, [h["job_id"] for h in found], query)
            err = max(abs(h["score"] - true[h["job_id"]]) for h in found)
            recall = len({h["job_id"] for h in found} & set(exact)) / len(exact)
            self.note(
                f"  {label}: max |score - exact cosine|, recall@10", f"{err:.1e}, {recall:.2f}"
            )

    def rescore(self) -> None:
        since = self.args.since
        command = [*self.worker, "rescore", "--policy", "moderation", "--since", since]
        print(f"  rescore to /dev/null, load {load_average()}", file=sys.stderr, flush=True)
        result = run([*command, "--out", "/dev/null"], self.env)
        label = f"worker rescore --since {since} --out /dev/null"
        if result.rc == 0:
            written = documents_written(result.stderr)
            self.note(
                label,
                f"{result.wall:.1f} s ({result.cpu:.0f} s CPU), {result.rss_mb:.0f} MB RSS, "
                f"{written:,} documents ({written / result.wall:,.0f}/s)",
            )
            return
        tail = result.stderr.strip().splitlines()[-1:] or [""]
        self.note(label, f"FAILED rc {result.rc} after {result.wall:.1f} s: {tail[0][:300]}")
        target = self.folder / "rescored.jsonl"
        print(f"  rescore to {target}, load {load_average()}", file=sys.stderr, flush=True)
        result = checked(run([*command, "--out", str(target)], self.env), "rescore")
        lines = sum(1 for _ in target.open("rb")) if target.exists() else 0
        size = target.stat().st_size if target.exists() else 0
        target.unlink(missing_ok=True)
        self.note(
            f"worker rescore --since {since} --out FILE",
            f"{result.wall:.1f} s ({result.cpu:.0f} s CPU), {result.rss_mb:.0f} MB RSS, "
            f"{lines:,} documents ({lines / result.wall:,.0f}/s), {size / 2**20:.0f} MB",
        )

    # ------------------------------------------------------------------ appends

    def time_appends(self, when: str) -> None:
        """The serving write path: ``EmbeddingStore.add`` (merge_insert on job_id) of
        --append-batches batches of --append-rows new rows, then one batch again."""
        from worker.store import EmbeddingStore

        args = self.args
        rng = np.random.default_rng(args.seed + 1 + time.time_ns() % 1000)
        store = EmbeddingStore(str(self.store_dir))
        times = []
        rows = []
        run_id = f"{time.time_ns():x}"
        for b in range(args.append_batches):
            rows = self.new_rows(f"append-{run_id}-{b:04d}", rng)
            started = time.perf_counter()
            inserted = store.add(rows)
            times.append(time.perf_counter() - started)
            assert inserted == len(rows), (inserted, len(rows))
        started = time.perf_counter()
        again = store.add(rows)  # redelivered: every job id there already
        redelivered = time.perf_counter() - started
        med = statistics.median(times)
        self.note(
            f"EmbeddingStore.add {when}: {args.append_batches} batches of {args.append_rows}",
            f"median {med * 1000:.0f} ms a batch (min {min(times) * 1000:.0f}, max "
            f"{max(times) * 1000:.0f}) = {args.append_rows / med:,.0f} rows/s; the last "
            f"batch again: {redelivered * 1000:.0f} ms, {again} inserted (load "
            f"{load_average()})",
        )

    def new_rows(self, prefix: str, rng: np.random.Generator) -> list[Any]:
        from worker.store import EmbeddingRow

        n = self.args.append_rows
        emb = embeddings(self.centres, centre_choices(self.layout, n, rng), rng)
        now = datetime.now(UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        rows = []
        for k in range(n):
            job = f"{prefix}-{k:05d}"
            uri = f"s3://bucket/uploads/{job}.jpg"
            sha = rng.bytes(32).hex()
            result = result_json(job, uri, sha, self.fingerprint, stamp)
            rows.append(
                EmbeddingRow(job, sha, self.fingerprint, emb[k], None, uri, now, METADATA, result)
            )
        return rows


def documents_written(stderr: str) -> int:
    found = re.search(r"(\d+) result documents written", stderr)
    return int(found.group(1)) if found else 0


if __name__ == "__main__":
    main()
