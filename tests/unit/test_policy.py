"""Policy YAML: the schema, multi-document files and `file:line: message` errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from tests.helpers import ONE_CATEGORY_POLICY as GOOD
from tests.helpers import SHAPES_POLICY, write_policy
from worker.errors import PolicyError
from worker.policy import (
    ModerationPolicy,
    TagsPolicy,
    load_policies,
    load_policy_file,
    select_policies,
)
from worker.policy.templates import TEMPLATE_SETS
from worker.settings import SHIPPED_POLICY_DIR


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = write_policy(tmp_path, text, "p.yaml")
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    return [str(p) for p in info.value.problems]


def test_loads_both_documents_of_a_file(tmp_path: Path) -> None:
    loaded = load_policy_file(write_policy(tmp_path))
    assert [p.name for p in loaded] == ["shapes", "shape-tags"]
    mod, tags = loaded[0].policy, loaded[1].policy
    assert isinstance(mod, ModerationPolicy)
    assert isinstance(tags, TagsPolicy)
    assert mod.categories[1].prompts == ["a circle", "a round disc"]
    assert mod.categories[2].action == "flag"  # default
    assert [t.id for t in tags.tags] == ["circle", "square", "triangle", "red"]
    assert tags.tags[0].prompts == ["circle"]  # a plain string is its own prompt
    assert tags.tags[3].prompts == ["red", "crimson"]
    assert loaded[1].line == SHAPES_POLICY.splitlines().index("name: shape-tags") + 1


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    path = write_policy(tmp_path, GOOD.replace("name: mod\n", ""), "house-rules.yaml")
    assert load_policy_file(path)[0].name == "house-rules"


def test_named_and_explicit_templates(tmp_path: Path) -> None:
    mod = load_policy_file(write_policy(tmp_path))[0].policy
    assert mod.template_list() == TEMPLATE_SETS["simple"]
    assert len(TEMPLATE_SETS["default"]) == 80
    assert TEMPLATE_SETS["default"][0] == "a bad photo of a {}."


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("name: x\nkind: moderation\ncategories: [\n", 4, "invalid YAML"),
        (GOOD + "    colour: red\n", 8, "unknown key 'colour'"),
        (GOOD.replace("prompts: [a gun]", "prompts: []"), 6, "category 'weapons' has no prompts"),
        (GOOD.replace("threshold: 0.6", "threshold: 1.5"), 7, "must be between 0 and 1"),
        (GOOD.replace("threshold: 0.6", "threshold: -0.1"), 7, "must be between 0 and 1"),
        (GOOD + "  - id: weapons\n    prompts: [a knife]\n", 8, "duplicate category id 'weapons'"),
        (GOOD + "templates: ['a photo of a thing']\n", 8, "exactly one '{}'"),
        (GOOD + "templates: nope\n", 8, "unknown template set 'nope'"),
        (GOOD.replace("kind: moderation\n", ""), 1, "missing key 'kind'"),
        (GOOD.replace("kind: moderation", "kind: nsfw"), 2, "unknown kind 'nsfw'"),
        (GOOD.replace("background: [an ordinary photo]\n", ""), 1, "missing key 'background'"),
        (GOOD.replace("    prompts: [a gun]\n", ""), 5, "category 'weapons' has no prompts"),
        (GOOD.replace("action", "x") + "    action: ban\n", 8, "action"),
        (GOOD + "name: again\n", 8, "duplicate key"),
    ],
)
def test_bad_policy_reports_file_and_line(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    found = problems_of(tmp_path, text)
    path = str(tmp_path / "p.yaml")
    assert any(p.startswith(f"{path}:{line}: ") and fragment in p for p in found), found


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    text = GOOD.replace("threshold: 0.6", "threshold: 2") + "  - id: drugs\n    prompts: []\n"
    found = problems_of(tmp_path, text)
    assert len(found) == 2, found


def test_second_document_needs_a_name(tmp_path: Path) -> None:
    found = problems_of(tmp_path, GOOD + "---\n" + GOOD.replace("name: mod\n", ""))
    assert any(":9: missing key 'name'" in p for p in found), found


def test_duplicate_policy_names_across_files(tmp_path: Path) -> None:
    write_policy(tmp_path, GOOD, "a.yaml")
    write_policy(tmp_path, GOOD, "b.yaml")
    with pytest.raises(PolicyError, match=r"b\.yaml:1: duplicate policy name 'mod'"):
        load_policies([tmp_path])


def test_select_by_name_stem_or_path(tmp_path: Path) -> None:
    write_policy(tmp_path)
    assert [p.name for p in select_policies(["shape-tags"], tmp_path)] == ["shape-tags"]
    assert [p.name for p in select_policies(["shapes"], tmp_path)] == ["shapes", "shape-tags"]
    other = write_policy(tmp_path / "elsewhere", GOOD, "x.yaml")
    assert [p.name for p in select_policies([str(other)], tmp_path)] == ["mod"]
    with pytest.raises(PolicyError, match=r"unknown policy 'nope'.*known: shape-tags, shapes"):
        select_policies(["nope"], tmp_path)


def test_shipped_policies_are_valid_and_complete() -> None:
    loaded = {p.name: p.policy for p in load_policies([SHIPPED_POLICY_DIR])}
    mod, tags = loaded["moderation"], loaded["tags"]
    assert isinstance(mod, ModerationPolicy)
    assert isinstance(tags, TagsPolicy)
    ids = {c.id for c in mod.categories}
    expected = {
        "sexual_content",
        "graphic_violence",
        "weapons",
        "drugs",
        "self_harm",
        "hate_symbols",
        "alcohol",
        "tobacco",
        "gambling",
        "disturbing_medical",
    }
    assert expected <= ids
    assert len(mod.background) >= 5
    assert len(tags.tags) >= 100


prompt_text = (
    st.text(
        alphabet=st.characters(whitelist_categories=("L", "N"), whitelist_characters=" -'"),
        min_size=1,
        max_size=30,
    )
    .map(str.strip)
    .filter(bool)
)


@settings(max_examples=40, deadline=None)
@given(
    categories=st.lists(
        st.tuples(
            st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True),
            st.lists(prompt_text, min_size=1, max_size=3),
            st.floats(0, 1),
            st.sampled_from(["flag", "review", "block"]),
        ),
        min_size=1,
        max_size=5,
        unique_by=lambda c: c[0],
    ),
    background=st.lists(prompt_text, min_size=1, max_size=3),
)
def test_policy_round_trips_through_yaml(
    tmp_path_factory: pytest.TempPathFactory,
    categories: list[tuple[str, list[str], float, str]],
    background: list[str],
) -> None:
    policy = ModerationPolicy(
        name="p",
        background=background,
        categories=[
            {"id": i, "prompts": ps, "threshold": t, "action": a} for i, ps, t, a in categories
        ],
    )
    path = tmp_path_factory.mktemp("rt") / "p.yaml"
    with path.open("w") as handle:
        YAML(typ="safe", pure=True).dump(policy.model_dump(mode="json"), handle)
    again = load_policy_file(path)[0].policy
    assert again == policy
    assert again.definition_hash() == policy.definition_hash()
