"""Test helpers: synthetic images and policy files, waiting for a condition."""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 30),
}
SHAPES = ("circle", "square", "triangle")

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """The first truthy value of ``predicate()``, polled every ``interval`` seconds;
    AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def shape_image(shape: str, colour: str, size: int = 96, seed: int = 0) -> Image.Image:
    """A coloured shape on a light, slightly noisy background."""
    rng = random.Random(seed)
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    margin = rng.randint(size // 10, size // 5)
    box = (margin, margin, size - margin, size - margin)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(
            [(size // 2, margin), (margin, size - margin), (size - margin, size - margin)],
            fill=fill,
        )
    return img


def image_bytes(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write_images(directory: Path, count: int, fmt: str = "PNG") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        colour = list(COLOURS)[i % len(COLOURS)]
        path = directory / f"img_{i:03d}.{fmt.lower()}"
        path.write_bytes(image_bytes(shape_image(shape, colour, seed=i), fmt))
        paths.append(path)
    return paths


SHAPES_POLICY = """\
name: shapes
kind: moderation
templates: simple
background:
  - a blank white page
  - a photo of nothing
categories:
  - id: red
    prompts: [a red shape]
    threshold: 0.5
    action: block
    severity: high
  - id: circle
    prompts: [a circle, a round disc]
    threshold: 0.5
    action: review
  - id: blue
    prompts: [a blue shape]
    threshold: 0.5
---
name: shape-tags
kind: tags
templates: ["a photo of a {}.", "a drawing of a {}."]
top_k: 3
tags: [circle, square, triangle, {id: red, prompts: [red, crimson]}]
"""


def write_policy(directory: Path, text: str = SHAPES_POLICY, name: str = "shapes.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


#: A moderation policy whose only problem is on line 7 (threshold out of range).
GOOD_POLICY_ERRORS = """\
name: broken
kind: moderation
background: [an ordinary photo]
categories:
  - id: weapons
    prompts: [a gun]
    threshold: 1.5
"""


#: The smallest valid moderation policy: one category on line 5.
ONE_CATEGORY_POLICY = """\
name: mod
kind: moderation
background: [an ordinary photo]
categories:
  - id: weapons
    prompts: [a gun]
    threshold: 0.6
"""


#: One moderation category whose ``{bounds}`` (``threshold:`` and ``review_at:`` lines)
#: the review-band tests fill in from measured scores.
BANDED_POLICY = """\
name: mod
kind: moderation
background: [an ordinary photo, a plain wall]
categories:
  - id: weapons
    prompts: [a gun, a knife]
    action: block
    severity: high
{bounds}"""


def choose_bounds(scores: list[float], min_gap: float = 0.002) -> tuple[float, float]:
    """``(review_at, threshold)`` in the widest gaps of the sorted ``scores``, leaving at
    least two scores below review_at, two in the band and two at or above threshold; a
    gap under ``min_gap`` fails the test (the bounds would sit on a score)."""
    ordered = sorted(scores)
    count = len(ordered)

    def widest(start: int, stop: int) -> int:  # i: the gap between ordered[i] and [i + 1]
        return max(range(start, stop), key=lambda i: ordered[i + 1] - ordered[i])

    low = widest(1, count // 2)
    high = widest(low + 2, count - 2)
    for i in (low, high):
        assert ordered[i + 1] - ordered[i] >= min_gap, f"scores too close to split: {ordered}"
    return (
        round((ordered[low] + ordered[low + 1]) / 2, 4),
        round((ordered[high] + ordered[high + 1]) / 2, 4),
    )
