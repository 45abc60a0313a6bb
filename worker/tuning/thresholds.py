"""Writing thresholds back into policy YAML without disturbing anything else.

ruamel.yaml round-trip keeps comments, key order, quoting and flow style. The file's
indentation style is found by dumping it unmodified with each common style and keeping
the one that reproduces it exactly. Only the ``threshold`` values named change.

Values are written unrounded: the shortest decimal that reads back as the same float
(``repr``), so a suggested 0.99996 stays 0.99996 rather than becoming 1.0 (which would
flag nothing), and 0.00004 is written ``4.0e-05`` (a float to YAML 1.1 and 1.2 readers
alike) rather than becoming 0.0 (which would flag everything). Round only for display.
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
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.representer import RoundTripRepresenter

from worker.errors import PolicyError, PolicyProblem

STYLES = ((2, 4, 2), (2, 2, 0), (4, 6, 2), (4, 4, 0), (2, 4, 0), (4, 4, 2))


def float_text(value: float) -> str:
    """``value`` as the shortest YAML float that reads back exactly: ``repr``, with a
    ``.0`` added to a bare exponent mantissa (``4e-05`` -> ``4.0e-05``) so YAML 1.1
    readers (PyYAML) do not take it for a string."""
    text = repr(float(value))
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


class _ExactFloatRepresenter(RoundTripRepresenter):
    """Round-trip representer that writes new (plain ``float``) values with
    :func:`float_text`; floats read from the file keep their own spelling."""


def _represent_float(representer: RoundTripRepresenter, value: float) -> ScalarNode:
    return representer.represent_scalar("tag:yaml.org,2002:float", float_text(value))


_ExactFloatRepresenter.add_representer(float, _represent_float)


def _yaml(style: tuple[int, int, int]) -> YAML:
    yaml = YAML(typ="rt")
    yaml.Representer = _ExactFloatRepresenter
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
            category["threshold"] = float(thresholds[category["id"]])
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
