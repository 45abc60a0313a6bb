"""The registry of policy kinds: the ``kind:`` of a YAML document -> its policy class.

Adding a kind is one module (a :class:`~worker.policy.schema.PolicyBase` subclass and a
:class:`~worker.policy.compiled.CompiledPolicy` subclass) and one line here.
"""

from __future__ import annotations

from worker.policy.blocklist import BlocklistPolicy
from worker.policy.moderation import ModerationPolicy
from worker.policy.schema import PolicyBase
from worker.policy.tags import TagsPolicy

POLICY_KINDS: dict[str, type[PolicyBase]] = {
    ModerationPolicy.KIND: ModerationPolicy,
    TagsPolicy.KIND: TagsPolicy,
    BlocklistPolicy.KIND: BlocklistPolicy,
}
