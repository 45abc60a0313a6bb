"""PDQ hashes and hash lists (worker.pdq): the hex matches ThreatExchange's, hash files
are parsed with ``file:line`` problems, and nearest() is exact."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import pickle
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pdqhash  # type: ignore[import-untyped,unused-ignore]
import pytest
from PIL import Image, ImageEnhance, ImageOps

from tests.synthetic import textured_photo
from worker import pdq
from worker.errors import ImageError, PolicyError
from worker.images import decode_image
from worker.pdq import (
    HASH_BITS,
    HashList,
    bits_to_hex,
    hex_to_bits,
    image_pdq,
    load_hash_list,
    pdq_of_image,
    read_hash_list,
)
from worker.policy.blocklist import DEFAULT_MAX_DISTANCE
from worker.policy.yaml_reader import MAX_PROBLEMS_PER_FILE

DATA = Path(__file__).resolve().parent.parent / "data" / "pdq"


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    pdq.clear_cache()
    yield
    pdq.clear_cache()


# --------------------------------------------------------------------------- pictures


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        kwargs.setdefault("compress_level", 1)
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def crop_centre(img: Image.Image, fraction: float) -> Image.Image:
    """``fraction`` of the width and of the height cut off, half on each side."""
    dx, dy = round(img.width * fraction / 2), round(img.height * fraction / 2)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


def distance(a: str, b: str) -> int:
    return int(np.unpackbits(hex_to_bits(a) ^ hex_to_bits(b)).sum())


# --------------------------------------------------------------------------- canonical hex

#: Published hashes of the files in tests/data/pdq (sources in its README.md).
REFERENCE_HASHES = {
    # python-threatexchange tests/hashing/test_pdq_hasher.py (pdqhash + PIL), with quality
    "rgb.jpeg": ("fb4eed46cb8a6c78819ca06b756c541f7b07ef6d02c82fccd00f862166272cda", 100),
    "random.png": ("ad64cd9875e131a177b1f2a0d6b38ae1de9ea80421e4c51dde1b0363deba3466", None),
    # pdq/python/README.md: the pure-Python PDQ implementation (no pdqhash), with quality
    "square-128x128.jpg": ("d8f8f1eec0f4a84f0e37022a078f63f0b36e2ed596621e1d33e6239c4e9c9b22", 100),
    "square-256x256.jpg": ("d8f8f0cec4f4a84f0637022a078f67f0b36e2ee5b6621e1d33e6239c4e9c9b22", 100),
    "shrink-a-lot.jpg": ("d0f8f1ccc0f4a84d0a370a3a228f67f0b36e2ed5b6623e1d33e6339c4e9c9b22", 100),
    # pdq/java/src/test/java/hasher/pdqhashing/PDQHasherTest.java
    "bridge-1-original.jpg": (
        "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22",
        None,
    ),
}
#: pdq/cpp/bin/README.md: the C++ pdq-photo-hasher, which squashes the picture to
#: 512x512 (CImg, nearest neighbour) before hashing, so it is a few bits off.
CPP_BRIDGE = "f8f8f0cce0f4e84d0e370a22028f67f0b36e2ed596623e1d33e6339c4e9c9b22"


@pytest.mark.parametrize("name", sorted(REFERENCE_HASHES))
def test_hex_matches_the_reference_implementations(name: str) -> None:
    expected, quality = REFERENCE_HASHES[name]
    got, got_quality = image_pdq((DATA / name).read_bytes())
    assert got == expected
    if quality is not None:
        assert got_quality == quality


def test_the_cpp_reference_is_within_its_own_tolerance() -> None:
    # pdq/README.md: implementations are "correct" when hashes of quality >= 80 are within
    # distance 10 of the C++ reference's.
    got, quality = image_pdq((DATA / "bridge-1-original.jpg").read_bytes())
    assert quality >= 80
    assert distance(got, CPP_BRIDGE) <= 10


def threatexchange_hex(bits: np.ndarray) -> str:
    """python-threatexchange's pdq_hasher._pdq_from_numpy_array: its own expression."""
    bin_str = "".join(str(int(x)) for x in bits)
    return ("%0*X" % ((len(bin_str) + 3) // 4, int(bin_str, 2))).lower()  # noqa: UP031


def test_bits_to_hex_is_threatexchanges_conversion() -> None:
    rng = np.random.default_rng(1)
    vectors = [rng.integers(0, 2, HASH_BITS), np.zeros(HASH_BITS, int), np.ones(HASH_BITS, int)]
    vectors.append(np.r_[np.zeros(12, int), rng.integers(0, 2, HASH_BITS - 12)])  # leading 0s
    for bits in vectors:
        assert bits_to_hex(bits) == threatexchange_hex(bits)
        assert np.array_equal(np.unpackbits(hex_to_bits(bits_to_hex(bits))), bits)


def test_hex_to_bits() -> None:
    text = "0123456789abcdef" * 4
    bits = hex_to_bits(text)
    assert bits.shape == (32,)
    assert bits.dtype == np.uint8
    assert bits.tobytes() == bytes.fromhex(text)
    assert np.array_equal(hex_to_bits(text.upper()), bits)
    for bad in ("", text[:-1], text + "0", "g" + text[1:], "01 23" + text[5:], " " + text[1:]):
        with pytest.raises(ValueError, match="64 hex digits"):
            hex_to_bits(bad)


# --------------------------------------------------------------------------- image_pdq


def test_exif_rotation_is_applied() -> None:
    img = textured_photo(3, (240, 160))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated_file = encode(img, "JPEG", quality=92, exif=exif.tobytes())
    plain_file = encode(img, "JPEG", quality=92)
    stored = Image.open(io.BytesIO(plain_file)).convert("RGB")  # the same decoded pixels
    upright = encode(stored.transpose(Image.Transpose.ROTATE_270))  # lossless PNG
    assert Image.open(io.BytesIO(upright)).size == (160, 240)
    assert image_pdq(rotated_file) == image_pdq(upright)
    assert image_pdq(rotated_file) != image_pdq(plain_file)


def test_full_resolution_decode_not_the_draft() -> None:
    data = encode(textured_photo(7, (1600, 1200)), "JPEG", quality=90)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    bits, quality = pdqhash.compute(full)
    assert image_pdq(data) == (bits_to_hex(bits), quality)
    draft = decode_image(data, max_pixels=10**8, allowed_formats=["JPEG"], draft_size=(224, 224))
    assert draft.image.size == (400, 300)
    assert pdq_of_image(draft.image)[0] != image_pdq(data)[0]


def test_first_frame_and_modes() -> None:
    frames = [textured_photo(seed, (96, 96)) for seed in (11, 12)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    first = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    assert image_pdq(buf.getvalue()) == pdq_of_image(first)
    grey = textured_photo(13).convert("L")
    assert image_pdq(encode(grey)) == pdq_of_image(grey.convert("RGB"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"not an image at all" * 10, "not a recognised image format"),
        (encode(textured_photo(1), "JPEG")[:300], "corrupt or truncated"),
    ],
)
def test_undecodable_bytes_are_image_errors(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message) as info:
        image_pdq(data)
    assert info.value.code == "image_unreadable"


# --------------------------------------------------------------------------- hash files

H = [bits_to_hex(np.random.default_rng(seed).integers(0, 2, HASH_BITS)) for seed in range(6)]


def write(tmp_path: Path, text: str | bytes, name: str = "list.txt") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def test_good_file(tmp_path: Path) -> None:
    text = (
        "\ufeff# shared by a hash-sharing programme\n"
        f"{H[0]},te-123\n"
        "\n"
        f"  {H[1].upper()}  \r\n"
        "   \n"
        f"{H[2]} , case 7, second part\n"
        "# the end\n"
        f"{H[3]}"
    )
    path = write(tmp_path, text, "known.pdq")
    hash_list = read_hash_list(path)
    assert len(hash_list) == 4
    assert hash_list.ids == ["te-123", "known:4", "case 7, second part", "known:8"]
    assert hash_list.hashes.shape == (4, 32)
    assert hash_list.hashes.dtype == np.uint8
    assert [row.tobytes().hex() for row in hash_list.hashes] == H[:4]
    assert hash_list.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert hash_list.path == path
    assert "4 hashes" in repr(hash_list)


def problems_of(path: Path) -> list[tuple[int, str]]:
    with pytest.raises(PolicyError) as info:
        read_hash_list(path)
    for problem in info.value.problems:
        assert problem.path == str(path)
    assert str(info.value).startswith(f"{path}:")
    return [(p.line, p.message) for p in info.value.problems]


@pytest.mark.parametrize(
    ("line", "needles"),
    [
        ("abc123", ["expected 64 hex digits", "'abc123' (6 characters)", "one hash per line"]),
        (H[0] + "00", ["expected 64 hex digits", "(66 characters)"]),
        ("g" + H[0][1:], ["'g' at character 1", "is not a hex digit", "one hash per line"]),
        (H[0][:10] + " " + H[0][11:], ["' ' at character 11", "not a hex digit"]),
        (H[0][:10] + "\u0660" + H[0][11:], ["at character 11", "not a hex digit"]),
        (f"{H[0]},", ["empty id", "'HASH,ID'"]),
        (f"{H[0]}, ", ["empty id"]),
        (f"{H[0]},{'x' * 201}", ["201 characters", "limit of 200", "shorten"]),
        (f"{H[0]},bad\x07id", ["control", "remove"]),
        (f"{H[0]} # inline comment", ["expected 64 hex digits"]),
    ],
)
def test_each_bad_line_names_its_line_and_the_fix(
    tmp_path: Path, line: str, needles: list[str]
) -> None:
    path = write(tmp_path, f"# header\n{H[1]}\n\n{line}\n{H[2]}\n")
    [(number, message)] = problems_of(path)
    assert number == 4
    for needle in needles:
        assert needle in message


def test_every_problem_is_reported_in_line_order(tmp_path: Path) -> None:
    lines = [H[0], "zz" * 32, "short", f"{H[1]},", H[2], f"{H[3]},ok", "q" * 64]
    problems = problems_of(write(tmp_path, "\n".join(lines)))
    assert [number for number, _ in problems] == [2, 3, 4, 7]


def test_problems_are_bounded(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, "\n".join(["nope"] * 100)))
    assert len(problems) == MAX_PROBLEMS_PER_FILE + 1
    assert problems[-1] == (MAX_PROBLEMS_PER_FILE + 1, "… and 80 more problems here")


def test_whole_file_problems_are_on_line_zero(tmp_path: Path) -> None:
    [(line, message)] = problems_of(tmp_path / "missing.txt")
    assert line == 0
    assert "cannot read the hash file" in message
    assert "No such file" in message
    for text in ("", "\n\n", "# only a comment\n   \n"):
        [(line, message)] = problems_of(write(tmp_path, text))
        assert line == 0
        assert "no hashes in the file" in message
    [(line, message)] = problems_of(tmp_path)
    assert line == 0
    assert "not a regular file (a directory)" in message


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, f"{H[0]}\n{H[1]},caf\xe9\n".encode("latin-1")))
    assert problems[0][0] == 2
    assert "not UTF-8" in problems[0][1]


def test_a_large_file(tmp_path: Path) -> None:
    # benchmarks/pdq_index.py times a million lines; here: right at size, in a second
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, size=(200_000, 32), dtype=np.uint8)
    text = raw.tobytes().hex()
    path = write(tmp_path, "\n".join(text[i : i + 64] for i in range(0, len(text), 64)))
    hash_list = read_hash_list(path)
    assert np.array_equal(hash_list.hashes, raw)
    assert hash_list.ids[-1] == "list:200000"


# --------------------------------------------------------------------------- nearest


def brute_nearest(
    hashes: np.ndarray, queries: np.ndarray, max_distance: int
) -> list[tuple[int, int] | None]:
    """(index, distance) of the first hash at the smallest distance, by numpy."""
    distances = np.unpackbits(queries[:, None, :] ^ hashes[None, :, :], axis=-1).sum(-1)
    best = distances.argmin(axis=1)  # the first of equal minima
    return [
        (int(i), int(d)) if d <= max_distance else None
        for i, d in zip(best, distances[np.arange(len(queries)), best], strict=True)
    ]


def flip(bits: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    unpacked = np.unpackbits(bits)
    where = rng.choice(HASH_BITS, size=count, replace=False)
    unpacked[where] ^= 1
    return np.packbits(unpacked)


def random_list(n: int, seed: int) -> tuple[HashList, np.random.Generator]:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    hashes[1500] = hashes[700]  # exact duplicates: the first in file order wins
    hashes[2900] = hashes[700]
    hashes[2000] = hashes[10]
    ids = [f"item-{i}" for i in range(n)]
    return HashList(Path("random.txt"), "0" * 64, ids, hashes), rng


def test_nearest_agrees_with_brute_force(tmp_path: Path) -> None:
    hash_list, rng = random_list(3000, seed=2)
    hashes = hash_list.hashes
    queries = [hashes[700], hashes[2000], hashes[1500]]
    for d in (0, 1, 5, 15, 30, 31, 32, 33, 40, 64):
        for row in rng.choice(len(hashes), size=8, replace=False):
            queries.append(flip(hashes[row], d, rng))
    # an equidistant pair: two listed hashes each exactly 20 bits from one query
    query = rng.integers(0, 256, size=32, dtype=np.uint8)
    bits = np.unpackbits(query)
    far_a, far_b = bits.copy(), bits.copy()
    far_a[:20] ^= 1
    far_b[20:40] ^= 1
    hashes[400], hashes[2500] = np.packbits(far_a), np.packbits(far_b)
    hash_list = HashList(hash_list.path, hash_list.sha256, hash_list.ids, hashes)
    queries.append(query)
    queries.extend(rng.integers(0, 256, size=(50, 32), dtype=np.uint8))  # unrelated
    stacked = np.stack(queries)
    hexes = [q.tobytes().hex() for q in stacked]
    for max_distance in (0, 10, 30, DEFAULT_MAX_DISTANCE, 32, HASH_BITS):
        expected = brute_nearest(hashes, stacked, max_distance)
        got = hash_list.nearest(hexes, max_distance)
        assert got == [None if e is None else (f"item-{e[0]}", e[1]) for e in expected]
    got = hash_list.nearest(hexes, DEFAULT_MAX_DISTANCE)
    assert got[:3] == [("item-700", 0), ("item-10", 0), ("item-700", 0)]
    assert got[len(queries) - 51] == ("item-400", 20)
    # distance exactly max_distance is in, one more is out
    on_edge = flip(hashes[123], 31, rng).tobytes().hex()
    assert hash_list.nearest([on_edge], 31) == [("item-123", 31)]
    assert hash_list.nearest([on_edge], 30) == [None]
    # one query at a time gives the same as a batch
    assert [hash_list.nearest([h], 31)[0] for h in hexes] == got


def test_nearest_edges() -> None:
    empty = HashList(Path("empty.txt"), "0" * 64, [], np.zeros((0, 32), np.uint8))
    assert len(empty) == 0
    assert empty.nearest([H[0], H[1]], 31) == [None, None]
    one = HashList(Path("one.txt"), "0" * 64, ["only"], hex_to_bits(H[0])[None, :])
    assert one.nearest([], 31) == []
    assert one.nearest([H[0].upper()], 0) == [("only", 0)]
    with pytest.raises(ValueError, match="64 hex digits"):
        one.nearest(["xyz"], 31)
    with pytest.raises(ValueError, match="max_distance"):
        one.nearest([H[0]], -1)
    with pytest.raises(ValueError, match="ids for"):
        HashList(Path("bad.txt"), "0" * 64, ["a", "b"], hex_to_bits(H[0])[None, :])


def test_pickles_without_its_index() -> None:
    hash_list, _ = random_list(3000, seed=6)
    copy = pickle.loads(pickle.dumps(hash_list))
    assert copy.ids == hash_list.ids
    assert np.array_equal(copy.hashes, hash_list.hashes)
    query = [hash_list.hashes[42].tobytes().hex()]
    assert copy.nearest(query, 31) == hash_list.nearest(query, 31) == [("item-42", 0)]


def test_nearest_from_several_threads() -> None:
    hash_list, rng = random_list(20_000, seed=3)
    queries = [flip(hash_list.hashes[i], int(i % 40), rng).tobytes().hex() for i in range(400)]
    expected = hash_list.nearest(queries, 31)
    results: dict[int, list[tuple[str, int] | None]] = {}

    def run(k: int) -> None:
        results[k] = [hash_list.nearest([q], 31)[0] for q in queries[k::4]]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k in range(4):
        assert results[k] == expected[k::4]


def _search_in_child(hash_list: HashList, query: str) -> None:
    assert hash_list.nearest([query], 31) == [("item-5", 0)]


def test_a_process_forked_after_searching_can_search() -> None:
    # an OpenMP thread pool in the parent would hang the child's first search
    hash_list, _ = random_list(3000, seed=4)
    query = hash_list.hashes[5].tobytes().hex()
    assert hash_list.nearest([query] * 64, 31)[0] == ("item-5", 0)
    child = multiprocessing.get_context("fork").Process(
        target=_search_in_child, args=(hash_list, query)
    )
    child.start()
    child.join(timeout=30)
    if child.exitcode is None:
        child.kill()
        child.join()
        pytest.fail("the forked child hung in its first faiss search")
    assert child.exitcode == 0


# --------------------------------------------------------------------------- altered copies

ALTERATIONS: dict[str, Callable[[Image.Image], bytes]] = {
    "jpeg q40": lambda img: encode(img, "JPEG", quality=40),
    "resized 60%": lambda img: encode(
        img.resize((round(img.width * 0.6), round(img.height * 0.6)), Image.Resampling.BILINEAR)
    ),
    "cropped 8%": lambda img: encode(crop_centre(img, 0.08)),
    "brightness +30%": lambda img: encode(ImageEnhance.Brightness(img).enhance(1.3)),
    "mirrored": lambda img: encode(ImageOps.mirror(img)),
}


def test_altered_copies_are_found(tmp_path: Path) -> None:
    originals = [textured_photo(seed) for seed in range(40)]
    hashed = [image_pdq(encode(img)) for img in originals]
    assert min(quality for _, quality in hashed) >= 50
    lines = [f"{h},original-{i}" for i, (h, _) in enumerate(hashed)]
    hash_list = read_hash_list(write(tmp_path, "\n".join(lines) + "\n"))

    print(f"\nPDQ distance of altered copies to their original ({len(originals)} pictures):")
    for name, alter in ALTERATIONS.items():
        copies = [image_pdq(alter(img))[0] for img in originals]
        distances = [distance(c, h) for c, (h, _) in zip(copies, hashed, strict=True)]
        within = [i for i, d in enumerate(distances) if d <= DEFAULT_MAX_DISTANCE]
        found = hash_list.nearest([copies[i] for i in within], DEFAULT_MAX_DISTANCE)
        recalled = sum(
            match is not None and match[0] == f"original-{i}"
            for i, match in zip(within, found, strict=True)
        )
        print(
            f"  {name:16} distance min {min(distances):3} median {int(np.median(distances)):3} "
            f"max {max(distances):3}; PDQ puts {len(within):2}/{len(originals)} within "
            f"{DEFAULT_MAX_DISTANCE}; the index finds {recalled}/{len(within)} of those"
        )
        if within:
            assert recalled / len(within) >= 0.95
        if name in ("jpeg q40", "resized 60%"):
            assert len(within) >= 0.9 * len(originals)  # PDQ's own robustness, for scale

    unrelated = [pdq_of_image(textured_photo(1000 + seed))[0] for seed in range(200)]
    assert hash_list.nearest(unrelated, DEFAULT_MAX_DISTANCE) == [None] * 200


# --------------------------------------------------------------------------- cache


def test_load_hash_list_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    path = write(tmp_path, f"{H[0]}\n")
    first = load_hash_list(path)
    assert load_hash_list(path) is first
    assert load_hash_list(tmp_path / "." / "list.txt") is first  # the resolved path

    write(tmp_path, f"{H[1]},changed\n")  # rewritten in place, another size
    second = load_hash_list(path)
    assert second is not first
    assert second.ids == ["changed"]
    assert load_hash_list(path) is second

    write(tmp_path, f"{H[2]},changed\n")  # the same size: the mtime tells
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    third = load_hash_list(path)
    assert third is not second
    assert third.hashes[0].tobytes().hex() == H[2]

    replacement = write(tmp_path, f"{H[3]},renamed\n", "next.txt")  # renamed over it
    os.replace(replacement, path)
    assert load_hash_list(path).ids == ["renamed"]


def test_load_hash_list_reports_problems_and_does_not_cache_them(tmp_path: Path) -> None:
    path = write(tmp_path, "nonsense\n")
    with pytest.raises(PolicyError):
        load_hash_list(path)
    write(tmp_path, f"{H[0]}\n")
    assert len(load_hash_list(path)) == 1
    with pytest.raises(PolicyError, match="cannot read"):
        load_hash_list(tmp_path / "missing.txt")


def test_load_hash_list_from_threads_loads_once(tmp_path: Path) -> None:
    path = write(tmp_path, "\n".join(H) + "\n")
    results: list[HashList] = []
    threads = [
        threading.Thread(target=lambda: results.append(load_hash_list(path))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert all(result is results[0] for result in results)
