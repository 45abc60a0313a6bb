"""Hostile image shapes: each is a stable error code or a correct picture, at bounded cost.

The files are made here, in memory, and are tiny: what makes them hostile is what their
headers declare (a 100000x1 strip, a 40000x40000 canvas, a 16-million-pixel-wide WebP),
not their size on disk.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from tests.helpers import image_bytes, shape_image
from worker.documents import ImageRef
from worker.engine import WorkItem
from worker.errors import ImageError
from worker.images import DecodedImage, check_dimensions, decode_image, webp_canvas_size
from worker.model import LoadedModel, split_preprocess
from worker.runtime import build_engine
from worker.settings import ImageSettings, Settings

pytestmark = pytest.mark.fault

DEFAULTS = ImageSettings()
FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"]


# ---------------------------------------------------------------------------- makers


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bytes(width: int, height: int, extra: bytes = b"", rows: bool = True) -> bytes:
    """An 8-bit greyscale PNG of zeros, written by hand (Pillow would allocate it first)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = b""
    if rows:
        z = zlib.compressobj(9)
        row = bytes(1 + width)
        idat = _chunk(b"IDAT", b"".join(z.compress(row) for _ in range(height)) + z.flush())
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + idat + _chunk(b"IEND", b"")


def deflated_zeros(size: int) -> bytes:
    z = zlib.compressobj(9)
    block = bytes(1 << 20)
    return b"".join(z.compress(block) for _ in range(size >> 20)) + z.flush()


def webp_vp8x(width: int, height: int) -> bytes:
    """A WebP that is only a VP8X chunk declaring a ``width`` x ``height`` canvas."""
    body = bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random picture (detail at every scale the model input sees)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 20), max(2, width // 20), 3), np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def decode(data: bytes, **kwargs: Any) -> DecodedImage:
    options: dict[str, Any] = {
        "max_pixels": DEFAULTS.max_pixels,
        "allowed_formats": FORMATS,
        "max_side": DEFAULTS.max_side,
        "max_aspect_ratio": DEFAULTS.max_aspect_ratio,
    }
    options.update(kwargs)
    return decode_image(data, **options)


def refused(data: bytes, **kwargs: Any) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode(data, **kwargs)
    return info.value


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records any attempt to decode pixels (ImageFile.load) while it is active."""
    calls: list[str] = []
    original = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> Any:
        calls.append(self.format or "?")
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


# ---------------------------------------------------------------------------- refused shapes


@pytest.mark.parametrize(("width", "height"), [(100_000, 1), (1, 100_000)])
def test_a_hundred_thousand_pixel_strip_is_refused_from_its_header(
    width: int, height: int, no_pixel_decoding: list[str]
) -> None:
    data = png_bytes(width, height)
    assert len(data) < 400  # the 177-byte file that used to cost 1.6 GB
    error = refused(data)
    assert error.code == "image_too_large"
    assert "WORKER_IMAGE__MAX_SIDE" in error.message
    assert no_pixel_decoding == []


def test_a_strip_under_the_side_cap_is_refused_by_its_aspect_ratio(
    no_pixel_decoding: list[str],
) -> None:
    error = refused(png_bytes(30_000, 2))
    assert error.code == "image_too_large"
    assert "WORKER_IMAGE__MAX_ASPECT_RATIO" in error.message
    assert "15000:1" in error.message
    assert no_pixel_decoding == []


def test_the_aspect_cap_is_inclusive_and_applies_both_ways() -> None:
    assert decode(png_bytes(500, 10)).image.size == (500, 10)
    assert decode(png_bytes(10, 500)).image.size == (10, 500)
    for width, height in [(501, 10), (10, 501)]:
        assert refused(png_bytes(width, height)).code == "image_too_large"
    assert decode(png_bytes(501, 10), max_aspect_ratio=100).image.size == (501, 10)


def test_the_side_cap_follows_its_setting() -> None:
    data = png_bytes(1200, 600)
    assert decode(data).image.size == (1200, 600)
    error = refused(data, max_side=1000)
    assert (error.code, "WORKER_IMAGE__MAX_SIDE" in error.message) == ("image_too_large", True)


def test_a_40000_square_header_in_a_tiny_file(no_pixel_decoding: list[str]) -> None:
    data = png_bytes(40_000, 40_000, rows=False)
    assert len(data) < 100
    error = refused(data)
    assert error.code == "image_too_large"
    assert "WORKER_IMAGE__MAX_PIXELS" in error.message
    assert no_pixel_decoding == []


def test_an_empty_canvas_is_unreadable() -> None:
    assert refused(png_bytes(0, 5, rows=False)).code == "image_unreadable"
    with pytest.raises(ImageError) as info:
        check_dimensions(0, 5, max_pixels=100)
    assert info.value.code == "image_unreadable"


@pytest.mark.parametrize(
    ("size", "setting"),
    [((40_000, 1), "WORKER_IMAGE__MAX_SIDE"), ((20_000, 2), "WORKER_IMAGE__MAX_ASPECT_RATIO")],
)
def test_huge_aspect_gifs(size: tuple[int, int], setting: str) -> None:
    data = image_bytes(Image.new("P", size), "GIF")
    assert len(data) < 2000
    error = refused(data)
    assert (error.code, setting in error.message) == ("image_too_large", True)


def test_webp_canvas_bombs_are_refused_before_pillow_opens_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("Image.open ran on an over-limit WebP")

    monkeypatch.setattr(Image, "open", never)
    error = refused(webp_vp8x(1 << 24, 1 << 24))
    assert error.code == "image_too_large"
    assert "16777216x16777216" in error.message
    assert "WORKER_IMAGE__MAX_PIXELS" in error.message
    assert refused(webp_vp8x(9000, 9000)).code == "image_too_large"
    assert refused(webp_vp8x(16_000, 2)).code == "image_too_large"  # aspect
    assert refused(webp_vp8x(64, 64), allowed_formats=["PNG"]).code == "format_not_allowed"


def test_a_real_webp_bomb() -> None:
    # 3000x3000 of one colour is a few hundred bytes of lossless WebP; a 1-megapixel cap refuses it.
    data = image_bytes(Image.new("RGB", (3000, 3000), (9, 9, 9)), "WEBP", lossless=True)
    assert len(data) < 1000
    error = refused(data, max_pixels=1_000_000)
    assert (error.code, "3000x3000" in error.message) == ("image_too_large", True)


@pytest.mark.parametrize(
    "options",
    [{}, {"lossless": True}, {"save_all": True, "append_images": [Image.new("RGB", (300, 20))]}],
    ids=["lossy-vp8", "lossless-vp8l", "animated-vp8x"],
)
def test_webp_canvas_size_reads_every_webp_header(options: dict[str, Any]) -> None:
    for mode in ("RGB", "RGBA"):
        data = image_bytes(Image.new(mode, (300, 20)), "WEBP", **options)
        assert webp_canvas_size(data) == (300, 20)
    assert webp_canvas_size(png_bytes(300, 20)) is None
    assert webp_canvas_size(b"RIFF\x00\x00\x00\x00WEBP") is None


# ---------------------------------------------------------------------------- unreadable files


def test_png_metadata_bombs_are_unreadable_not_expanded() -> None:
    bomb = deflated_zeros(16 << 20)  # 16 MB of zeros in ~16 kB
    iccp = png_bytes(8, 8, _chunk(b"iCCP", b"icc\x00\x00" + bomb))
    ztxt = png_bytes(8, 8, _chunk(b"zTXt", b"Comment\x00\x00" + bomb))
    plain = png_bytes(8, 8)
    end = plain.index(b"IEND") - 4
    late = plain[:end] + _chunk(b"zTXt", b"Comment\x00\x00" + bomb) + plain[end:]  # after IDAT
    for data in (iccp, ztxt, late):
        assert len(data) < 64 * 1024
        assert refused(data).code == "image_unreadable"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"])
def test_truncated_files_are_unreadable(fmt: str) -> None:
    img = photo(160, 120)
    data = image_bytes(img.convert("P") if fmt == "GIF" else img, fmt)
    for cut in (len(data) // 2, 40, 12):
        assert refused(data[:cut]).code == "image_unreadable"


# ---------------------------------------------------------------------------- legal, decoded


def test_a_many_page_tiff_gives_its_first_page() -> None:
    pages = [Image.new("L", (4, 4), i % 256) for i in range(300)]
    data = image_bytes(Image.new("L", (4, 4), 7), "TIFF", save_all=True, append_images=pages)
    decoded = decode(data)
    assert decoded.image.getpixel((0, 0)) == (7, 7, 7)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_give_their_first_frame(fmt: str) -> None:
    red = Image.new("RGB", (40, 30), (255, 0, 0))
    blue = Image.new("RGB", (40, 30), (0, 0, 255))
    frames = [red.convert("P"), blue.convert("P")] if fmt == "GIF" else [red, blue]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = image_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], **extra)
    decoded = decode(data)
    assert (decoded.image.mode, decoded.image.size) == ("RGB", (40, 30))
    assert decoded.image.getpixel((20, 15)) == (255, 0, 0)


def test_modes_become_8_bit_rgb() -> None:
    sixteen = Image.fromarray(np.full((4, 4), 30_000, dtype=np.uint16))  # I;16
    for fmt in ("PNG", "TIFF"):  # scaled, not clipped to white
        assert decode(image_bytes(sixteen, fmt)).image.getpixel((0, 0)) == (117, 117, 117)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([10, 20, 30] * 256)
    cases = [
        (image_bytes(palette, "PNG", transparency=0), (10, 20, 30)),
        (image_bytes(Image.new("LA", (8, 8), (100, 50)), "PNG"), (100, 100, 100)),
        (image_bytes(Image.new("RGBA", (8, 8), (1, 2, 3, 0)), "PNG"), (1, 2, 3)),
        (image_bytes(Image.new("1", (8, 8), 1), "PNG"), (255, 255, 255)),
        (image_bytes(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"), (255, 255, 255)),
    ]
    for data, pixel in cases:
        decoded = decode(data)
        assert decoded.image.mode == "RGB"
        assert decoded.image.getpixel((4, 4)) == pixel


def test_a_broken_exif_block_does_not_lose_the_picture() -> None:
    data = image_bytes(Image.new("RGB", (40, 20)), "JPEG", exif=b"Exif\x00\x00MM\x00*broken")
    with pytest.warns(UserWarning, match="Corrupt EXIF data"):
        assert decode(data).image.size == (40, 20)


# ---------------------------------------------------------------------------- same scores


def _embed(model: LoadedModel, image: Image.Image) -> torch.Tensor:
    return model.encode_images(model.batch_pixels([model.image_input(image)]))[0]


@pytest.mark.parametrize(
    ("size", "fmt", "mode"),
    [
        ((400, 300), "PNG", "RGB"),
        ((300, 400), "PNG", "RGB"),
        ((233, 233), "BMP", "RGB"),
        ((600, 150), "PNG", "RGB"),  # a 4:1 panorama
        ((300, 200), "PNG", "RGBA"),
        ((300, 200), "GIF", "P"),
        ((400, 267), "JPEG", "RGB"),
        ((400, 267), "WEBP", "RGB"),
    ],
)
def test_ordinary_pictures_score_as_open_clip_preprocesses_them(
    tiny_model: LoadedModel, size: tuple[int, int], fmt: str, mode: str
) -> None:
    data = image_bytes(photo(*size).convert(mode), fmt)
    reference = open_clip_reference(tiny_model, data)
    ours = _embed(tiny_model, decode(data).image)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


def open_clip_reference(model: LoadedModel, data: bytes) -> torch.Tensor:
    """What open_clip's own preprocess gives for the picture Pillow opens."""
    picture = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    pixels = model.preprocess(picture).unsqueeze(0)
    return model.encode_images(pixels)[0]


def test_exif_rotated_photo_scores_as_before(tiny_model: LoadedModel) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = image_bytes(photo(320, 200), "JPEG", exif=exif.tobytes())
    decoded = decode(data)
    assert decoded.image.size == (200, 320)
    assert (decoded.width, decoded.height) == (320, 200)  # as the header says
    assert torch.allclose(
        _embed(tiny_model, decoded.image), open_clip_reference(tiny_model, data), atol=1e-5
    )


# ---------------------------------------------------------------------------- bounded resize


class _Recorder:
    """Wraps one preprocessing step and records the size of every picture it returns."""

    def __init__(self, step: Callable[[Any], Any], sizes: list[tuple[int, int]]) -> None:
        self.step = step
        self.sizes = sizes

    def __call__(self, image: Any) -> Any:
        out = self.step(image)
        if isinstance(out, Image.Image):
            self.sizes.append(out.size)
        return out


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_extreme_legal_shapes_preprocess_within_a_bounded_intermediate(
    resize_mode: str, tiny_model: LoadedModel
) -> None:
    from torchvision.transforms import Compose

    side = tiny_model.image_size[0]
    preprocess = open_clip.image_transform(side, is_train=False, resize_mode=resize_mode)
    pil_stage, _, _ = split_preprocess(preprocess, torch.device("cpu"))
    assert isinstance(pil_stage, Compose)
    sizes: list[tuple[int, int]] = []
    recording = Compose([_Recorder(step, sizes) for step in pil_stage.transforms])
    aspect = DEFAULTS.max_aspect_ratio
    bound = side * side * aspect + side  # rounding of the long side
    shapes = [(3200, 64), (64, 3200), (500, 10), (10, 500), (16_000, 320)]
    for width, height in shapes:  # every one at the aspect cap; some upscaled, some reduced
        decoded = decode(png_bytes(width, height))
        sizes.clear()
        out = recording(decoded.image)
        assert out.size == (side, side)
        assert max(w * h for w, h in sizes) <= bound, (resize_mode, (width, height), sizes)
    # One step past the cap never reaches preprocessing.
    assert refused(png_bytes(501, 10)).code == "image_too_large"


def test_the_default_model_preprocessing_is_the_shortest_side_kind(
    tiny_model: LoadedModel,
) -> None:
    """The bound above assumes open_clip's Resize(S) + CenterCrop(S) pipeline."""
    from torchvision.transforms import Compose

    assert isinstance(tiny_model.pil_stage, Compose)
    names = [type(step).__name__ for step in tiny_model.pil_stage.transforms]
    assert names[:2] == ["Resize", "CenterCrop"]


# ---------------------------------------------------------------------------- end to end


def test_the_engine_turns_hostile_files_into_error_results(
    make_settings: Callable[..., Settings], tiny_model: LoadedModel, tmp_path: Path
) -> None:
    files = {
        "strip.png": png_bytes(100_000, 1),
        "tall.png": png_bytes(1, 100_000),
        "aspect.gif": image_bytes(Image.new("P", (20_000, 2)), "GIF"),
        "header.png": png_bytes(40_000, 40_000, rows=False),
        "webp-bomb.webp": webp_vp8x(1 << 24, 1 << 24),
        "truncated.png": image_bytes(photo(200, 100), "PNG")[:300],
        "long.jpg": image_bytes(photo(1600, 200), "JPEG"),  # 8:1, over the side cap below
        "narrow.png": image_bytes(photo(200, 10), "PNG"),  # 20:1, over the aspect cap below
        "shape.png": image_bytes(shape_image("circle", "red"), "PNG"),
        "panorama.jpg": image_bytes(photo(900, 100), "JPEG"),  # 9:1, legal
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    items = [WorkItem(job_id=name, image=ImageRef(uri=str(tmp_path / name))) for name in files]
    settings = make_settings(image={"max_aspect_ratio": 10, "max_side": 1000})
    engine = build_engine(settings, model=tiny_model)
    try:
        results = {r.job_id: r for r in engine.process(items)}
    finally:
        engine.close()
    codes = {name: (r.error.code if r.error else r.status) for name, r in results.items()}
    assert codes == {
        "strip.png": "image_too_large",
        "tall.png": "image_too_large",
        "aspect.gif": "image_too_large",
        "header.png": "image_too_large",
        "webp-bomb.webp": "image_too_large",
        "truncated.png": "image_unreadable",
        "long.jpg": "image_too_large",
        "narrow.png": "image_too_large",
        "shape.png": "ok",
        "panorama.jpg": "ok",
    }
    messages = {name: r.error.message for name, r in results.items() if r.error is not None}
    assert "WORKER_IMAGE__MAX_SIDE" in messages["long.jpg"]
    assert "WORKER_IMAGE__MAX_ASPECT_RATIO" in messages["narrow.png"]
    assert (results["panorama.jpg"].image.width, results["panorama.jpg"].image.height) == (900, 100)
