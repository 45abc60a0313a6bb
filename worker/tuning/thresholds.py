"""Writing thresholds back into policy YAML without disturbing anything else.

ruamel.yaml round-trip keeps comments, key order, quoting and flow style. The file's
indentation style is found by dumping it unmodified with each common style and keeping
the one that reproduces it exactly. Only the ``threshold`` and ``review_at`` values named
change: a new ``review_at`` goes right after its category's ``threshold``, and an existing
one that a new threshold would leave at or above it is removed (the loader refuses
``review_at >= threshold``), with a note. :func:`write_checked` writes the result only if
the policy loader accepts it and reads back exactly the values written.

Values are written unrounded: the shortest decimal that reads back as the same float
(``repr``), so a suggested 0.99996 stays 0.99996 rather than becoming 1.0 (which would
flag nothing), and 0.00004 is written ``4.0e-05`` (a float to YAML 1.1 and 1.2 readers
alike) rather than becoming 0.0 (which would flag everything). Round only for display.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import CommentMark
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.representer import RoundTripRepresenter
from ruamel.yaml.tokens import CommentToken

from worker.errors import PolicyError, PolicyProblem
from worker.policy.loading import load_policy_file
from worker.policy.moderation import Category

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


#: A category's threshold when its YAML gives none (the schema's default).
DEFAULT_THRESHOLD: float = Category.model_fields["threshold"].default


@dataclass
class PolicyEdit:
    """A policy file's new text (not yet written), its unified diff, a note per change
    beyond the values asked for (a ``review_at`` removed or kept), and what the loader must
    read back from it: ``{category: (threshold, review_at)}`` in the policy named
    ``policy_name`` (None: the file's first document, named after the file)."""

    path: Path
    text: str
    diff: str
    policy_name: str | None
    notes: list[str] = field(default_factory=list)
    expected: dict[str, tuple[float, float | None]] = field(default_factory=dict)


def update_thresholds(
    path: Path, policy_name: str, thresholds: dict[str, float]
) -> tuple[str, str]:
    """(new text, unified diff) of ``path`` with ``thresholds`` (category id -> value) set
    in the document of policy ``policy_name``. The file is not written."""
    edit = edit_thresholds(path, policy_name, thresholds)
    return edit.text, edit.diff


def edit_thresholds(
    path: Path,
    policy_name: str,
    thresholds: Mapping[str, float],
    review_at: Mapping[str, float | None] | None = None,
) -> PolicyEdit:
    """``path`` with ``thresholds`` (category id -> value) set in the document of policy
    ``policy_name`` and, for the ids in ``review_at``, that ``review_at`` (inserted after
    ``threshold``, or updated). A ``None`` there, or an id only in ``thresholds``, keeps
    the category's ``review_at`` if it stays below the new threshold and removes it (with
    a note) otherwise. The file is not written."""
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
    review_at = review_at or {}
    notes: list[str] = []
    expected: dict[str, tuple[float, float | None]] = {}
    for category in target.get("categories", []):
        if not isinstance(category, CommentedMap):
            continue
        cid = category.get("id")
        if cid not in thresholds and cid not in review_at:
            continue
        if cid in thresholds:
            # A new threshold goes last, or just before an existing review_at.
            keys = list(category.keys())
            before = keys.index("review_at") - 1 if "review_at" in category else -1
            after = keys[before] if before >= 0 else None
            _put(category, "threshold", float(thresholds[cid]), after=after)
        threshold = float(category.get("threshold", DEFAULT_THRESHOLD))
        new_review = review_at.get(cid)
        if new_review is not None:
            _put(category, "review_at", float(new_review), after="threshold")
        elif isinstance(category.get("review_at"), int | float):
            old = float(category["review_at"])
            if old >= threshold:
                _remove(category, "review_at")
                notes.append(
                    f"{cid}: removed review_at {float_text(old)}: not below the new "
                    f"threshold {float_text(threshold)}, so no review band"
                )
            elif cid in review_at:
                notes.append(
                    f"{cid}: kept review_at {float_text(old)} (below the new threshold "
                    f"{float_text(threshold)}); the recall target needs no band, so "
                    "remove it by hand for none"
                )
        current = category.get("review_at")
        expected[cid] = (threshold, None if current is None else float(current))
    updated = _dump(yaml, docs)
    diff = "".join(
        difflib.unified_diff(
            original.splitlines(keepends=True),
            updated.splitlines(keepends=True),
            str(path),
            str(path),
        )
    )
    named = target.get("name")
    return PolicyEdit(
        path, updated, diff, named if isinstance(named, str) else None, notes, expected
    )


def _split_comment(mapping: CommentedMap, key: str) -> tuple[str, str]:
    """``key``'s end-of-line comment (``"# …"`` or ``""``) and the lines after it that
    ruamel keeps with it (full-line comments and blank lines up to the next key, each
    ending in a newline)."""
    token = mapping.ca.items.get(key, [None, None, None, None])[2]
    if token is None:
        return "", ""
    eol, _, rest = token.value.partition("\n")
    return eol, rest


def _set_comment(mapping: CommentedMap, key: str, eol: str, rest: str, column: int) -> None:
    slots = mapping.ca.items.setdefault(key, [None, None, None, None])
    if not eol and not rest:
        slots[2] = None
        return
    old = slots[2]
    if old is not None:
        old.value = f"{eol}\n{rest}"
    else:
        slots[2] = CommentToken(f"{eol}\n{rest}", CommentMark(column), None)


def _put(mapping: CommentedMap, key: str, value: float, after: str | None) -> None:
    """Set ``key`` in place if present; else insert it after ``after`` (or last), moving
    the comment lines that followed that key's line below the new one."""
    if key in mapping:
        mapping[key] = value
        return
    keys = list(mapping.keys())
    anchor = after if after in mapping else (keys[-1] if keys else None)
    if anchor is None:
        mapping[key] = value
        return
    mapping.insert(keys.index(anchor) + 1, key, value)
    eol, rest = _split_comment(mapping, anchor)
    if rest:
        token = mapping.ca.items[anchor][2]
        _set_comment(mapping, anchor, eol, "", token.column)
        _set_comment(mapping, key, "", rest, token.column)


def _remove(mapping: CommentedMap, key: str) -> None:
    """Delete ``key`` and its end-of-line comment; the comment lines that followed its line
    (they describe what comes next) move to the key before it."""
    _, rest = _split_comment(mapping, key)
    keys = list(mapping.keys())
    position = keys.index(key)
    del mapping[key]
    mapping.ca.items.pop(key, None)
    if rest and position > 0:
        before = keys[position - 1]
        eol, own = _split_comment(mapping, before)
        _set_comment(mapping, before, eol, own + rest, 0)


def write_checked(edit: PolicyEdit) -> None:
    """Replace ``edit.path`` with ``edit.text`` atomically, and only if the policy loader
    accepts the new text and reads back exactly ``edit.expected``; otherwise raise
    PolicyError (the loader's problems, or the values that differ) and leave the file as
    it was. The check runs on the temporary file that then replaces the original, next to
    it (so relative paths in the policy resolve the same); its name ends in ``.tmp``, so
    a worker watching the policy folder never loads it."""
    path = edit.path
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(edit.text)
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))  # mkstemp makes it 0600
        _check(edit, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _check(edit: PolicyEdit, tmp: Path) -> None:
    def refused(problems: list[tuple[int, str]]) -> PolicyError:
        return PolicyError(
            [
                PolicyProblem(
                    str(edit.path), line, f"{message} (not written: the file is as it was)"
                )
                for line, message in problems
            ]
        )

    try:
        loaded = load_policy_file(tmp)
    except PolicyError as exc:
        raise refused([(p.line, p.message) for p in exc.problems]) from None
    # The check file's own name stands in for a missing `name:` (only the first document's).
    policy = next((p for p in loaded if p.name == edit.policy_name), loaded[0])
    dumped = policy.policy.model_dump()
    read = {c["id"]: (c["threshold"], c.get("review_at")) for c in dumped.get("categories", [])}
    wrong = [
        (policy.line, f"category {cid!r} would read back as {read.get(cid)}, not {want}")
        for cid, want in edit.expected.items()
        if read.get(cid) != want
    ]
    if wrong:
        raise refused(wrong)
