"""A tiny CLIP whose image embeddings tell one picture from another: for the blocklist tests.

The tiny CLIP of :mod:`tests.synthetic` learns colours and shapes from captions, so every
busy scene looks alike to it (unrelated scenes reach cosine 0.998). Matching known images
by embedding needs the opposite skill: altered copies close, different pictures apart.
:func:`train_copy_model` trains the same tiny open_clip model's image tower for that by
instance discrimination: two random alterations of one random scene are a positive pair,
every other scene in the batch a negative (SimCLR's NT-Xent loss), plus two terms that aim
at what a similarity *threshold* needs rather than a ranking: VICReg's variance/covariance
terms (:func:`spreading`), so unrelated pictures spread over the whole sphere, and squared
hinges that push each pair above 0.95 and each picture's most similar other picture (in
the batch or the last three batches) below 0.6 (:func:`threshold_hinge`).

The alterations come from a broader family than any test's (:func:`random_view`,
:func:`random_tone`: a crop of up to a quarter of each side anywhere, any rescale, mirror,
blur, JPEG at any quality, brightness, contrast and saturation), with random parameters,
so a test of a few fixed alterations does not replay the training transform. The tower
sees what serving gives it: open_clip's inference preprocessing of the checkpoint (resize,
centre crop, normalise), split the way :mod:`worker.model` splits it.

What makes ~25 s enough for a 2-layer ViT: the positional embedding starts as (and stays)
the fixed 2-D sin-cos table, so where a shape lies is legible from the first step (with
positions learned from noise, colour composition alone dominated and unrelated scenes
reached 0.95-0.98). The training is seeded and runs a fixed number of steps, so the model
does not depend on machine load; torch's thread count changes its last digits only (the
test's extremes moved by < 0.01 between 1 and 2 threads).
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image, ImageDraw, ImageFilter

from worker.checkpoint import TINY_MODEL_CFG, build_untrained, save_checkpoint
from worker.model import split_preprocess

#: Side of the scenes (the model's input is 64 px: it sees them resized, like serving).
SCENE_SIZE = 128
#: Training: scenes per batch (each seen twice), the NT-Xent temperature, peak learning
#: rate, weights of the spreading and threshold terms, and the hinges' bounds.
BATCH = 96
TEMPERATURE = 0.1
LEARNING_RATE = 5e-3
SPREAD_WEIGHT = 0.2
HINGE_WEIGHT = 5.0
HINGE_BOUNDS = (0.6, 0.95)
#: How many earlier views' embeddings (the last three batches, no gradient) also count as
#: negatives for the hinge: the test's tail is the most similar of 4000 pairs, more than
#: one batch holds.
QUEUE = 288
#: Brightness, contrast and saturation factors drawn in 1 ± these, each 80 % of the time.
TONE_SPREADS = (0.5, 0.1, 0.1)
TONE_CHANCE = 0.8


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))


def random_scene(rng: random.Random, size: int = SCENE_SIZE) -> Image.Image:
    """A random picture: a smooth background through a 2×2 or 3×3 grid of random colours,
    6-12 shapes (ellipses, boxes, polygons, thick lines) of random colours, sizes and
    places, and a third of the time a noise texture."""
    cells = rng.choice((2, 3))
    grid = np.array([_colour(rng) for _ in range(cells * cells)], dtype=np.uint8)
    img = Image.fromarray(grid.reshape(cells, cells, 3)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(6, 12)):
        fill = _colour(rng)
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        r = rng.uniform(size * 0.08, size * 0.3)
        kind = rng.choice(("ellipse", "box", "polygon", "line"))
        if kind == "ellipse":
            draw.ellipse((x - r, y - r * rng.uniform(0.4, 1), x + r, y + r), fill=fill)
        elif kind == "box":
            right, top = x + r * rng.uniform(0.3, 1), y - r * rng.uniform(0.3, 1)
            draw.rectangle((x - r, top, right, y + r), fill=fill)
        elif kind == "polygon":
            corners = [
                (x + rng.uniform(-r, r), y + rng.uniform(-r, r)) for _ in range(rng.randint(3, 6))
            ]
            draw.polygon(corners, fill=fill)
        else:
            end = (x + rng.uniform(-2 * r, 2 * r), y + rng.uniform(-2 * r, 2 * r))
            draw.line((x, y, *end), fill=fill, width=rng.randint(2, max(3, size // 16)))
    if rng.random() < 0.3:
        spread = rng.randint(4, 24)
        noise = np.random.default_rng(rng.getrandbits(32)).integers(
            -spread, spread + 1, (size, size, 3), dtype=np.int16
        )
        img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))
    return img


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """``img`` after a JPEG round trip at ``quality``."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def random_view(
    img: Image.Image, rng: random.Random, stage: Callable[[Image.Image], Image.Image]
) -> Image.Image:
    """The geometric and coding half of a random near-duplicate of ``img``, as the model
    sees it (``stage``: the model's resize and centre crop): a crop keeping 75-100 % of
    each side anywhere in the picture (4 times in 5), a rescale to 35-100 % (half the
    time), a mirror (half the time), then, at the model's size, a slight blur (1 in 10)
    and a JPEG round trip at quality 15-95 (half the time). :func:`random_tone` is the
    tonal half, done on the batch."""
    w, h = img.size
    if rng.random() < 0.8:
        cw, ch = round(w * rng.uniform(0.75, 1.0)), round(h * rng.uniform(0.75, 1.0))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        scale = rng.uniform(0.35, 1.0)
        img = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = stage(img)
    if rng.random() < 0.1:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    if rng.random() < 0.5:
        img = jpeg(img, rng.randint(15, 95))
    return img


def random_tone(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation of each ``(N, 3, H, W)`` picture in [0, 1], each
    scaled (TONE_CHANCE of the time) by a random factor in 1 ± its TONE_SPREADS entry:
    what PIL's ImageEnhance does, in that order, clipped after each step."""
    n = pixels.shape[0]
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def factors(spread: float) -> torch.Tensor:
        f = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * spread
        unchanged = torch.rand(n, 1, 1, 1, generator=generator) >= TONE_CHANCE
        return torch.where(unchanged, torch.ones_like(f), f)

    brightness, contrast, saturation = TONE_SPREADS
    pixels = (pixels * factors(brightness)).clamp(0, 1)
    mean = (pixels * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    pixels = (mean + (pixels - mean) * factors(contrast)).clamp(0, 1)
    grey = (pixels * weights).sum(1, keepdim=True)
    return (grey + (pixels - grey) * factors(saturation)).clamp(0, 1)


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss over L2-normalised ``(N, D)`` views: row ``i`` of each is the positive
    of row ``i`` of the other, the other ``2N - 2`` rows are its negatives."""
    both = torch.cat([first, second])
    logits = both @ both.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = first.shape[0]
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, targets)


def spreading(features: torch.Tensor) -> torch.Tensor:
    """VICReg's variance and covariance terms for L2-normalised ``(N, D)`` features scaled
    to unit expected variance per dimension: every dimension used, none redundant, so
    unrelated pictures spread over the whole sphere instead of a few directions."""
    n, d = features.shape
    scaled = features * d**0.5
    centred = scaled - scaled.mean(0)
    cov = centred.T @ centred / (n - 1)
    off_diagonal = cov - torch.diag(torch.diag(cov))
    variance = F.relu(1 - torch.sqrt(torch.diag(cov) + 1e-4)).mean()
    total: torch.Tensor = variance + off_diagonal.pow(2).sum() / d
    return total


def threshold_hinge(
    first: torch.Tensor,
    second: torch.Tensor,
    bounds: tuple[float, float],
    earlier: torch.Tensor | None = None,
) -> torch.Tensor:
    """What a similarity threshold needs, not just a ranking: each positive pair above
    ``bounds[1]`` and each view's most similar other picture (in the batch or among
    ``earlier`` embeddings) below ``bounds[0]`` (squared hinges, averaged over the ``2N``
    views)."""
    low, high = bounds
    both = torch.cat([first, second])
    n = first.shape[0]
    positives = torch.cat([(first * second).sum(1)] * 2)
    same = torch.eye(2 * n, dtype=torch.bool)
    same |= same.roll(n, dims=1)  # a view and its pair
    hardest = (both @ both.T).masked_fill(same, -1.0).max(dim=1).values
    if earlier is not None and len(earlier):
        hardest = torch.maximum(hardest, (both @ earlier.T).max(dim=1).values)
    return (F.relu(high - positives).pow(2) + F.relu(hardest - low).pow(2)).mean()


def train_copy_model(out_dir: Path, seed: int = 0, steps: int = 90) -> str:
    """Train the tiny CLIP's image tower to recognise altered copies and tell pictures
    apart (``steps`` batches of BATCH fresh scenes, two random alterations of each; about
    25 s on one core); returns the ``local-dir:`` name of the checkpoint in ``out_dir``."""
    from open_clip.pos_embed import get_2d_sincos_pos_embed
    from open_clip.transform import PreprocessCfg, image_transform_v2

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    model = build_untrained(TINY_MODEL_CFG, seed)
    visual = model.visual
    table = get_2d_sincos_pos_embed(
        visual.positional_embedding.shape[1], visual.grid_size[0], cls_token=True
    )
    visual.positional_embedding.data.copy_(torch.from_numpy(table).float())
    visual.positional_embedding.requires_grad_(False)
    model.train()
    # What serving does: open_clip's inference transform for this checkpoint, its PIL part
    # per image and the normalisation per batch.
    stage, mean, std = split_preprocess(
        image_transform_v2(PreprocessCfg(size=visual.image_size[0]), is_train=False),
        torch.device("cpu"),
    )
    assert stage is not None
    assert mean is not None
    assert std is not None
    parameters = [p for p in visual.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=steps, pct_start=0.1
    )
    queue = torch.empty(0, TINY_MODEL_CFG["embed_dim"])
    for _ in range(steps):
        scenes = [random_scene(rng) for _ in range(BATCH)]
        views = [random_view(scene, rng, stage) for scene in scenes for _ in range(2)]
        pixels = torch.from_numpy(np.stack([np.asarray(view, dtype=np.uint8) for view in views]))
        pixels = random_tone(pixels.permute(0, 3, 1, 2).float().div(255), generator)
        features = model.encode_image((pixels - mean) / std, normalize=True)
        first, second = features[0::2], features[1::2]
        loss = nt_xent(first, second, TEMPERATURE)
        loss = loss + SPREAD_WEIGHT * spreading(features)
        loss = loss + HINGE_WEIGHT * threshold_hinge(first, second, HINGE_BOUNDS, queue)
        queue = torch.cat([first.detach(), queue])[:QUEUE]
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        schedule.step()
    model.eval()
    return save_checkpoint(model, TINY_MODEL_CFG, out_dir)
