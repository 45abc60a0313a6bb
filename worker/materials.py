"""The images and hash files a policy lists, gathered for compiling it.

Exemplars, background exemplars and a blocklist's known images are paths (relative to
the policy file's folder), globs or URIs. Each is fetched through the worker's sources
(the byte cap, then the same header guards and decode as a job's image: JPEG draft mode,
an animation's frames pooled), embedded once and cached by sha256, decode and model
fingerprint in the image-embedding cache ``worker eval`` uses, so only new images reach
the image tower. Policy files are the operator's configuration: their paths are not held
to ``WORKER_FILE_ROOTS``, which bounds what *jobs* may read.

Hash files (``pdq:``) are read with :func:`worker.pdq.load_hash_list`, which keeps an
unchanged file's parsed list and index across reloads.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from worker.documents import ImageRef
from worker.embedding_cache import EmbeddingCache
from worker.engine import DecodeOptions
from worker.errors import JobError, PolicyError, PolicyProblem
from worker.fetcher import ImageFetcher, uri_scheme
from worker.model import LoadedModel
from worker.plugins import PluginContext, make_sources
from worker.policy.heads import ImageItem
from worker.policy.loading import LoadedPolicy
from worker.policy.policyset import CACHE_FILE
from worker.settings import Settings
from worker.tuning.embedder import embed_files

_GLOB_CHARS = frozenset("*?[")


def _local(ref: str, base: Path) -> Path:
    path = Path(os.path.expanduser(ref))
    return path if path.is_absolute() else base / path


def expand_ref(ref: str, base: Path) -> list[tuple[str, str]]:
    """``(id, uri)`` of every image ``ref`` names: a URI as it is (its id the stem of its
    path), a local path or glob resolved against ``base``. Raises ValueError saying why
    it names nothing."""
    if uri_scheme(ref) not in {"", "file"}:
        stem = PurePosixPath(urlsplit(ref).path).stem
        if not stem:
            raise ValueError("a URI must name a file (its stem is the item id)")
        return [(stem, ref)]
    raw = ref.removeprefix("file://")
    path = _local(raw, base)
    if _GLOB_CHARS & set(raw) and not path.is_file():  # a file named like a pattern is a file
        # The pattern is matched below the policy folder (root_dir), so brackets or stars
        # in the folder's own path are not read as a pattern.
        pattern = os.path.expanduser(raw)
        root = None if os.path.isabs(pattern) else base
        matches = glob.glob(pattern, root_dir=root, recursive=True)
        found = sorted(p for p in (_local(m, base) for m in matches) if p.is_file())
        if not found:
            raise ValueError(f"the pattern matches no file (looked for {path})")
        return [(p.stem, str(p)) for p in found]
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return [(path.stem, str(path))]


def _stat_line(path: Path) -> str:
    try:
        status = path.stat()
    except OSError as exc:
        return f"{path}:<{exc.errno}>"
    return f"{path}:{status.st_size}:{status.st_mtime_ns}:{status.st_ino}"


def listed_files_signature(loaded: Iterable[LoadedPolicy]) -> str:
    """sha256 over the size, mtime and inode of every local file the policies list (hash
    files, images, what each glob matches now): the policy watcher reloads when it changes.
    Remote images (``s3://``, ``https://``) are read again on the next reload."""
    digest = hashlib.sha256()
    for item in loaded:
        base = item.path.parent
        for ref in item.policy.hash_refs():
            digest.update(_stat_line(_local(ref, base)).encode() + b"\0")
        for ref in item.policy.image_refs():
            if uri_scheme(ref) not in {"", "file"}:
                continue
            try:
                paths = [Path(uri) for _, uri in expand_ref(ref, base)]
            except ValueError:
                paths = []
            digest.update(f"{ref}:{len(paths)}\0".encode())
            for path in paths:
                digest.update(_stat_line(path).encode() + b"\0")
    return digest.hexdigest()


def _problem(loaded: LoadedPolicy, message: str) -> PolicyProblem:
    return PolicyProblem(str(loaded.path), loaded.line, f"policy {loaded.name!r}: {message}")


def resolve_listed(
    loaded: LoadedPolicy,
) -> tuple[dict[str, list[tuple[str, str]]], dict[str, Any]]:
    """What ``loaded``'s policy lists, without the model: each image reference's
    ``(id, uri)`` pairs (globs expanded) and each hash file parsed. Raises PolicyError
    with every reference that names nothing and every bad line of a hash file
    (`worker policies check` reports them too)."""
    from worker.pdq import load_hash_list

    problems: list[PolicyProblem] = []
    base = loaded.path.parent
    expanded: dict[str, list[tuple[str, str]]] = {}
    for ref in loaded.policy.image_refs():
        try:
            expanded[ref] = expand_ref(ref, base)
        except ValueError as exc:
            problems.append(_problem(loaded, f"{ref!r}: {exc}"))
    hash_lists: dict[str, Any] = {}
    for ref in loaded.policy.hash_refs():
        try:
            hash_lists[ref] = load_hash_list(_local(ref, base))
        except PolicyError as exc:
            problems.extend(exc.problems)
    if problems:
        raise PolicyError(problems)
    return expanded, hash_lists


class MaterialsGatherer:
    """Gathers, for one policy at a time, the images and hash lists it lists."""

    def __init__(self, settings: Settings, model: LoadedModel) -> None:
        self.settings = settings
        self.model = model
        self.fetcher = ImageFetcher(
            make_sources(PluginContext(settings=settings, service=False)),
            settings.image.max_bytes,
        )

    def gather(self, loaded: LoadedPolicy) -> tuple[dict[str, list[ImageItem]], dict[str, Any]]:
        """(images by reference, hash lists by reference) of ``loaded``'s policy; raises
        PolicyError naming the policy file and every reference that fails."""
        expanded, hash_lists = resolve_listed(loaded)
        images = self._embed(loaded, expanded) if expanded else {}
        return images, hash_lists

    def _embed(
        self, loaded: LoadedPolicy, expanded: Mapping[str, Sequence[tuple[str, str]]]
    ) -> dict[str, list[ImageItem]]:
        uris = list(dict.fromkeys(uri for pairs in expanded.values() for _, uri in pairs))
        cache = EmbeddingCache(
            self.settings.cache_dir / CACHE_FILE, self.model.fingerprint, kind="image"
        )
        try:
            embedded = embed_files(
                self.model,
                uris,
                cache,
                DecodeOptions.from_settings(self.settings.image, self.model),
                read=lambda uri: self.fetcher.fetch(ImageRef(uri=uri)),
            )
        except JobError as exc:
            raise PolicyError([_problem(loaded, exc.message)]) from None
        finally:
            cache.close()
        vectors = dict(zip(uris, embedded.per_file_mean(), strict=True))
        digests = dict(zip(uris, embedded.sha256s, strict=True))
        return {
            ref: [ImageItem(item_id, digests[uri], vectors[uri]) for item_id, uri in pairs]
            for ref, pairs in expanded.items()
        }

    def close(self) -> None:
        self.fetcher.close()
