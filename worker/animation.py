"""Which frames of an animated GIF, WebP or APNG are scored, and what decoding them costs.

:func:`decode_frames` checks the header exactly as :func:`worker.images.decode_image`
does (the same guards, the same error codes) and plans the frames to give: the first
always, and for an animation up to ``max_frames`` frames spread evenly over it
(:func:`spread_frames`: the first and the last reachable frame, the rest rounded in
between). The frames decode one at a time as the result is iterated. A still picture, and
a multi-page TIFF or MPO (whose extra frames are pages), gives one frame, exactly
:func:`~worker.images.decode_image`'s picture.

Frames are counted without decoding, from the file's own structure: a GIF's blocks are
walked (:func:`gif_frame_count`), an APNG's chunks are read (:func:`png_frame_count`,
taken with the count its ``acTL`` declares, the smaller wins) and a WebP's count comes
from libwebp's demuxer, which has already parsed every frame header. Pillow's GIF
``n_frames`` is never used: it walks the whole file. No more than
:data:`MAX_ANIMATION_FRAMES` frames are counted or decoded, whatever the file claims.

The pixel budget: reaching frame ``k`` means decoding every frame before it (each is
drawn over the previous one), so every frame decoded, scored or passed through counts its
canvas against ``max_pixels``, and their sum stays within it: an animation costs no more
than the largest still accepted. Frames are chosen within the frames that budget
reaches; a GIF frame that grows the canvas ends the frames given early when it no longer
fits, and is ``image_too_large`` when it is over a cap on its own. A frame that is missing
or truncated is ``image_unreadable``, as a truncated still is.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

from PIL import Image

from worker.errors import ImageError
from worker.images import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_SIDE,
    check_dimensions,
    decode_first_frame,
    decoding_errors,
    open_checked,
    to_rgb,
)

#: Default of ``ImageSettings.max_frames``: frames scored of an animation.
DEFAULT_MAX_FRAMES = 8
#: Frames of an animation that are ever counted or decoded; later ones are not looked at.
MAX_ANIMATION_FRAMES = 1000


def gif_frame_count(data: bytes, limit: int = MAX_ANIMATION_FRAMES) -> int | None:
    """How many frames a GIF holds, read from its block structure without decoding; None
    when there are more than ``limit`` (the walk stops there). Unknown bytes between blocks
    are skipped one by one and the walk ends at the trailer or the end of the data, as
    Pillow reads them."""
    size = len(data)
    if size < 13 or data[:3] != b"GIF":
        return 1
    pos = 13
    if data[10] & 0x80:
        pos += 3 << ((data[10] & 7) + 1)
    count = 0
    while pos < size:
        marker = data[pos]
        if marker == 0x3B:  # trailer
            break
        if marker == 0x21:  # extension: label, then sub-blocks
            pos += 2
        elif marker == 0x2C:  # image: descriptor, local colour table, LZW size, sub-blocks
            if pos + 10 > size:
                break
            count += 1
            if count > limit:
                return None
            packed = data[pos + 9]
            pos += 10
            if packed & 0x80:
                pos += 3 << ((packed & 7) + 1)
            pos += 1
        else:
            pos += 1
            continue
        while pos < size:  # sub-blocks up to the empty one
            length = data[pos]
            pos += 1 + length
            if length == 0:
                break
    return max(count, 1)


def png_frame_count(data: bytes, limit: int = MAX_ANIMATION_FRAMES) -> int | None:
    """How many frames an APNG holds, read from its chunks without decoding: every ``fcTL``
    followed by image data, plus the default image when it is not part of the animation
    (``IDAT`` before any ``fcTL``); 1 without ``acTL``; None when more than ``limit``."""
    size = len(data)
    pos = 8
    count = 0
    animated = pending = framed = default = False
    while pos + 8 <= size:
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        pos += 12 + length
        if kind == b"acTL":
            animated = True
        elif kind == b"fcTL":
            framed = pending = True
        elif kind in (b"IDAT", b"fdAT"):
            if pending:
                count += 1
                pending = False
            elif kind == b"IDAT" and not framed and not default:
                count += 1
                default = True
        elif kind == b"IEND":
            break
        if count > limit:
            return None
    return max(count, 1) if animated else 1


def spread_frames(count: int, wanted: int) -> list[int]:
    """``wanted`` indices evenly spread over ``range(count)``: the first, the last, and the
    rest rounded in between (distinct, ascending)."""
    n = max(1, min(wanted, count))
    if n == 1:
        return [0]
    return [(i * (count - 1) + (n - 1) // 2) // (n - 1) for i in range(n)]


@dataclass(frozen=True)
class Frame:
    index: int  # in the animation, 0-based
    image: Image.Image  # RGB, EXIF orientation applied


@dataclass
class DecodedFrames:
    """A header-checked image whose frames decode one at a time as it is iterated (once).

    ``animated`` is False for a still picture (and for formats whose extra frames are
    pages, TIFF and MPO): then the one frame is exactly :func:`decode_image`'s picture.
    After iterating, ``indices`` are the frames given (fewer than ``plan`` if a GIF frame
    grew the canvas past the budget) and ``pixels_decoded`` the canvas pixels of every
    frame decoded, scored or passed through.
    """

    width: int  # of the original picture (the first frame's canvas)
    height: int
    format: str
    sha256: str
    animated: bool
    frames_total: int | None  # None: more than MAX_ANIMATION_FRAMES (a GIF's count stops)
    plan: list[int]  # the frame indices to give, ascending, starting with 0
    indices: list[int] = field(default_factory=list)
    pixels_decoded: int = 0
    _img: Image.Image | None = field(default=None, repr=False)
    _draft_size: tuple[int, int] | None = field(default=None, repr=False)
    _limits: tuple[int, int, float] = field(default=(0, 0, 0.0), repr=False)

    def __iter__(self) -> Iterator[Frame]:
        img, self._img = self._img, None
        if img is None:
            raise RuntimeError("the frames of a DecodedFrames are read once")
        yield from self._decode(img)  # not closed: a still's frame may be ``img`` itself

    def _decode(self, img: Image.Image) -> Iterator[Frame]:
        more = len(self.plan) > 1
        first, method = decode_first_frame(img, self.format, self._draft_size, keep_open=more)
        self.pixels_decoded = self.width * self.height
        self.indices.append(0)
        yield Frame(0, first)
        del first
        current = 0
        for target in self.plan[1:]:
            while current < target:
                with decoding_errors():
                    _seek_next(img, self.frames_total)
                current += 1
                if not self._spend(*img.size):
                    return  # the budget is spent: this frame is never decoded
            with decoding_errors():
                img.load()
                rgb = to_rgb(img)
                if rgb is img:
                    rgb = img.copy()
                if method is not None:
                    rgb = rgb.transpose(method)
            self.indices.append(current)
            yield Frame(current, rgb)
            del rgb

    def _spend(self, width: int, height: int) -> bool:
        """Count a frame about to be decoded against the budget; False if it does not fit.
        A frame over a cap on its own (a GIF frame may grow the canvas) is ``image_too_large``."""
        max_pixels, max_side, max_aspect_ratio = self._limits
        check_dimensions(
            width,
            height,
            max_pixels=max_pixels,
            max_side=max_side,
            max_aspect_ratio=max_aspect_ratio,
        )
        if self.pixels_decoded + width * height > max_pixels:
            return False
        self.pixels_decoded += width * height
        return True


def _seek_next(img: Image.Image, total: int | None) -> None:
    """Move to the next frame (decoding the current one where the format draws the next
    over it). The frame count was read from the file, so running out first is corruption."""
    frame = img.tell() + 1
    try:
        img.seek(frame)
    except EOFError:
        counted = f"{total}" if total is not None else f"over {MAX_ANIMATION_FRAMES}"
        raise ImageError(
            f"corrupt animation: frame {frame} is missing though the file holds {counted}",
            code="image_unreadable",
        ) from None


def decode_frames(
    data: bytes,
    *,
    max_pixels: int,
    allowed_formats: Collection[str],
    max_frames: int = DEFAULT_MAX_FRAMES,
    draft_size: tuple[int, int] | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> DecodedFrames:
    """Check ``data``'s header and plan its frames: the first, and for an animation up to
    ``max_frames`` spread evenly over the frames the pixel budget reaches. Frames decode
    as the result is iterated."""
    img, fmt, digest = open_checked(
        data,
        max_pixels=max_pixels,
        allowed_formats=allowed_formats,
        max_side=max_side,
        max_aspect_ratio=max_aspect_ratio,
    )
    width, height = img.size
    total: int | None = 1
    if fmt == "GIF":  # Pillow would walk every frame to count them
        total = gif_frame_count(data)
    elif fmt == "WEBP":  # libwebp's demuxer has parsed every frame header
        total = getattr(img, "n_frames", 1)
    elif fmt == "PNG" and getattr(img, "is_animated", False):  # acTL declares, chunks hold
        declared: int = getattr(img, "n_frames", 1)
        held = png_frame_count(data)
        if held is not None:
            total = min(declared, held)
        else:
            total = declared if declared <= MAX_ANIMATION_FRAMES else None
    animated = total != 1
    plan = [0]
    if animated:
        reachable = min(total or MAX_ANIMATION_FRAMES, MAX_ANIMATION_FRAMES)
        reachable = min(reachable, max_pixels // (width * height))
        plan = spread_frames(reachable, max_frames)
    return DecodedFrames(
        width,
        height,
        fmt,
        digest,
        animated,
        total,
        plan,
        _img=img,
        _draft_size=draft_size,
        _limits=(max_pixels, max_side, max_aspect_ratio),
    )
