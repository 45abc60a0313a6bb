"""PDQ hash lists at scale: loading a big hash file, matching against it, hashing a photo.

    python benchmarks/pdq_index.py [--hashes 1000000] [--queries 200] [--batch 32]

Writes a hash file of --hashes random PDQ hashes (once bare, once with ``,id`` on every
line) to a temporary folder and times ``read_hash_list`` on it (parse + the faiss
``IndexBinaryFlat`` built over it) and a cached ``load_hash_list``. Then ``nearest``
with --queries queries, half of them listed hashes with 0-31 bits flipped (matches) and
half random (no match): one query per call (median and p95), batches of --batch (per
image), and one query per call from two threads at once (per image, wall clock).
Last, ``image_pdq`` on a 1024x768 JPEG (full decode + hash) and ``pdq_of_image`` on
its decoded pixels (the hash alone).
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

import worker.policy.yaml_reader  # noqa: F401  imported by read_hash_list; not timed
from worker.pdq import (
    HASH_BITS,
    HashList,
    image_pdq,
    load_hash_list,
    pdq_of_image,
    read_hash_list,
)
from worker.policy.blocklist import DEFAULT_MAX_DISTANCE


def write_list(path: Path, hashes: np.ndarray, with_ids: bool) -> None:
    text = hashes.tobytes().hex()
    rows = (text[i : i + 64] for i in range(0, len(text), 64))
    if with_ids:
        rows = (f"{row},te-{n}" for n, row in enumerate(rows))
    path.write_text("\n".join(rows) + "\n")


def make_queries(hashes: np.ndarray, count: int, rng: np.random.Generator) -> list[str]:
    queries = []
    for k in range(count):
        if k % 2:
            queries.append(rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex())
            continue
        bits = np.unpackbits(hashes[rng.integers(len(hashes))])
        bits[rng.choice(HASH_BITS, int(rng.integers(0, DEFAULT_MAX_DISTANCE + 1)), False)] ^= 1
        queries.append(np.packbits(bits).tobytes().hex())
    return queries


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A textured picture (1/f^2 noise in colour), encoded as a q90 JPEG by the caller."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    freq = np.sqrt(fx**2 + fy**2)
    freq[0, 0] = 1.0
    channels = [
        np.fft.irfft2(freq**-2 * np.exp(2j * np.pi * rng.random(freq.shape)), s=(height, width))
        for _ in range(3)
    ]
    arr = np.stack(channels, axis=-1)
    arr = (arr - arr.mean()) / arr.std() * 50 + 128
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def time_nearest(hash_list: HashList, queries: list[str], batch: int) -> list[tuple[str, str]]:
    rows = []
    hash_list.nearest(queries[:20], DEFAULT_MAX_DISTANCE)  # warm up
    single = []
    for query in queries:
        started = time.perf_counter()
        hash_list.nearest([query], DEFAULT_MAX_DISTANCE)
        single.append(time.perf_counter() - started)
    single.sort()
    p95 = single[min(len(single) - 1, int(0.95 * len(single)))]
    rows.append(("nearest, 1 query a call: median", ms(statistics.median(single))))
    rows.append(("nearest, 1 query a call: p95", ms(p95)))

    per_image = []
    for start in range(0, len(queries) - batch + 1, batch):
        chunk = queries[start : start + batch]
        started = time.perf_counter()
        hash_list.nearest(chunk, DEFAULT_MAX_DISTANCE)
        per_image.append((time.perf_counter() - started) / len(chunk))
    rows.append((f"nearest, batches of {batch}: per image", ms(statistics.median(per_image))))

    def run(part: list[str]) -> None:
        for query in part:
            hash_list.nearest([query], DEFAULT_MAX_DISTANCE)

    threads = [threading.Thread(target=run, args=(queries[k::2],)) for k in range(2)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = (time.perf_counter() - started) / len(queries)
    rows.append(("nearest, 1 a call, 2 threads: per image", ms(wall)))
    found = hash_list.nearest(queries, DEFAULT_MAX_DISTANCE)
    matched = sum(match is not None for match in found[0::2])
    unmatched = sum(match is None for match in found[1::2])
    rows.append(
        (
            "  planted queries found / random unmatched",
            f"{matched}/{len(found[0::2])}, {unmatched}/{len(found[1::2])}",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    hashes = rng.integers(0, 256, size=(args.hashes, 32), dtype=np.uint8)
    queries = make_queries(hashes, args.queries, rng)
    rows: list[tuple[str, str]] = []

    with tempfile.TemporaryDirectory() as tmp:
        for with_ids in (False, True):
            path = Path(tmp) / ("with-ids.txt" if with_ids else "bare.txt")
            write_list(path, hashes, with_ids)
            size_mb = path.stat().st_size / 2**20
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            started = time.perf_counter()
            hash_list = read_hash_list(path)
            label = "with ',id'" if with_ids else "bare"
            rows.append(
                (
                    f"read_hash_list ({label}, {size_mb:.0f} MB)",
                    f"{time.perf_counter() - started:8.2f} s",
                )
            )
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if not with_ids:
                rows.append(
                    (
                        "  peak RSS growth while reading",
                        f"{(rss_after - rss_before) / 1024:5.0f} MB",
                    )
                )
                load_hash_list(path)
                started = time.perf_counter()
                load_hash_list(path)
                rows.append(
                    ("load_hash_list, unchanged (cached)", ms(time.perf_counter() - started))
                )
        rows.extend(time_nearest(hash_list, queries, args.batch))

    data = io.BytesIO()
    photo(1024, 768).save(data, format="JPEG", quality=90)
    jpeg = data.getvalue()
    decoded = Image.open(io.BytesIO(jpeg)).convert("RGB")
    cases: list[tuple[str, Callable[[], tuple[str, int]]]] = [
        ("image_pdq, 1024x768 JPEG (decode + hash)", lambda: image_pdq(jpeg)),
        ("pdq_of_image, 1024x768 decoded (hash only)", lambda: pdq_of_image(decoded)),
    ]
    for label, call in cases:
        call()
        times = []
        for _ in range(20):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        rows.append((label, ms(statistics.median(times))))

    print(
        f"{args.hashes:,} hashes, {args.queries} queries, faiss IndexBinaryFlat, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


if __name__ == "__main__":
    main()
