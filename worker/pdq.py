"""PDQ hashes of images, and hash lists to match them against (``kind: blocklist``).

PDQ is Meta's perceptual hash: 256 bits from the DCT of a 64x64 luma downsample, and a
quality from 0 to 100 (below 50 the hash is too unreliable to match on). Two pictures
are "the same" when the Hamming distance of their hashes is at most ``max_distance``
(31 by default, ThreatExchange's recommended threshold).

Hashes are written as ThreatExchange writes them: 64 lower-case hex digits, the first
digit holding bits 255..252 (``python-threatexchange``'s ``pdq_hasher``: the ``pdqhash``
vector read as one big-endian binary number). In memory a hash is 32 bytes, the hex
digits' bytes in order (``bytes.fromhex``), the packed form faiss's binary indexes use;
Hamming distance does not depend on the order as long as it is the same everywhere.

:func:`image_pdq` hashes the full-resolution, EXIF-rotated, RGB decode of the first
frame, as ``python-threatexchange`` and the Java reference do, not the reduced JPEG
"draft" decode the model gets. (The C++ ``pdq-photo-hasher`` squashes pictures larger
than 512 pixels to 512x512 first: its hashes of the same file differ by a few bits.)
Hashing is not cheap on large pictures: ``pdqhash`` builds the luma in float64, so a
24-megapixel photo takes about 2 s and 550 MB on top of its RGB pixels, and it holds the
GIL while its C++ part runs (0.3 s of a 12-megapixel hash).

A hash file (``pdq:`` in a blocklist policy) has one hash per line, optionally followed
by ``,id``; blank lines and lines starting with ``#`` are skipped; upper-case hex is
accepted. :func:`read_hash_list` reports every bad line as ``file:line: message``
(bounded like policy files); :func:`load_hash_list` adds a process-wide cache so an
unchanged file is not read again when policies reload.

Matching (:meth:`HashList.nearest`) is exact: a ``faiss.IndexBinaryFlat`` compares each
query with every listed hash (XOR + popcount, about 2 ms per query for a million
hashes on one core), so every hash within the distance is seen and the nearest one,
the first in file order on ties, is returned. Searching is thread-safe: the index is
built once, when the list is made, and searches only read it. Each search runs on the
calling thread only (faiss's OpenMP thread count is set to 1 for that thread): a
parallel region would leave an OpenMP thread pool behind, and a process forked after
that (Celery's prefork children) hangs in its first faiss search. Concurrency comes
from the callers' threads instead; faiss releases the GIL while it searches.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pdqhash  # type: ignore[import-untyped,unused-ignore]
from PIL import Image, UnidentifiedImageError

from worker.errors import ImageError, PolicyError, PolicyProblem
from worker.images import decode_first_frame, decoding_errors, to_rgb

HASH_BITS = 256
HASH_BYTES = HASH_BITS // 8
HEX_DIGITS = HASH_BITS // 4
#: Below this quality a hash is too unreliable to match on (ThreatExchange skips them):
#: the result still carries it, but no list is searched with it.
MIN_MATCH_QUALITY = 50
#: Longest ``,id`` after a hash, in characters.
MAX_ID_CHARS = 200
#: Largest hash file read (a million hashes with ids take about 100 MB).
MAX_HASH_FILE_BYTES = 512 << 20
#: Hash lists kept by :func:`load_hash_list` (one version per file).
CACHE_SIZE = 16

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_NOT_HEX = re.compile(r"[^0-9a-fA-F]")


# --------------------------------------------------------------------------- hashing


def bits_to_hex(bits: np.ndarray) -> str:
    """The canonical hex of ``pdqhash``'s 256-element 0/1 vector (bit 255 first)."""
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes().hex()


def pdq_of_image(image: Image.Image) -> tuple[str, int]:
    """PDQ hash (canonical hex) and quality of a decoded picture (converted to RGB)."""
    pixels = np.ascontiguousarray(np.asarray(to_rgb(image)), dtype=np.uint8)
    bits, quality = pdqhash.compute(pixels)
    return bits_to_hex(bits), int(quality)


def image_pdq(data: bytes) -> tuple[str, int]:
    """PDQ hash (64 lowercase hex digits, canonical as ThreatExchange writes it) and
    quality (0-100) of the full-resolution, EXIF-rotated RGB decode of ``data`` (the first
    frame of an animation). Raises :class:`ImageError` (``image_unreadable``, or
    ``image_too_large`` past Pillow's decompression-bomb limit) for bytes Pillow cannot
    decode. The size caps of :func:`worker.images.open_checked` are the caller's to apply
    (the worker has decoded, and so checked, the same bytes already)."""
    if not data:
        raise ImageError("the file is empty", code="image_unreadable")
    with decoding_errors():
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError("not a recognised image format", code="image_unreadable") from None
    rgb, _ = decode_first_frame(img, (img.format or "").upper(), None)
    del img
    return pdq_of_image(rgb)


def hex_to_bits(hex_hash: str) -> np.ndarray:
    """``(32,)`` uint8: the packed bits of a 64-hex-digit hash (either case).
    Raises ValueError for anything else."""
    if not isinstance(hex_hash, str) or _HEX64.fullmatch(hex_hash) is None:
        raise ValueError(f"not a PDQ hash (64 hex digits): {_short(str(hex_hash))!r}")
    return np.frombuffer(bytearray.fromhex(hex_hash), dtype=np.uint8)


def _short(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# --------------------------------------------------------------------------- matching


@dataclass(frozen=True, eq=False, repr=False)
class HashList:
    """The hashes of one hash file, in file order, with a Hamming index over them.

    Compared by identity (its arrays have no useful ``==``)."""

    path: Path
    sha256: str  # of the file's bytes
    ids: list[str]  # one per hash: the ``,id`` given, else f"{path.stem}:{line_number}"
    hashes: np.ndarray  # (n, 32) uint8, packed
    _index: Any = field(init=False, compare=False)

    def __post_init__(self) -> None:
        hashes = np.ascontiguousarray(self.hashes, dtype=np.uint8)
        if hashes.ndim != 2 or hashes.shape[1] != HASH_BYTES:
            raise ValueError(f"hashes must be (n, {HASH_BYTES}) uint8, not {hashes.shape}")
        if len(self.ids) != len(hashes):
            raise ValueError(f"{len(self.ids)} ids for {len(hashes)} hashes")
        index = faiss.IndexBinaryFlat(HASH_BITS)
        if len(hashes):
            index.add(hashes)
        object.__setattr__(self, "hashes", hashes)
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.ids)

    def __reduce__(self) -> tuple[type[HashList], tuple[Path, str, list[str], np.ndarray]]:
        """Pickled without the index (faiss objects do not pickle); rebuilt on load."""
        return (HashList, (self.path, self.sha256, self.ids, self.hashes))

    def __repr__(self) -> str:
        return f"HashList({str(self.path)!r}, {len(self)} hashes, sha256={self.sha256[:12]}…)"

    def nearest(self, hex_hashes: Sequence[str], max_distance: int) -> list[tuple[str, int] | None]:
        """For each query hash: ``(id, distance)`` of the nearest listed hash within
        ``max_distance`` (ties: the first in file order), or None. Exact (every listed
        hash is compared); raises ValueError for a query that is not a hash."""
        if not 0 <= max_distance <= HASH_BITS:
            raise ValueError(f"max_distance must be 0-{HASH_BITS}, not {max_distance}")
        if not hex_hashes:
            return []
        queries = np.stack([hex_to_bits(h) for h in hex_hashes])
        if not len(self):
            return [None] * len(queries)
        faiss.omp_set_num_threads(1)  # this thread only: no OpenMP pool, so fork-safe
        distances, labels = self._index.search(queries, 1)
        return [
            (self.ids[label], distance) if label >= 0 and distance <= max_distance else None
            for distance, label in zip(distances[:, 0].tolist(), labels[:, 0].tolist(), strict=True)
        ]


# --------------------------------------------------------------------------- hash files


def read_hash_list(path: Path) -> HashList:
    """Parse a hash file. Raises :class:`PolicyError` listing every problem as
    ``file:line: message`` (bounded like policy files): a line that is not 64 hex digits,
    an id that is empty, longer than :data:`MAX_ID_CHARS` or holds control characters;
    on line 0, a file that cannot be read, is too large or holds no hash."""
    return _read(path)[1]


def _read(path: Path) -> tuple[os.stat_result, HashList]:
    """The list and the status of the file it was read from (for the cache)."""
    # Imported here: the policy package imports this module (kind: blocklist).
    from worker.policy.yaml_reader import bound_problems, file_kind, read_capped

    def refuse(message: str) -> PolicyError:
        return PolicyError([PolicyProblem(str(path), 0, message)])

    try:
        status, data = read_capped(path, MAX_HASH_FILE_BYTES)
    except OSError as exc:
        raise refuse(f"cannot read the hash file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(status.st_mode):
        raise refuse(f"not a regular file ({file_kind(status.st_mode)}); a hash file must be one")
    if data is None or len(data) > MAX_HASH_FILE_BYTES:
        raise refuse(
            f"hash files are limited to {MAX_HASH_FILE_BYTES >> 20} MiB "
            f"(this one is {max(status.st_size, len(data or b'')):,} bytes); split it"
        )
    problems: list[PolicyProblem] = []
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        number = data.count(b"\n", 0, exc.start) + 1
        problems.append(
            PolicyProblem(
                str(path),
                number,
                f"not UTF-8: byte 0x{data[exc.start]:02x}; save the file as UTF-8",
            )
        )
        text = data.decode("utf-8-sig", errors="replace")
    hexes, ids, numbers = _parse_lines(path, text, problems)
    packed = _pack(hexes)
    if packed is None:  # some 64-character hash holds a character that is not hex
        for hex_part, number in zip(hexes, numbers, strict=True):
            if _HEX64.fullmatch(hex_part) is None:
                problems.append(PolicyProblem(str(path), number, _hash_problem(hex_part)))
        problems.sort(key=lambda p: p.line)
    if not problems and not hexes:
        problems.append(
            PolicyProblem(
                str(path),
                0,
                "no hashes in the file: write PDQ hashes one per line (64 hex digits, "
                "optionally followed by ',id')",
            )
        )
    if problems:
        raise PolicyError(bound_problems(problems))
    assert packed is not None
    digest = hashlib.sha256(data).hexdigest()
    return status, HashList(path, digest, ids, packed)


def _parse_lines(
    path: Path, text: str, problems: list[PolicyProblem]
) -> tuple[list[str], list[str], list[int]]:
    """The hex part, id and line number of every line that is a hash, in order; a
    problem added for every line that is neither that, blank nor a comment. Whether the
    hex parts are hex is checked later, all at once."""
    hexes: list[str] = []
    ids: list[str] = []
    numbers: list[int] = []
    stem = path.stem
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line[0] == "#":
            continue
        hex_part, comma, ident = line.partition(",")
        hex_part = hex_part.strip()
        if len(hex_part) != HEX_DIGITS:
            problems.append(PolicyProblem(str(path), number, _hash_problem(hex_part)))
            continue
        if comma:
            ident = ident.strip()
            message = _id_problem(ident)
            if message is not None:
                problems.append(PolicyProblem(str(path), number, message))
                continue
        else:
            ident = f"{stem}:{number}"
        hexes.append(hex_part)
        ids.append(ident)
        numbers.append(number)
    return hexes, ids, numbers


def _pack(hexes: list[str]) -> np.ndarray | None:
    """(n, 32) uint8 of 64-character strings, or None when one holds a non-hex character.
    ``bytes.fromhex`` skips whitespace, so a whitespace character shortens the result:
    n*64 characters giving exactly n*32 bytes are n*64 hex digits."""
    try:
        raw = bytes.fromhex("".join(hexes))
    except ValueError:
        return None
    if len(raw) != HASH_BYTES * len(hexes):
        return None
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(hexes), HASH_BYTES)


def _hash_problem(found: str) -> str:
    fix = "write one hash per line, optionally followed by ',id'"
    if len(found) == HEX_DIGITS:
        bad = _NOT_HEX.search(found)
        if bad is not None:
            return (
                f"not a PDQ hash: {bad.group()!r} at character {bad.start() + 1} of "
                f"{_short(found)!r} is not a hex digit; {fix}"
            )
    return (
        f"not a PDQ hash: expected 64 hex digits, found {_short(found)!r} "
        f"({len(found)} characters); {fix}"
    )


def _id_problem(ident: str) -> str | None:
    if not ident:
        return "empty id after ','; write 'HASH,ID' or just 'HASH'"
    if len(ident) > MAX_ID_CHARS:
        return f"id is {len(ident)} characters, over the limit of {MAX_ID_CHARS}; shorten it"
    if not ident.isprintable():
        return f"id {_short(ident)!r} has control or invisible characters; remove them"
    return None


# --------------------------------------------------------------------------- cache

_cache: OrderedDict[Path, tuple[tuple[int, int, int, int], HashList]] = OrderedDict()
_cache_lock = threading.Lock()


def _version(status: os.stat_result) -> tuple[int, int, int, int]:
    return (status.st_size, status.st_mtime_ns, status.st_ino, status.st_dev)


def load_hash_list(path: Path) -> HashList:
    """:func:`read_hash_list`, through a process-wide cache of the last
    :data:`CACHE_SIZE` files, keyed by resolved path, size, mtime and inode: policies
    reload whenever any policy file changes, and an unchanged hash file is not read again.
    A file replaced (rename over it) or rewritten is read again; a rewrite that keeps the
    size within one tick of the file system's clock is not seen. Thread-safe (one load
    at a time)."""
    resolved = path.resolve()
    with _cache_lock:
        try:
            current = _version(os.stat(resolved))
        except OSError:
            current = None
        cached = _cache.get(resolved)
        if cached is not None and cached[0] == current:
            _cache.move_to_end(resolved)
            return cached[1]
        _cache.pop(resolved, None)  # an old version: free it before reading the new one
        status, hash_list = _read(path)
        _cache[resolved] = (_version(status), hash_list)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
        return hash_list


def clear_cache() -> None:
    """Forget every cached hash list (tests, and to free memory)."""
    with _cache_lock:
        _cache.clear()
