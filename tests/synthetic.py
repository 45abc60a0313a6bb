"""A synthetic world for the finetune and eval tests: coloured shapes, and a tiny CLIP
pre-trained contrastively on them for a few seconds so it has real zero-shot skill.

The pre-training data are *filled* shapes on plain backgrounds, captioned "a red
circle". The "domain" the tests adapt to are *outlined* shapes on cluttered backgrounds:
the same concepts, drawn differently, where zero-shot accuracy drops.
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from worker.checkpoint import TINY_MODEL_CFG, build_untrained, save_checkpoint

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
}
SHAPES = ("circle", "square", "triangle", "star")
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [angle + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
    if shape == "triangle":
        corners = [angle - math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
    points = []
    for k in range(10):  # star
        radius = r if k % 2 == 0 else r * 0.45
        a = angle - math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return points


def render(
    shape: str, colour: str, rng: random.Random, size: int = 64, style: str = "filled"
) -> Image.Image:
    """One picture. ``style`` is "filled" (pre-training), "outline" (the domain) or
    "night" (the hard domain: :func:`render_night`)."""
    if style == "night":
        return render_night(shape, colour, rng, size)
    if style == "filled":
        bg = tuple(rng.randint(215, 255) for _ in range(3))
    else:
        bg = tuple(rng.randint(60, 200) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    if style == "outline":  # clutter: random lines in random colours
        for _ in range(rng.randint(4, 8)):
            xy = [rng.uniform(0, size) for _ in range(4)]
            draw.line(xy, fill=tuple(rng.randint(0, 255) for _ in range(3)), width=1)
    r = rng.uniform(size * 0.18, size * 0.36)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    width = 0 if style == "filled" else 2
    if shape == "circle":
        box = (cx - r, cy - r, cx + r, cy + r)
        if width:
            draw.ellipse(box, outline=fill, width=width)
        else:
            draw.ellipse(box, fill=fill)
    else:
        points = _polygon(shape, cx, cy, r, rng.uniform(-0.4, 0.4))
        if width:
            draw.line([*points, points[0]], fill=fill, width=width)
        else:
            draw.polygon(points, fill=fill)
    return img


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy((arr - MEAN) / STD).permute(0, 3, 1, 2).contiguous()


#: A moderation policy of three colour categories (comments kept: the eval tests write
#: thresholds back into it and check the comments survive).
COLOURS_POLICY = """\
# Colours policy used by the eval tests.
name: colours
kind: moderation
templates: simple
background:
  - a white shape
categories:
  # warm colours
  - id: red
    prompts: [red shape, crimson shape]
    threshold: 0.5
    action: review
  - id: blue
    prompts: [blue shape]
    threshold: 0.5   # keep an eye on this one
    action: block
    severity: high
  - id: green
    prompts: [green shape]
    threshold: 0.5
"""


def colours_env(root: Path, model_name: str) -> dict[str, str]:
    """`worker` settings for ``model_name`` with :data:`COLOURS_POLICY` in a fresh policy
    directory and a fresh cache (embedding store included) under ``root``."""
    policies = root / "policies"
    policies.mkdir()
    (policies / "colours.yaml").write_text(COLOURS_POLICY)
    return {
        "WORKER_MODEL__NAME": model_name,
        "WORKER_CACHE_DIR": str(root / "cache"),
        "WORKER_POLICY_DIR": str(policies),
        "WORKER_DEVICE": "cpu",
        "WORKER_LOG_FORMAT": "json",
    }


CAPTIONS = (
    "a {c} {s}.",
    "a photo of a {c} {s}.",
    "a {s} that is {c}.",
    "a {c} {s} on a plain background.",
)


def pretrain_tiny_clip(out_dir: Path, steps: int = 160, seed: int = 0) -> str:
    """Contrastive pre-training of the tiny CLIP on filled shapes (a fixed number of steps,
    about 20 s on 2 cores, so the result does not depend on machine load); returns its
    local-dir name."""
    import open_clip

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = build_untrained(TINY_MODEL_CFG, seed)
    model.train()
    tokenizer = open_clip.SimpleTokenizer(
        context_length=TINY_MODEL_CFG["text_cfg"]["context_length"]
    )
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(steps):
        pairs = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(96)]
        images = _pixels([render(s, c, rng) for s, c in pairs])
        texts = tokenizer([rng.choice(CAPTIONS).format(c=c, s=s) for s, c in pairs])
        image_features, text_features, scale = model(images, texts)
        loss = loss_fn(image_features, text_features, scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    model.eval()
    save_checkpoint(model, TINY_MODEL_CFG, out_dir)
    return f"local-dir:{out_dir}"


def write_shape_set(
    root: Path,
    per_class: int,
    *,
    style: str = "outline",
    label: str = "shape",
    seed: int = 1,
    split: str | None = None,
) -> Path:
    """A labelled CSV of shape (or colour) images: ``image,label[,split]``."""
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    classes = SHAPES if label == "shape" else tuple(COLOURS)
    for cls in classes:
        for i in range(per_class):
            shape = cls if label == "shape" else rng.choice(SHAPES)
            colour = cls if label == "colour" else rng.choice(list(COLOURS))
            path = images / f"{label}-{cls}-{seed}-{i:04d}.png"
            render(shape, colour, rng, style=style).save(path)
            rows.append((path.relative_to(root), cls))
    csv_path = root / "labels.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "split"] if split else ["image", "label"])
        for path, cls in rows:
            writer.writerow([path, cls, split] if split else [path, cls])
    return csv_path


def write_finetune_domain(root: Path) -> Path:
    """The domain of the finetune tests: 60 *outlined* shapes per colour, labelled by colour."""
    return write_shape_set(root, per_class=60, style="outline", label="colour", seed=3)


def false_colour(rgb: np.ndarray) -> np.ndarray:
    """What a colour-infrared night camera shows for a surface of daylight colour ``rgb``:
    near-infrared as red, red as green, green as blue (the CIR convention; the surface's
    near-infrared reflectance is taken as 0.6 × its mean brightness). A red object shows
    green, a green one blue, a yellow one cyan: the domain's colour cues contradict the
    daylight world's, which is where fine-tuning on the domain alone forgets."""
    nir = 0.6 * rgb.mean(axis=-1, keepdims=True)
    return np.concatenate([nir, rgb[..., :1], rgb[..., 1:2]], axis=-1)


def render_night(shape: str, colour: str, rng: random.Random, size: int = 64) -> Image.Image:
    """A night-camera picture: a small object on a dark noisy background, in the false
    colour of a colour-infrared camera under automatic gain. The hard domain of the
    fine-tune tests (a different shift from ``outline``)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    r = rng.uniform(size * 0.09, size * 0.15)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.4, 0.4)), fill=255)
    surface = np.array(COLOURS[colour], dtype=np.float32)
    surface += np.array([rng.uniform(-20, 20) for _ in range(3)], dtype=np.float32)
    lit = false_colour(np.clip(surface, 0, 255))
    gain = rng.uniform(190, 240) / max(float(lit.max()), 1.0)
    bg = np.array([rng.uniform(10, 45) for _ in range(3)], dtype=np.float32)
    arr = np.where(np.asarray(mask)[..., None] > 0, lit * gain, bg)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 14, arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def write_split_set(root: Path, parts: dict[str, tuple[int, int]], style: str) -> Path:
    """One CSV over several generated colour sets, one per split: ``{split: (per_class,
    seed)}``; explicit splits, so runs do not depend on where the files lie."""
    rows = []
    for split, (per_class, seed) in parts.items():
        sub = write_shape_set(root / split, per_class, style=style, label="colour", seed=seed)
        with sub.open() as handle:
            rows += [(f"{split}/{r['image']}", r["label"], split) for r in csv.DictReader(handle)]
    path = root / "labels.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "split"])
        writer.writerows(rows)
    return path


def write_night_world(root: Path, policy: str, seed: int = 0) -> dict[str, Path]:
    """The fine-tune hard case: night-camera training data (56 train + 24 val per colour),
    a daylight control set (20 replayed + 10 judged per colour), and held-out night and
    daylight sets (80 per colour) that no run trains or chooses on; ``policy`` is written
    to ``root/policies/colours.yaml``."""
    policies = root / "policies"
    policies.mkdir(parents=True, exist_ok=True)
    (policies / "colours.yaml").write_text(policy)
    s = 100 * seed
    return {
        "policies": policies,
        "data": write_split_set(
            root / "domain", {"train": (56, 11 + s), "val": (24, 21 + s)}, "night"
        ),
        "control": write_split_set(
            root / "control", {"train": (20, 12 + s), "val": (10, 22 + s)}, "filled"
        ),
        "held_night": write_shape_set(
            root / "held-night", 80, style="night", label="colour", seed=13 + s
        ),
        "held_day": write_shape_set(
            root / "held-day", 80, style="filled", label="colour", seed=14 + s
        ),
    }


def with_modality_gap(model_name: str, out_dir: Path, offset: float = 1.5, seed: int = 0) -> str:
    """The model ``model_name`` (a local-dir checkpoint) with CLIP's modality gap made
    visible: every image embedding gets the same offset before normalisation (the image
    tower's last LayerNorm bias, pushed along a random direction), ``offset`` times the
    median feature norm. Image embeddings then sit in a narrow cone of their own, as real
    CLIP's do, so image-image cosines run far above image-text ones, while what tells one
    image from another is unchanged. Returns the new local-dir name."""
    from worker.model import load_model

    loaded = load_model(model_name, None, device="cpu")
    model = loaded.model
    rng = random.Random(seed)
    probe = _pixels([render(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng) for _ in range(64)])
    with torch.no_grad():
        norm = model.encode_image(probe).norm(dim=1).median()
        generator = torch.Generator().manual_seed(seed)
        direction = torch.randn(model.visual.ln_post.bias.shape, generator=generator)
        shift = direction @ model.visual.proj  # how the bias moves the embedding
        model.visual.ln_post.bias += direction * (offset * norm / shift.norm())
    return save_checkpoint(model, TINY_MODEL_CFG, out_dir)


def textured_photo(seed: int, size: tuple[int, int] = (256, 192)) -> Image.Image:
    """A photograph-like picture: 1/f^2 colour texture (as natural images have), a few
    flat shapes over it and a little sensor noise. Never flat, so PDQ quality is high."""
    rng = np.random.default_rng(seed)
    w, h = size
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    freq = np.sqrt(fx**2 + fy**2)
    freq[0, 0] = 1.0
    amplitude = freq ** -rng.uniform(1.8, 2.4)

    def texture() -> np.ndarray:
        phase = np.exp(2j * np.pi * rng.random(amplitude.shape))
        return np.fft.irfft2(amplitude * phase, s=(h, w))

    shared = texture()
    arr = np.stack([0.7 * shared + 0.3 * texture() for _ in range(3)], axis=-1)
    arr = (arr - arr.mean()) / arr.std() * rng.uniform(35, 60) + rng.uniform(90, 160)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, 50)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 5))
            draw.polygon([(x + r * np.cos(a), y + r * np.sin(a)) for a in angles], fill=colour)
    noisy = np.asarray(img) + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
