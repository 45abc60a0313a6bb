"""Routes an image reference to the source plugin for its URI scheme, with a byte cap."""

from __future__ import annotations

from urllib.parse import urlsplit

from worker.documents import ImageRef
from worker.errors import SourceError
from worker.plugins import Source

# What a directory or glob given to `worker classify|submit|eval` is searched for.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def uri_scheme(uri: str) -> str:
    """``s3``, ``https``, ``file`` ... or ``""`` for a bare path (``C:\\x`` included)."""
    scheme = urlsplit(uri).scheme.lower()
    return "" if len(scheme) <= 1 else scheme


class ImageFetcher:
    """Fetches the bytes an :class:`ImageRef` names; every failure is a SourceError."""

    def __init__(self, sources: dict[str, Source], max_bytes: int) -> None:
        self.sources = sources
        self.max_bytes = max_bytes

    def fetch(self, ref: ImageRef) -> bytes:
        if ref.data is not None:
            # base64 is 4 chars per 3 bytes: refuse before decoding anything huge.
            if len(ref.data) * 3 // 4 > self.max_bytes + 3:
                raise SourceError(
                    f"inline image is over the cap of {self.max_bytes} bytes "
                    "(WORKER_IMAGE__MAX_BYTES)",
                    code="image_too_large",
                )
            try:
                return ref.decoded_data()
            except ValueError as exc:
                raise SourceError(str(exc), code="source_invalid") from None
        uri = ref.uri or ""
        scheme = uri_scheme(uri)
        source = self.sources.get(scheme)
        if source is None:
            known = ", ".join(sorted(s or "<path>" for s in self.sources))
            raise SourceError(
                f"no source plugin handles {scheme or 'paths'!r} URIs (installed: {known})",
                code="source_invalid",
            )
        data = source.fetch(uri)
        if len(data) > self.max_bytes:
            raise SourceError(
                f"image is {len(data)} bytes, over the cap of {self.max_bytes} "
                "(WORKER_IMAGE__MAX_BYTES)",
                code="image_too_large",
            )
        return data

    def close(self) -> None:
        for source in {id(s): s for s in self.sources.values()}.values():
            source.close()
