"""Writing thresholds back into policy YAML without disturbing anything else.

ruamel.yaml round-trip keeps comments, key order, quoting and flow style. The file's
indentation style is found by dumping it unmodified with each common style and keeping
the one that reproduces it exactly. Only the ``threshold`` values named change.
"""

from __future__ import annotations

import difflib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from worker.errors import PolicyError, PolicyProblem

STYLES = ((2, 4, 2), (2, 2, 0), (4, 6, 2), (4, 4, 0), (2, 4, 0), (4, 4, 2))


def _yaml(style: tuple[int, int, int]) -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long lines
    yaml.indent(mapping=style[0], sequence=style[1], offset=style[2])
    return yaml


def _dump(yaml: YAML, docs: list[Any]) -> str:
    buffer = io.StringIO()
    if len(docs) == 1:
        yaml.dump(docs[0], buffer)
    else:
        yaml.dump_all(docs, buffer)
    return buffer.getvalue()


def _style_of(text: str) -> tuple[int, int, int]:
    for style in STYLES:
        yaml = _yaml(style)
        if _dump(yaml, list(yaml.load_all(text))) == text:
            return style
    return STYLES[0]


def update_thresholds(
    path: Path, policy_name: str, thresholds: dict[str, float]
) -> tuple[str, str]:
    """(new text, unified diff) of ``path`` with ``thresholds`` (category id -> value) set
    in the document of policy ``policy_name``. The file is not written."""
    original = path.read_text(encoding="utf-8")
    yaml = _yaml(_style_of(original))
    docs = list(yaml.load_all(original))
    target = None
    for index, doc in enumerate(docs):
        if not isinstance(doc, CommentedMap):
            continue
        name = doc.get("name", path.stem if index == 0 else None)
        if name == policy_name:
            target = doc
    if target is None or target.get("kind") != "moderation":
        raise PolicyError(
            [PolicyProblem(str(path), 1, f"no moderation policy {policy_name!r} in this file")]
        )
    for category in target.get("categories", []):
        if category.get("id") in thresholds:
            category["threshold"] = round(float(thresholds[category["id"]]), 3)
    updated = _dump(yaml, docs)
    diff = "".join(
        difflib.unified_diff(
            original.splitlines(keepends=True),
            updated.splitlines(keepends=True),
            str(path),
            str(path),
        )
    )
    return updated, diff


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
