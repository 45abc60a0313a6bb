"""Policy files: the YAML loader that reports ``file:line: message``.

A policy file holds one or more YAML documents, each a policy of a kind registered in
``worker/policy/kinds.py``.
Every problem found is reported with the line to fix; loading never stops at the first one.

Reading a file is bounded (a hostile or broken file is refused quickly and in bounded
memory): the limits and the YAML reading live in ``worker.policy.yaml_reader``; this
module turns its documents into policies, lists policy files and resolves ``--policy``.
Whole-file problems (unreadable, not a regular file, too large) are reported on line 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
)
from ruamel.yaml.comments import CommentedMap

from worker.errors import PolicyError, PolicyProblem
from worker.policy.kinds import POLICY_KINDS
from worker.policy.locations import describe, line_of, short_repr
from worker.policy.schema import PolicyBase
from worker.policy.yaml_reader import MAX_POLICY_BYTES, bound_problems, read_capped, read_documents

__all__ = [  # MAX_POLICY_BYTES and read_capped are imported from here by worker.queue.reload
    "MAX_POLICY_BYTES",
    "POLICY_SUFFIXES",
    "LoadedPolicy",
    "load_policies",
    "load_policy_file",
    "policy_files",
    "read_capped",
    "select_policies",
]

POLICY_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy and where it was defined."""

    policy: PolicyBase
    path: Path
    line: int

    @property
    def name(self) -> str:
        return self.policy.name


# --------------------------------------------------------------------------- loading


def _validate_document(
    doc: Any, path: Path, index: int, base_line: int
) -> tuple[PolicyBase | None, list[PolicyProblem]]:
    if not isinstance(doc, CommentedMap):
        return None, [PolicyProblem(str(path), base_line, "a policy document must be a mapping")]
    data = dict(doc)
    if "name" not in data and index == 0:
        data["name"] = path.stem
    elif "name" not in data:
        return None, [
            PolicyProblem(
                str(path),
                base_line,
                "missing key 'name' (only a file's first document may omit it)",
            )
        ]
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in POLICY_KINDS:
        line = line_of(doc, ["kind"], base_line)
        what = "missing key 'kind'" if kind is None else f"unknown kind {short_repr(kind)}"
        return None, [PolicyProblem(str(path), line, f"{what} ({' | '.join(POLICY_KINDS)})")]
    try:
        return POLICY_KINDS[kind].model_validate(data), []
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc, message = describe(doc, err)
            problems.append(PolicyProblem(str(path), line_of(doc, loc, base_line), message))
        return None, problems


def load_policy_file(path: Path) -> list[LoadedPolicy]:
    """Parse and validate every document in ``path``; raise PolicyError listing all problems
    (bounded: see the limits in the module docstring)."""
    docs = read_documents(path)
    if not docs:
        raise PolicyError([PolicyProblem(str(path), 1, "the file holds no policy")])
    loaded: list[LoadedPolicy] = []
    problems: list[PolicyProblem] = []
    for index, doc in enumerate(docs):
        base_line = doc.lc.line + 1 if isinstance(doc, CommentedMap) else 1
        policy, found = _validate_document(doc, path, index, base_line)
        problems.extend(found)
        if policy is not None:
            loaded.append(LoadedPolicy(policy, path, base_line))
    if problems:
        raise PolicyError(bound_problems(problems))
    return loaded


def policy_files(directory: Path) -> list[Path]:
    """The policy files of a directory, sorted by name: every ``*.yaml``/``*.yml`` entry but
    directories and dangling symlinks. A FIFO or a device is listed, so that loading refuses
    it with a message instead of skipping it silently."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.suffix in POLICY_SUFFIXES and p.exists() and not p.is_dir()
    )


def _is_file_ref(path: Path) -> bool:
    """True for anything that is there and not a directory (a FIFO or device included: the
    loader says why it is refused)."""
    return path.exists() and not path.is_dir()


def load_policies(paths: Iterable[Path]) -> list[LoadedPolicy]:
    """Load files and directories; every problem of every file in one PolicyError."""
    files: list[Path] = []
    problems: list[PolicyProblem] = []
    for path in paths:
        if path.is_dir():
            try:
                files.extend(policy_files(path))
            except OSError as exc:
                problems.append(PolicyProblem(str(path), 0, f"cannot list: {exc.strerror}"))
        elif _is_file_ref(path):
            files.append(path)
        else:
            problems.append(PolicyProblem(str(path), 0, "no such policy file or directory"))
    loaded: list[LoadedPolicy] = []
    seen: dict[str, LoadedPolicy] = {}
    for file in files:
        try:
            found = load_policy_file(file)
        except PolicyError as exc:
            problems.extend(exc.problems)
            continue
        for item in found:
            first = seen.get(item.name)
            if first is not None:
                problems.append(
                    PolicyProblem(
                        str(item.path),
                        item.line,
                        f"duplicate policy name {item.name!r} (first defined at "
                        f"{first.path}:{first.line})",
                    )
                )
                continue
            seen[item.name] = item
            loaded.append(item)
    if problems:
        raise PolicyError(problems)
    return loaded


def select_policies(refs: Sequence[str], policy_dir: Path) -> list[LoadedPolicy]:
    """Resolve ``--policy`` values: a path to a file, or a policy name / file stem in
    ``policy_dir``. No refs means every policy of ``policy_dir``."""
    if not refs:
        if not policy_dir.is_dir():
            raise PolicyError(
                [
                    PolicyProblem(
                        str(policy_dir),
                        0,
                        "policy directory does not exist (set WORKER_POLICY_DIR)",
                    )
                ]
            )
        return load_policies([policy_dir])
    explicit = [Path(r) for r in refs if _is_file_ref(Path(r))]
    names = [r for r in refs if not _is_file_ref(Path(r))]
    chosen = load_policies(explicit)
    if names:
        available = load_policies([policy_dir]) if policy_dir.is_dir() else []
        for name in names:
            matches = [p for p in available if name in (p.name, p.path.stem)]
            if not matches:
                known = sorted({p.name for p in available})
                raise PolicyError(
                    [
                        PolicyProblem(
                            str(policy_dir),
                            0,
                            f"unknown policy {name!r}: not a file and not a policy in this "
                            f"directory (known: {', '.join(known) or 'none'})",
                        )
                    ]
                )
            chosen.extend(m for m in matches if m.name not in {c.name for c in chosen})
    return chosen
