"""Policies: YAML files of prompts -> compiled heads -> scores and result sections.

| module | holds |
|---|---|
| ``schema`` | ``PolicyBase`` (what every kind has), field types, ``ACTION_RANK`` |
| ``moderation``, ``tags`` | one kind each: its policy class and its compiled class |
| ``kinds`` | ``POLICY_KINDS``: ``kind:`` -> policy class (the registry) |
| ``compiled`` | ``CompiledPolicy``, the interface the rest of the worker uses; ``Section`` |
| ``heads`` | **pure**: texts -> ensembled heads, ``compile_policy``, ``policy_version`` |
| ``scoring`` | **pure**: embeddings x heads -> scores (one-vs-background, softmax) |
| ``templates`` | named template sets |
| ``loading`` | documents -> policies with ``file:line: message`` problems, ``LoadedPolicy`` |
| ``yaml_reader`` | bounded reading of a policy file: size, text, YAML limits (``MAX_*``) |
| ``locations`` | a pydantic error -> the YAML line and a human name |
| ``policyset`` | ``PolicySet`` (compiled policies by name), ``compile_policies`` |

Nothing here imports Celery, boto3, the engine or the queue. The names below are the
package's public face.
"""

from worker.policy.compiled import CompiledPolicy, Section
from worker.policy.kinds import POLICY_KINDS
from worker.policy.loading import (
    MAX_POLICY_BYTES,
    LoadedPolicy,
    load_policies,
    load_policy_file,
    policy_files,
    select_policies,
)
from worker.policy.moderation import Category, CompiledModeration, ModerationPolicy
from worker.policy.schema import ACTION_RANK, PolicyBase
from worker.policy.tags import CompiledTags, Tag, TagsPolicy

__all__ = [
    "ACTION_RANK",
    "MAX_POLICY_BYTES",
    "POLICY_KINDS",
    "Category",
    "CompiledModeration",
    "CompiledPolicy",
    "CompiledTags",
    "LoadedPolicy",
    "ModerationPolicy",
    "PolicyBase",
    "Section",
    "Tag",
    "TagsPolicy",
    "load_policies",
    "load_policy_file",
    "policy_files",
    "select_policies",
]
