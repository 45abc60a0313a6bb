"""Local files: bare paths and ``file://`` URIs.

`worker classify` reads any path it is given. A queue worker (``context.service``) reads
only below ``WORKER_FILE_ROOTS``, after resolving symlinks, so a job cannot name
``/etc/passwd``.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from worker.errors import SourceError
from worker.plugins import PluginContext, Source


def path_of(uri: str) -> Path:
    """The local path a bare path or ``file://`` URI names."""
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in {"", "localhost"}:
            raise SourceError(f"file URI with a remote host: {uri}", code="source_invalid")
        return Path(unquote(parts.path))
    return Path(uri)


class FileSource(Source):
    schemes = ("", "file")

    def __init__(self, context: PluginContext) -> None:
        super().__init__(context)
        self.max_bytes: int = context.settings.image.max_bytes
        self.roots = [Path(r).resolve() for r in context.settings.file_roots]

    def _check_allowed(self, path: Path) -> None:
        if not self.context.service:
            return
        if not any(path.is_relative_to(root) for root in self.roots):
            raise SourceError(
                f"{path} is outside the allowed roots "
                f"({', '.join(map(str, self.roots)) or 'none: set WORKER_FILE_ROOTS'})",
                code="source_blocked",
            )

    def fetch(self, uri: str) -> bytes:
        path = path_of(uri).expanduser()
        resolved = path.resolve()
        self._check_allowed(resolved)
        try:
            size = resolved.stat().st_size
            if not resolved.is_file():
                raise SourceError(f"{path} is not a regular file", code="source_not_found")
            if size > self.max_bytes:
                raise SourceError(
                    f"{path} is {size} bytes, over the cap of {self.max_bytes} "
                    "(WORKER_IMAGE__MAX_BYTES)",
                    code="image_too_large",
                )
            with resolved.open("rb") as handle:
                return handle.read(self.max_bytes + 1)[: self.max_bytes]
        except FileNotFoundError:
            raise SourceError(f"{path} does not exist", code="source_not_found") from None
        except PermissionError:
            raise SourceError(f"{path} is not readable", code="source_not_found") from None
        except IsADirectoryError:
            raise SourceError(f"{path} is a directory", code="source_not_found") from None
