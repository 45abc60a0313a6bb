"""Policy files: the pydantic schema and the YAML loader that reports ``file:line: message``.

A policy file holds one or more YAML documents, each a ``moderation`` or ``tags`` policy.
Every problem found is reported with the line to fix; loading never stops at the first one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from worker.errors import PolicyError, PolicyProblem
from worker.policy_errors import describe, line_of
from worker.templates import TEMPLATE_SETS, template_problem

POLICY_SUFFIXES = (".yaml", ".yml")
Action = Literal["flag", "review", "block"]
Severity = Literal["low", "medium", "high", "critical"]
Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Ident = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
]
#: Actions from mildest to strongest.
ACTION_RANK: dict[str, int] = {"flag": 1, "review": 2, "block": 3}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _unique(items: Sequence[Any], what: str) -> None:
    seen: set[str] = set()
    for index, item in enumerate(items):
        if item.id in seen:
            raise PydanticCustomError(
                "duplicate_id",
                "duplicate {what} id '{id}'",
                {"what": what, "id": item.id, "index": index},
            )
        seen.add(item.id)


class Category(_Strict):
    """A moderation category: prompts describing it, and what to do when it scores high."""

    id: Ident
    prompts: list[Prompt] = Field(min_length=1)
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    action: Action = "flag"
    severity: Severity = "medium"
    description: str = ""


class Tag(_Strict):
    """A tag of a vocabulary; ``prompts`` default to the tag itself."""

    id: Prompt
    prompts: list[Prompt] = Field(default_factory=list)

    @model_validator(mode="after")
    def _default_prompts(self) -> Tag:
        if not self.prompts:
            object.__setattr__(self, "prompts", [self.id])
        return self


class _PolicyBase(_Strict):
    name: Ident
    description: str = ""
    templates: str | list[str] = "default"

    @field_validator("templates")
    @classmethod
    def _check_templates(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            if value not in TEMPLATE_SETS:
                raise ValueError(
                    f"unknown template set {value!r} (known: {', '.join(TEMPLATE_SETS)}), "
                    "or give a list of strings with '{}'"
                )
            return value
        if not value:
            raise ValueError("templates must not be empty")
        for template in value:
            problem = template_problem(template)
            if problem:
                raise ValueError(problem)
        return value

    def template_list(self) -> tuple[str, ...]:
        if isinstance(self.templates, str):
            return TEMPLATE_SETS[self.templates]
        return tuple(self.templates)

    def definition_hash(self) -> str:
        """sha256 of the policy as the scorer sees it (templates expanded)."""
        body = self.model_dump(mode="json")
        body["templates"] = list(self.template_list())
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class ModerationPolicy(_PolicyBase):
    """Categories scored one-vs-background; a score at or above the threshold is a flag."""

    kind: Literal["moderation"] = "moderation"
    background: list[Prompt] = Field(min_length=1)
    categories: list[Category] = Field(min_length=1)

    @field_validator("categories")
    @classmethod
    def _unique_categories(cls, value: list[Category]) -> list[Category]:
        _unique(value, "category")
        return value


class TagsPolicy(_PolicyBase):
    """A tag vocabulary scored with one softmax; the top_k tags above min_score are kept."""

    kind: Literal["tags"] = "tags"
    top_k: int = Field(5, ge=1)
    min_score: float = Field(0.0, ge=0.0, le=1.0)
    tags: list[Tag] = Field(min_length=1)

    @field_validator("tags", mode="before")
    @classmethod
    def _strings_are_tags(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"id": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("tags")
    @classmethod
    def _unique_tags(cls, value: list[Tag]) -> list[Tag]:
        _unique(value, "tag")
        return value


Policy = ModerationPolicy | TagsPolicy
POLICY_KINDS: dict[str, type[ModerationPolicy] | type[TagsPolicy]] = {
    "moderation": ModerationPolicy,
    "tags": TagsPolicy,
}


def class_ids(policy: Policy) -> list[str]:
    """The ids a policy scores: category ids, or tag ids."""
    if isinstance(policy, ModerationPolicy):
        return [c.id for c in policy.categories]
    return [t.id for t in policy.tags]


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy and where it was defined."""

    policy: Policy
    path: Path
    line: int

    @property
    def name(self) -> str:
        return self.policy.name


# --------------------------------------------------------------------------- loading


def _validate_document(
    doc: Any, path: Path, index: int, base_line: int
) -> tuple[Policy | None, list[PolicyProblem]]:
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
    if kind not in POLICY_KINDS:
        line = line_of(doc, ["kind"], base_line)
        what = "missing key 'kind'" if kind is None else f"unknown kind {kind!r}"
        return None, [PolicyProblem(str(path), line, f"{what} (moderation | tags)")]
    try:
        return POLICY_KINDS[kind].model_validate(data), []
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc, message = describe(doc, err)
            problems.append(PolicyProblem(str(path), line_of(doc, loc, base_line), message))
        return None, problems


def load_policy_file(path: Path) -> list[LoadedPolicy]:
    """Parse and validate every document in ``path``; raise PolicyError listing all problems."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError([PolicyProblem(str(path), 0, f"cannot read: {exc.strerror}")]) from None
    yaml = YAML(typ="rt")
    try:
        docs = [d for d in yaml.load_all(text) if d is not None]
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        message = f"invalid YAML: {exc.problem or exc.context}"
        raise PolicyError([PolicyProblem(str(path), line, message)]) from None
    except YAMLError as exc:
        raise PolicyError([PolicyProblem(str(path), 1, f"invalid YAML: {exc}")]) from None
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
        raise PolicyError(problems)
    return loaded


def policy_files(directory: Path) -> list[Path]:
    """The policy files of a directory, sorted by name."""
    return sorted(p for p in directory.iterdir() if p.suffix in POLICY_SUFFIXES and p.is_file())


def load_policies(paths: Iterable[Path]) -> list[LoadedPolicy]:
    """Load files and directories; every problem of every file in one PolicyError."""
    files: list[Path] = []
    problems: list[PolicyProblem] = []
    for path in paths:
        if path.is_dir():
            files.extend(policy_files(path))
        elif path.is_file():
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
    explicit = [Path(r) for r in refs if Path(r).is_file()]
    names = [r for r in refs if not Path(r).is_file()]
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
