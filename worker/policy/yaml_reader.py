"""Bounded YAML reading for policy files: the file's bytes, its text, its YAML documents.

``read_documents`` turns a path into the YAML documents of a policy file, or a
``PolicyError``; ``worker.policy.loading`` turns those documents into policies.

Limits. A policy file is read by a long-running worker whenever it changes, so a hostile
or broken file (a YAML alias bomb, ``[[[[…]]]]`` nested 10,000 deep, a 50 MB file, a FIFO,
a symlink to ``/dev/zero``, binary junk) must be refused quickly and in bounded memory:

* the size is checked before reading and at most :data:`MAX_POLICY_BYTES` + 1 bytes are
  read; only regular files (or symlinks to them) are opened, without blocking;
* the text must be UTF-8 without control characters;
* while composing the YAML, nesting stops at :data:`MAX_NESTING_DEPTH`, strings at
  :data:`MAX_SCALAR_CHARS`, documents at :data:`MAX_DOCUMENTS`, and values at
  :data:`MAX_YAML_NODES`, where an alias counts as a copy of everything it refers to (so a
  "billion laughs" bomb is refused at the alias that crosses the budget, without being
  expanded) and a recursive alias is refused;
* problems are reported as ``file:line: message`` with messages cut to
  :data:`MAX_MESSAGE_CHARS` and at most :data:`MAX_PROBLEMS_PER_FILE` per file.

Whole-file problems (unreadable, not a regular file, too large) are reported on line 0.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.composer import Composer
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceStartEvent,
)

from worker.errors import PolicyError, PolicyProblem

# --------------------------------------------------------------------------- limits
# A policy is a few KiB of prompts (the shipped ones are 4 KiB and 2 KiB, ~250 YAML values,
# nested 4 deep). The limits leave room for very large vocabularies while keeping the
# worst file a worker can be handed to about a second of parsing (ruamel's parser is pure
# Python: ~50-100 us per YAML value), and the hostile files above to a fraction of that.

#: Largest policy file, in bytes (1 MiB: 250x the shipped moderation policy). Checked with
#: ``stat`` before reading, and never more than this + 1 bytes are read.
MAX_POLICY_BYTES = 1 << 20
#: Deepest nesting of lists/mappings (a policy needs 4: document, categories, category,
#: prompts). Stops ``[[[[…]]]]`` bombs long before Python's recursion limit.
MAX_NESTING_DEPTH = 32
#: Most YAML values (scalars, keys, lists, mappings) in one file, counting each alias as a
#: copy of the node it refers to, so a "billion laughs" bomb is refused at the alias that
#: crosses it. 10,000 is 40x the shipped policies (~1,500 categories, or a 5,000-tag
#: vocabulary); 10,000 values parse in about half a second.
MAX_YAML_NODES = 10_000
#: Longest string (prompt, description, key). CLIP reads ~77 tokens of a prompt; every
#: prompt is expanded by up to 80 templates, so one huge string costs 80x its size.
MAX_SCALAR_CHARS = 10_000
#: Most YAML documents (``---``), i.e. policies, in one file.
MAX_DOCUMENTS = 100
#: Most problems reported for one file; the rest are summed up as "… and K more".
MAX_PROBLEMS_PER_FILE = 20
#: Longest problem message, in characters (longer ones are cut and end with "…").
MAX_MESSAGE_CHARS = 300

# --------------------------------------------------------------------------- reading


def _size(n: int) -> str:
    """``512 bytes``, ``3.5 KiB``, ``1 MiB``, ``50 MiB``."""
    if n < 1024:
        return f"{n} bytes"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"  # pragma: no cover - unreachable


_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def file_kind(mode: int) -> str:
    """``a FIFO``, ``a character device``, … for a ``st_mode`` that is not a regular file."""
    return _FILE_KINDS.get(stat.S_IFMT(mode), "an unknown kind of file")


def read_capped(path: Path, limit: int) -> tuple[os.stat_result, bytes | None]:
    """The status of ``path`` (symlinks followed) and at most ``limit + 1`` of its bytes.

    Nothing is read (the bytes are None) unless it is a regular file of at most ``limit``
    bytes: a FIFO, a device or a socket is never opened, and the file is opened
    non-blocking, so one swapped in between the ``stat`` and the ``open`` cannot block
    either. A file that grew past its ``stat`` size comes back with ``limit + 1`` bytes.
    Raises OSError when it cannot be read.
    """
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode) or status.st_size > limit:
        return status, None
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_size > limit:
            return status, None
        chunks: list[bytes] = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return status, b"".join(chunks)
    finally:
        os.close(fd)


def _read_policy_text(path: Path) -> str:
    """The file's text, or PolicyError: unreadable, not a regular file, too large, not
    UTF-8, or holding control characters (binary data)."""

    def refuse(line: int, message: str) -> PolicyError:
        return PolicyError([PolicyProblem(str(path), line, message)])

    try:
        status, data = read_capped(path, MAX_POLICY_BYTES)
    except OSError as exc:
        raise refuse(0, f"cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(status.st_mode):
        raise refuse(
            0,
            f"not a regular file ({file_kind(status.st_mode)}); a policy file must be a "
            "regular file or a symlink to one",
        )
    limit, size = _size(MAX_POLICY_BYTES), _size(status.st_size)
    if size == limit:  # "limited to 1 MiB (this one is 1 MiB)" would puzzle anyone
        limit, size = f"{MAX_POLICY_BYTES:,} bytes", f"{status.st_size:,} bytes"
    if data is None:
        raise refuse(
            0,
            f"policy files are limited to {limit} (this one is {size}); "
            "split it into several files",
        )
    if len(data) > MAX_POLICY_BYTES:
        raise refuse(
            0,
            f"policy files are limited to {limit} (this one grew past it while being read)",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise refuse(
            line,
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} at column {column} cannot be "
            "decoded; save policy files as UTF-8",
        ) from None
    bad = _NOT_YAML_TEXT.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        column = bad.start() - text.rfind("\n", 0, bad.start())
        raise refuse(
            line,
            f"binary data: control character U+{ord(bad.group()):04X} at column {column}; "
            "policy files are UTF-8 text",
        )
    return text


#: Characters YAML does not allow in a stream (c-printable's complement).
_NOT_YAML_TEXT = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


# --------------------------------------------------------------------------- parsing


class _LoadError(Exception):
    """A limit or value problem found while composing or constructing YAML."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def _line(event: Any) -> int:
    mark = getattr(event, "start_mark", None)
    return int(mark.line) + 1 if mark is not None else 1


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _BoundedComposer(Composer):
    """ruamel's composer with the policy limits enforced as nodes are composed.

    ``nodes`` counts every node of the file, an alias counting as the size of the node it
    refers to (known once that node is complete; an alias to a node still being composed is
    a recursive structure). The count is checked before anything is expanded.
    """

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        # Redefining an anchor is valid YAML; ruamel's warning for each would let one file
        # print thousands of them on every reload.
        self.warn_double_anchors = False
        self.nodes = 0
        self.documents = 0
        self.sizes: dict[int, int] = {}

    def compose_document(self) -> Any:
        self.documents += 1
        if self.documents > MAX_DOCUMENTS:
            raise _LoadError(
                _line(self.parser.peek_event()),
                f"more than {MAX_DOCUMENTS} YAML documents ('---'); a policy file holds at "
                f"most {MAX_DOCUMENTS} policies",
            )
        self.sizes = {}  # node ids are only meaningful within one document
        return super().compose_document()

    def _count(self, size: int, event: Any, alias: str | None = None) -> None:
        self.nodes += size
        if self.nodes <= MAX_YAML_NODES:
            return
        if alias is None:
            message = (
                f"more than {MAX_YAML_NODES:,} YAML values; policy files are limited to "
                f"{MAX_YAML_NODES:,} values, split it into several files"
            )
        else:
            message = (
                f"the alias *{_short(alias)} takes the file past {MAX_YAML_NODES:,} YAML "
                f"values; policy files are limited to {MAX_YAML_NODES:,} values, an alias "
                "counting as a copy of what it refers to"
            )
        raise _LoadError(_line(event), message)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        if isinstance(event, AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:  # an undefined alias is reported by the base class
                size = self.sizes.get(id(target))
                if size is None:
                    raise _LoadError(
                        _line(event),
                        f"the alias *{_short(str(event.anchor))} refers to a node that "
                        "contains it; policy files cannot hold recursive structures",
                    )
                self._count(size, event, alias=str(event.anchor))
            return super().compose_node(parent, index)
        if isinstance(event, SequenceStartEvent | MappingStartEvent):
            if self.depth >= MAX_NESTING_DEPTH:
                raise _LoadError(
                    _line(event),
                    f"nested more than {MAX_NESTING_DEPTH} levels deep; policy files are "
                    f"limited to {MAX_NESTING_DEPTH} levels of lists and mappings",
                )
        elif isinstance(event, ScalarEvent) and len(event.value) > MAX_SCALAR_CHARS:
            raise _LoadError(
                _line(event),
                f"a string of {len(event.value):,} characters starts here; policy strings "
                f"are limited to {MAX_SCALAR_CHARS:,} characters",
            )
        self._count(1, event)
        before = self.nodes
        node = super().compose_node(parent, index)
        if event.anchor is not None:
            self.sizes[id(node)] = self.nodes - before + 1
        return node


class _CheckedConstructor(RoundTripConstructor):
    """ruamel's round-trip constructor; a value it cannot build (``2001-13-45`` as a date,
    an integer of 5,000 digits) becomes a problem on the value's line, not a crash."""

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (YAMLError, _LoadError):
            raise
        except (ValueError, TypeError, ArithmeticError) as exc:
            reason = str(exc).split("; use sys.set_int_max_str_digits", 1)[0]
            raise _LoadError(node.start_mark.line + 1, f"invalid value: {reason}") from None


def _clip(message: str) -> str:
    message = " ".join(message.splitlines())
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 1] + "…"


def bound_problems(
    problems: Sequence[PolicyProblem], limit: int | None = None
) -> list[PolicyProblem]:
    """At most ``limit`` (default :data:`MAX_PROBLEMS_PER_FILE`) problems with messages cut
    to :data:`MAX_MESSAGE_CHARS`, then one "… and K more problems" pointing at the next."""
    limit = MAX_PROBLEMS_PER_FILE if limit is None else limit
    shown = [PolicyProblem(p.path, p.line, _clip(p.message)) for p in problems[:limit]]
    if len(problems) > limit:
        rest = len(problems) - limit
        first = problems[limit]
        shown.append(
            PolicyProblem(
                first.path, first.line, f"… and {rest} more problem{'s' * (rest > 1)} here"
            )
        )
    return shown


def _parse(path: Path, text: str) -> list[Any]:
    """The non-empty YAML documents of ``text``, or PolicyError (one problem: parsing
    stops at the first YAML error or limit)."""

    def refuse(line: int, message: str) -> PolicyError:
        return PolicyError(bound_problems([PolicyProblem(str(path), line, message)]))

    yaml = YAML(typ="rt")
    yaml.Composer = _BoundedComposer
    yaml.Constructor = _CheckedConstructor
    try:
        return [d for d in yaml.load_all(text) if d is not None]
    except _LoadError as exc:
        raise refuse(exc.line, exc.message) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise refuse(line, f"invalid YAML: {exc.problem or exc.context}") from None
    except YAMLError as exc:
        raise refuse(1, f"invalid YAML: {exc}") from None
    except (RecursionError, MemoryError) as exc:  # not expected within the limits above
        raise refuse(1, f"too complex to load ({type(exc).__name__})") from None


def read_documents(path: Path) -> list[Any]:
    """The non-empty YAML documents of the policy file ``path``, or PolicyError (the file
    cannot be read, is not a regular file, too large, not text, not YAML, over a limit)."""
    return _parse(path, _read_policy_text(path))
