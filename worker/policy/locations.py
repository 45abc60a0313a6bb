"""Turning pydantic's errors on a policy document into ``file:line: message`` problems.

ruamel.yaml's round-trip loader keeps the line of every key and list item; a pydantic
error location (``('categories', 2, 'prompts')``) is walked through the document to the
nearest line that exists, and named the way a policy editor thinks of it
(``category 'weapons'``).
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq


def line_of(doc: Any, loc: Sequence[int | str], base_line: int) -> int:
    """1-based line of the YAML node at ``loc`` inside ``doc`` (nearest existing parent)."""
    node, line = doc, base_line
    for part in loc:
        if isinstance(node, CommentedMap) and part in node:
            line = node.lc.key(part)[0] + 1
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
            line = node.lc.item(part)[0] + 1
            node = node[part]
        else:
            break
    return line


_ITEM_NAMES = {"categories": "category", "tags": "tag"}


class _ShortRepr(reprlib.Repr):
    """``repr`` of a YAML value cut to a few items and characters, without building the
    whole repr first (a value may be a large list, or reached through several aliases)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 2
        self.maxlist = self.maxdict = self.maxset = 4
        self.maxstring = self.maxother = 60

    def repr_CommentedSeq(self, value: Any, level: int) -> str:  # noqa: N802 - reprlib API
        return self.repr_list(value, level)

    def repr_CommentedMap(self, value: Any, level: int) -> str:  # noqa: N802 - reprlib API
        return self.repr_dict(value, level)

    def repr_instance(self, value: Any, level: int) -> str:
        if isinstance(value, str):  # ruamel's str subclasses (quoted, folded, literal)
            return self.repr_str(str(value), level)
        return super().repr_instance(value, level)


short_repr = _ShortRepr().repr


def _owner(doc: Any, loc: Sequence[int | str]) -> str:
    """Human name of the node at ``loc``: ``category 'weapons'``, ``tags[3]``, ``policy``."""
    if not loc:
        return "policy"
    node: Any = doc
    words: list[str] = []
    for index, part in enumerate(loc):
        if isinstance(part, int):
            item = node[part] if isinstance(node, CommentedSeq) and part < len(node) else None
            parent = str(loc[index - 1]) if index else ""
            if isinstance(item, CommentedMap) and "id" in item and parent in _ITEM_NAMES:
                words[-1] = f"{_ITEM_NAMES[parent]} {short_repr(item['id'])}"
            elif isinstance(item, str) and parent in _ITEM_NAMES:
                words[-1] = f"{_ITEM_NAMES[parent]} {short_repr(item)}"
            else:
                words[-1] = f"{words[-1]}[{part}]"
            node = item
        else:
            words.append(part)
            node = node.get(part) if isinstance(node, CommentedMap) else None
    return " ".join(words)


#: Error types of the policy classes' own cross-field rules, reported on their owner.
MODEL_RULES = frozenset({"both_definitions", "review_band", "background_needed", "empty_blocklist"})


def describe(doc: Any, err: Any) -> tuple[tuple[int | str, ...], str]:
    """A location and a human message for one pydantic error."""
    loc: tuple[int | str, ...] = tuple(err["loc"])
    # Tagged/union wrappers add class names to the location; drop them.
    loc = tuple(p for p in loc if not (isinstance(p, str) and p[:1].isupper()))
    kind = err["type"]
    if kind == "extra_forbidden":
        return loc, f"{_owner(doc, loc[:-1])}: unknown key {short_repr(loc[-1])}"
    if kind == "missing":
        return loc[:-1], f"{_owner(doc, loc[:-1])}: missing key {loc[-1]!r}"
    if kind == "too_short":
        if len(loc) >= 2 and loc[-1] == "prompts":
            return loc, f"{_owner(doc, loc[:-1])} has no prompts"
        return loc, f"{_owner(doc, loc)} must not be empty"
    if kind == "too_long" and loc and loc[-1] in _ITEM_NAMES:
        ctx = err.get("ctx") or {}
        actual, most = ctx.get("actual_length"), ctx.get("max_length")
        has = f"has {actual:,} entries" if isinstance(actual, int) else "has too many entries"
        limit = f"{most:,}" if isinstance(most, int) else "fewer"
        return loc, f"{_owner(doc, loc)} {has}; a policy holds at most {limit} {loc[-1]}"
    if kind == "no_definition":  # a category with neither prompts nor exemplars
        return (*loc, "prompts"), f"{_owner(doc, loc)} has no prompts (or exemplars)"
    if kind in MODEL_RULES:  # a rule across fields (worker.policy.schema.rule_error)
        return loc, f"{_owner(doc, loc)}: {err['msg']}"
    if kind == "duplicate_id":
        return (*loc, err["ctx"]["index"], "id"), err["msg"]
    field = f"{_owner(doc, loc[:-1])}: {loc[-1]}" if len(loc) > 1 else _owner(doc, loc)
    if (
        kind in {"greater_than_equal", "less_than_equal"}
        and loc
        and loc[-1]
        in {
            "threshold",
            "min_score",
        }
    ):
        return loc, f"{field} must be between 0 and 1, got {short_repr(err['input'])}"
    if kind == "string_pattern_mismatch":
        got = short_repr(err["input"])
        return loc, (
            f"{field} {got} must start with a letter or digit and contain only "
            "letters, digits, '_', '-' and '.'"
        )
    msg = str(err["msg"]).removeprefix("Value error, ")
    if msg.startswith("Input should be"):
        got = short_repr(err["input"])
        return loc, f"{field} must be{msg.removeprefix('Input should be')}, got {got}"
    return loc, f"{field}: {msg}"
