"""Peak RSS of `worker classify` on a normal photo vs on hostile image shapes.

    python benchmarks/hostile_rss.py [--keep DIR] [--budget]

Builds the tiny test CLIP as a ``local-dir`` checkpoint and a set of small hostile files
(100000x1 and 1x100000 strips, a 40000x40000 header, huge-aspect GIFs, iCCP / zTXt
zlib bombs, a 1000-page TIFF, truncated files, WebP canvas bombs, legal panoramas), then
runs ``python -m worker classify FILES --out FILE`` twice in a fresh process: once on a
4000x3000 JPEG and once on every hostile file together. Each run's peak RSS is the
child's ``VmHWM`` (read from ``/proc/self/status`` at exit) and, as a cross-check,
``ru_maxrss`` from ``wait4``. Acceptance: the hostile peak stays within 400 MB of the
normal-photo peak. ``--budget`` adds a third run on an 8000x8000 PNG and WebP (legal at the
default 64-megapixel cap, a few bytes each) to show what a legal maximum-size picture costs.

Everything heavy (torch, the model, big test pictures) is built in a helper process, so
this parent stays small and cannot inflate the children's ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

LIMIT_MB = 400.0
POLICY = """\
name: bench
kind: moderation
templates: simple
background: [a photo of nothing]
categories:
  - id: thing
    prompts: [a thing]
    threshold: 0.5
"""

# Runs `worker` in-process and writes the process's VmHWM (kB) to argv[1] at exit.
LAUNCHER = """\
import atexit, runpy, sys
out = sys.argv.pop(1)
def report():
    with open('/proc/self/status') as status:
        hwm = next(line.split()[1] for line in status if line.startswith('VmHWM:'))
    with open(out, 'w') as f:
        f.write(hwm)
atexit.register(report)
sys.argv[0] = 'worker'
runpy.run_module('worker', run_name='__main__', alter_sys=True)
"""


# ---------------------------------------------------------------------------- hostile files


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _zeros_deflated(size: int) -> bytes:
    z = zlib.compressobj(9)
    block = bytes(1 << 20)
    parts = [z.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + z.flush()


def png_bytes(width: int, height: int, extra: bytes = b"", rows: bool = True) -> bytes:
    """An 8-bit greyscale PNG of zeros; ``rows=False`` leaves out the image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = b""
    if rows:
        z = zlib.compressobj(9)
        row = bytes(1 + width)  # filter byte + pixels
        data = _chunk(b"IDAT", b"".join(z.compress(row) for _ in range(height)) + z.flush())
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + data + _chunk(b"IEND", b"")


def webp_vp8x_header(width: int, height: int) -> bytes:
    """A WebP whose VP8X chunk declares a ``width`` x ``height`` canvas (up to 2**24)."""
    body = bytes([0, 0, 0, 0]) + (width - 1).to_bytes(3, "little")
    body += (height - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def make_files(root: Path) -> None:
    """Helper process: the tiny model, the policy and every picture under ``root``."""
    import io

    import numpy as np
    from PIL import Image

    from worker.checkpoint import TINY_MODEL_CFG, build_untrained, save_checkpoint

    save_checkpoint(build_untrained(TINY_MODEL_CFG, seed=0), TINY_MODEL_CFG, root / "model")
    (root / "policies").mkdir()
    (root / "policies" / "bench.yaml").write_text(POLICY, encoding="utf-8")
    normal, hostile, budget = root / "normal", root / "hostile", root / "budget"
    for d in (normal, hostile, budget):
        d.mkdir()

    rng = np.random.default_rng(0)

    def photo(width: int, height: int) -> Image.Image:
        small = rng.integers(0, 255, (max(2, height // 100), max(2, width // 100), 3), np.uint8)
        return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)

    def save(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kwargs)
        return buf.getvalue()

    photo(4000, 3000).save(normal / "photo_4000x3000.jpg", quality=90)

    files: dict[str, bytes] = {
        "strip_100000x1.png": png_bytes(100_000, 1),
        "strip_1x100000.png": png_bytes(1, 100_000),
        "strip_30000x2.png": png_bytes(30_000, 2),  # under max_side, aspect 15000
        "header_40000x40000.png": png_bytes(40_000, 40_000, rows=False),
        "iccp_bomb.png": png_bytes(
            64, 64, _chunk(b"iCCP", b"icc\x00\x00" + _zeros_deflated(256 << 20))
        ),
        "ztxt_bomb.png": png_bytes(
            64, 64, _chunk(b"zTXt", b"Comment\x00\x00" + _zeros_deflated(256 << 20))
        ),
        "strip_40000x1.gif": save(Image.new("P", (40_000, 1)), "GIF"),
        "strip_20000x2.gif": save(Image.new("P", (20_000, 2)), "GIF"),
        "webp_canvas_16777216x16777216.webp": webp_vp8x_header(1 << 24, 1 << 24),
        # 81 megapixels of one colour: a few dozen bytes of lossless WebP
        "webp_9000x9000.webp": save(Image.new("RGB", (9000, 9000)), "WEBP", lossless=True),
        # legal extreme shapes: decoded and scored
        "panorama_16000x320.jpg": save(photo(16_000, 320), "JPEG", quality=85),
        "strip_2000x40.png": save(photo(2000, 40), "PNG"),  # upscaled by the model input
        "animated_1000x20.gif": save(
            Image.new("P", (1000, 20)),
            "GIF",
            save_all=True,
            append_images=[Image.new("P", (1000, 20), i) for i in range(1, 50)],
        ),
    }
    pages = [Image.new("L", (1, 1), i % 256) for i in range(1000)]
    files["pages_1000.tif"] = save(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    good_png = save(photo(640, 480), "PNG")
    good_jpg = save(photo(640, 480), "JPEG")
    good_webp = save(photo(640, 480), "WEBP")
    files["truncated.png"] = good_png[: len(good_png) // 2]
    files["truncated.jpg"] = good_jpg[: len(good_jpg) // 2]
    files["truncated.webp"] = good_webp[: len(good_webp) // 2]
    for name, data in files.items():
        (hostile / name).write_bytes(data)
    # A legal picture at the default pixel cap, in a tiny file (informational run).
    (budget / "solid_8000x8000.png").write_bytes(png_bytes(8000, 8000))
    (budget / "solid_8000x8000.webp").write_bytes(
        save(Image.new("RGB", (8000, 8000)), "WEBP", lossless=True)
    )


# ---------------------------------------------------------------------------- measuring


def classify_peak(root: Path, files: list[Path], label: str) -> float:
    """Run `worker classify` on ``files`` in a fresh process; its peak RSS in MB."""
    env = dict(os.environ)
    env.update(
        {
            "WORKER_MODEL__NAME": f"local-dir:{root / 'model'}",
            "WORKER_DEVICE": "cpu",
            "WORKER_CACHE_DIR": str(root / "cache"),
            "WORKER_POLICY_DIR": str(root / "policies"),
            "WORKER_LOG_FORMAT": "json",
        }
    )
    hwm_file = root / f"{label}.hwm"
    out = root / f"{label}.jsonl"
    argv = [sys.executable, "-c", LAUNCHER, str(hwm_file), "classify"]
    argv += [str(f) for f in files] + ["--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    maxrss_mb = usage.ru_maxrss / 1024  # kB on Linux
    hwm_mb = int(hwm_file.read_text()) / 1024 if hwm_file.exists() else float("nan")
    print(f"\n== {label}: {len(files)} file(s), exit {proc.returncode}, {seconds:.1f} s")
    if proc.returncode < 0:
        print(f"   killed by signal {-proc.returncode}")
    if out.exists():
        for line in out.read_text(encoding="utf-8").splitlines():
            result = json.loads(line)
            name = Path(result["image"]["uri"]).name
            if result["status"] == "ok":
                print(f"   {name:<40} ok")
            else:
                error = result["error"]
                print(f"   {name:<40} {error['code']}: {error['message'][:90]}")
    elif stderr:
        print(stderr.decode(errors="replace")[-2000:])
    print(f"   peak RSS {hwm_mb:.0f} MB (VmHWM), ru_maxrss {maxrss_mb:.0f} MB")
    return maxrss_mb if math.isnan(hwm_mb) else hwm_mb  # NaN when the child died


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="Build the files here and keep them.")
    parser.add_argument(
        "--budget", action="store_true", help="Also run the 8000x8000 PNG and WebP."
    )
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare is not None:
        make_files(args.prepare)
        return 0
    with tempfile.TemporaryDirectory(prefix="hostile-rss-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--prepare", str(root)], check=True)
        normal = classify_peak(root, sorted((root / "normal").iterdir()), "normal")
        hostile = classify_peak(root, sorted((root / "hostile").iterdir()), "hostile")
        budget = (
            classify_peak(root, sorted((root / "budget").iterdir()), "budget")
            if args.budget
            else None
        )
    diff = hostile - normal
    print(f"\nnormal photo peak : {normal:8.0f} MB")
    print(f"hostile set peak  : {hostile:8.0f} MB")
    print(f"difference        : {diff:+8.0f} MB (limit +{LIMIT_MB:.0f} MB)")
    if budget is not None:
        print(f"8000x8000 PNG+WebP: {budget:8.0f} MB (legal at the default pixel cap)")
    ok = diff <= LIMIT_MB
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
