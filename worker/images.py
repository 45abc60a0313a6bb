"""Decoding untrusted image bytes into RGB pictures, with guards.

Every failure is an :class:`ImageError` with a stable code (``image_unreadable``,
``image_too_large``, ``format_not_allowed``); nothing here can take a batch down.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Collection
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from worker.errors import ImageError

# A truncated file is an error, never a silently half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def install_decompression_bomb_guard(max_pixels: int) -> None:
    """Make Pillow's decompression-bomb check agree with ``max_pixels`` and raise, not warn."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied, possibly JPEG-draft reduced
    width: int  # of the original picture
    height: int
    format: str
    sha256: str


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    allowed_formats: Collection[str],
    draft_size: tuple[int, int] | None = None,
) -> DecodedImage:
    """Decode ``data``; ``draft_size`` lets JPEG decode at a reduced scale no smaller than it."""
    if not data:
        raise ImageError("the file is empty", code="image_unreadable")
    digest = hashlib.sha256(data).hexdigest()
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not a recognised image format", code="image_unreadable") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large: {exc}", code="image_too_large") from None
    except Exception as exc:  # Pillow raises many types on hostile headers
        raise ImageError(f"cannot read image header: {exc}", code="image_unreadable") from None
    fmt = (img.format or "").upper()
    if fmt not in allowed_formats:
        raise ImageError(
            f"image format {fmt or 'unknown'} is not allowed (allowed: "
            f"{', '.join(sorted(allowed_formats))})",
            code="format_not_allowed",
        )
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the cap of {max_pixels} "
            "(WORKER_IMAGE__MAX_PIXELS)",
            code="image_too_large",
        )
    try:
        if draft_size is not None and fmt == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
        upright = ImageOps.exif_transpose(img)
        rgb = upright.convert("RGB") if upright.mode != "RGB" else upright
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large: {exc}", code="image_too_large") from None
    except Exception as exc:
        raise ImageError(
            f"corrupt or truncated image data: {exc}", code="image_unreadable"
        ) from None
    return DecodedImage(rgb, width, height, fmt, digest)
