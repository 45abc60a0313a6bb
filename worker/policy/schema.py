"""What every policy has, whatever its kind: the pydantic base and the field types.

A kind (``moderation``, ``tags``, …) is one module of this package with a policy class
deriving from :class:`PolicyBase` and a compiled class deriving from
:class:`worker.policy.compiled.CompiledPolicy`, registered in ``worker/policy/kinds.py``.
Nothing outside this package asks which kind a policy is: it asks the policy.
"""

from __future__ import annotations

import hashlib
import json
from abc import abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

from worker.policy.templates import TEMPLATE_SETS, template_problem

if TYPE_CHECKING:
    from worker.policy.heads import Materials

Action = Literal["flag", "review", "block"]
Severity = Literal["low", "medium", "high", "critical"]
Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
#: A path (relative to the policy file's folder), glob or URI of images or a hash file.
FileRef = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4096)]
#: Most image references one list of a policy may give.
MAX_IMAGE_REFS = 10_000
Ident = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
]
#: Actions from mildest to strongest.
ACTION_RANK: dict[str, int] = {"flag": 1, "review": 2, "block": 3}
#: Most categories of a moderation policy, or tags of a tags policy (each prompt is
#: encoded once per template, up to 80 times, when the policy is compiled).
MAX_CLASSES = 5_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def require_unique_ids(items: Sequence[Any], what: str) -> None:
    """A pydantic error naming the first repeated ``id`` among ``items``."""
    seen: set[str] = set()
    for index, item in enumerate(items):
        if item.id in seen:
            raise PydanticCustomError(
                "duplicate_id",
                "duplicate {what} id '{id}'",
                {"what": what, "id": item.id, "index": index},
            )
        seen.add(item.id)


def unique_ids(field: str, what: str) -> Any:
    """A field validator for a policy class: the list ``field`` repeats no ``id`` (a repeat
    is an error naming the ``what``). Use: ``_unique_tags = unique_ids("tags", "tag")``."""

    def check(cls: Any, value: Sequence[Any]) -> Sequence[Any]:
        require_unique_ids(value, what)
        return value

    return field_validator(field)(check)


class PolicyBase(Strict):
    """The fields and questions every kind of policy answers."""

    #: The ``kind:`` value of the YAML document (each subclass fixes it).
    KIND: ClassVar[str]
    #: Whether its classes carry ``threshold:`` lines that ``worker eval`` can write back.
    HAS_THRESHOLDS: ClassVar[bool] = False

    name: Ident
    description: str = ""
    templates: str | list[str] = "default"
    #: ``shadow``: scored and reported in ``policies[name]``, never in the top-level
    #: flags, labels or decision (trial a policy on live traffic before it acts).
    mode: Literal["live", "shadow"] = "live"

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
        body = self.model_dump(mode="json", exclude={"mode"})  # same heads live or shadow
        body["templates"] = list(self.template_list())
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    @abstractmethod
    def class_prompts(self) -> dict[str, list[str]]:
        """The classes it scores (category or tag ids, in order) and their prompts."""

    def class_ids(self) -> list[str]:
        return list(self.class_prompts())

    def background_prompts(self) -> list[str] | None:
        """Prompts of ordinary content every class is contrasted with, if the kind has any
        (fine-tuning uses them for unlabelled images)."""
        return None

    @abstractmethod
    def text_groups(self) -> list[list[str]]:
        """Every text head's templated texts, in the row order of the compiled matrix."""

    def image_refs(self) -> list[str]:
        """Every image reference (path, glob or URI, as written) the policy lists."""
        return []

    def hash_refs(self) -> list[str]:
        """Every hash file (as written) the policy lists."""
        return []

    def compile(self, materials: Materials, version: str) -> Any:
        """The kind's :class:`~worker.policy.compiled.CompiledPolicy`, from the embeddings
        of every text of :meth:`text_groups` and the images and hash lists it lists (each
        kind module implements it)."""
        raise NotImplementedError
