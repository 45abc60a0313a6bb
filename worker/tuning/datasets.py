"""Labelled image sets for `worker finetune` and `worker eval`, validated before any work.

Three layouts:

- a folder per class: ``DATA/<label>/*.jpg`` (optionally ``DATA/<split>/<label>/...`` with
  ``train`` / ``val`` / ``test`` split folders); a folder named ``none`` holds images with
  no label (negatives for moderation categories);
- CSV with a header ``image,label[,split]``;
- JSONL with ``{"image": ..., "label": ..., "split": ...}`` per line.

Labels may be several, ``;``-separated (or a JSON list), for multi-label data; an empty
label means "none of the classes". Image paths are relative to the CSV/JSONL file. Rows
without a split are assigned one from a hash of the path (stable across runs).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from worker.errors import DataError
from worker.fetcher import IMAGE_SUFFIXES

SPLITS = ("train", "val", "test")
NONE_LABEL = "none"


@dataclass(frozen=True)
class Example:
    path: Path
    labels: tuple[str, ...]  # empty: none of the classes
    split: str
    where: str  # "file.csv:12" or the path, for messages


@dataclass
class LabelledSet:
    examples: list[Example]
    source: Path
    classes: list[str] = field(default_factory=list)
    empty_folders: list[Path] = field(default_factory=list)  # class folders without images

    def split(self, name: str) -> list[Example]:
        return [e for e in self.examples if e.split == name]

    def label_counts(self, split: str | None = None) -> Counter[str]:
        counts: Counter[str] = Counter()
        for example in self.examples:
            if split is None or example.split == split:
                counts.update(example.labels or (NONE_LABEL,))
        return counts


def auto_split(path: Path, fractions: tuple[float, float] = (0.7, 0.85)) -> str:
    """A stable train/val/test assignment from the path (70/15/15)."""
    bucket = int(hashlib.sha256(str(path).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "train" if bucket < fractions[0] else "val" if bucket < fractions[1] else "test"


def _labels(value: object) -> tuple[str, ...]:
    parts = [str(v) for v in value] if isinstance(value, list) else str(value or "").split(";")
    labels = [p.strip() for p in parts if p.strip() and p.strip() != NONE_LABEL]
    return tuple(dict.fromkeys(labels))


def _from_folders(root: Path) -> tuple[list[Example], list[Path]]:
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    bases = [(d, d.name) for d in split_dirs] or [(root, "")]
    examples: list[Example] = []
    empty: list[Path] = []
    for base, split in bases:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            label = () if class_dir.name == NONE_LABEL else (class_dir.name,)
            found = [
                p
                for p in sorted(class_dir.rglob("*"))
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            ]
            if not found:
                empty.append(class_dir)
            examples += [Example(p, label, split or auto_split(p), str(p)) for p in found]
    return examples, empty


def _row(base: Path, where: str, image: object, label: object, split: object) -> Example:
    if not image:
        raise DataError([f"{where}: no image"])
    path = Path(str(image))
    path = path if path.is_absolute() else base / path
    split_name = str(split or "").strip().lower() or auto_split(path)
    if split_name not in SPLITS:
        raise DataError([f"{where}: split {split_name!r} is not one of {', '.join(SPLITS)}"])
    return Example(path, _labels(label), split_name, where)


def _from_csv(path: Path) -> list[Example]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"image", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                [f"{path}:1: header needs columns image,label[,split]; missing {sorted(missing)}"]
            )
        rows = []
        problems = []
        for number, row in enumerate(reader, start=2):
            try:
                rows.append(
                    _row(
                        path.parent,
                        f"{path}:{number}",
                        row.get("image"),
                        row.get("label"),
                        row.get("split"),
                    )
                )
            except DataError as exc:
                problems.extend(exc.problems)
    if problems:
        raise DataError(problems)
    return rows


def _from_jsonl(path: Path) -> list[Example]:
    rows, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            doc = json.loads(line)
            rows.append(
                _row(path.parent, where, doc.get("image"), doc.get("label"), doc.get("split"))
            )
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: invalid JSON ({exc.msg})")
        except DataError as exc:
            problems.extend(exc.problems)
    if problems:
        raise DataError(problems)
    return rows


def read_labelled(path: Path) -> LabelledSet:
    """Read a folder, CSV or JSONL labelled set (structure only; see :func:`validate`)."""
    empty: list[Path] = []
    if path.is_dir():
        examples, empty = _from_folders(path)
    elif path.suffix.lower() == ".csv":
        examples = _from_csv(path)
    elif path.suffix.lower() in {".jsonl", ".ndjson"}:
        examples = _from_jsonl(path)
    elif not path.exists():
        raise DataError([f"{path}: does not exist"])
    else:
        raise DataError([f"{path}: expected a directory, a .csv or a .jsonl file"])
    if not examples:
        raise DataError([f"{path}: no labelled images found"])
    labels = sorted({label for e in examples for label in e.labels})
    return LabelledSet(examples, path, labels, empty)


def _unreadable(path: Path) -> str | None:
    try:
        with Image.open(path) as img:
            img.verify()
    except FileNotFoundError:
        return "missing file"
    except Exception as exc:
        return f"unreadable image ({type(exc).__name__}: {exc})"
    return None


def validate(
    data: LabelledSet,
    *,
    classes: Collection[str] | None = None,
    min_per_class: int = 1,
    splits: Iterable[str] = ("train",),
    check_images: bool = True,
) -> None:
    """Every problem at once: missing/unreadable files, unknown labels, empty or too-small
    classes. ``classes`` are the known labels (a policy's categories); None accepts any."""
    problems = [f"{folder}: empty class folder (no images)" for folder in data.empty_folders]
    if check_images:
        for example in data.examples:
            reason = _unreadable(example.path)
            if reason:
                where = example.where if example.where != str(example.path) else str(example.path)
                problems.append(f"{where}: {reason}: {example.path}")
    if classes is not None:
        known = set(classes)
        unknown = Counter(label for e in data.examples for label in e.labels if label not in known)
        for label, count in sorted(unknown.items()):
            problems.append(
                f"unknown label {label!r} ({count} image(s)); the policy knows: "
                + ", ".join(sorted(known))
            )
    wanted = list(classes) if classes is not None else data.classes
    for split in splits:
        counts = data.label_counts(split)
        for label in wanted:
            if counts[label] == 0:
                problems.append(f"class {label!r} has no images in the {split} split")
            elif counts[label] < min_per_class:
                problems.append(
                    f"class {label!r} has {counts[label]} image(s) in the {split} split; "
                    f"at least {min_per_class} are needed"
                )
    if problems:
        raise DataError(problems)
