"""A result's ``decision`` and routing results to sinks by it (``when=``).

:meth:`Decision.of` and the routing functions on their own first, then `worker classify`
in this process with the tiny model: a category's review band, sinks that take only some
decisions, and the mistakes refused before the model loads. The band bounds are not
guessed: a first run reads the scores the tiny model gives twelve images, and
``review_at`` and ``threshold`` go in the widest gaps between them, so that some images
land below the band, some in it and some above the threshold.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.cli_runner import run_cli
from tests.helpers import BANDED_POLICY, choose_bounds, write_images, write_policy
from worker.documents import DECISION_ACTIONS, Decision, Flag, Result
from worker.errors import PluginError
from worker.plugins import route_of, routes_to

# --------------------------------------------------------------------------- Decision.of


def flag(policy: str, category: str, action: str, score: float = 0.9) -> Flag:
    return Flag.model_validate(
        {
            "policy": policy,
            "category": category,
            "score": score,
            "threshold": 0.5,
            "action": action,
            "severity": "medium",
        }
    )


def test_no_flags_is_allow_with_no_categories() -> None:
    decision = Decision.of([])
    assert decision.action == "allow"
    assert decision.categories == []


@pytest.mark.parametrize(
    ("flags", "action", "categories"),
    [
        ([flag("p", "a", "flag")], "flag", ["p/a"]),
        ([flag("p", "a", "flag"), flag("p", "b", "review")], "review", ["p/b"]),
        ([flag("p", "a", "review"), flag("q", "a", "flag")], "review", ["p/a"]),
        (
            [
                flag("p", "a", "block"),
                flag("p", "b", "review"),
                flag("q", "c", "block"),
                flag("q", "d", "flag"),
            ],
            "block",
            ["p/a", "q/c"],
        ),
        # the weakest first: order of the flags does not decide, the action does
        (
            [flag("p", "d", "flag"), flag("p", "b", "review"), flag("q", "c", "block")],
            "block",
            ["q/c"],
        ),
        # one category flagged twice (two blocklist items, say) is named once
        ([flag("p", "a", "block", 0.9), flag("p", "a", "block", 0.8)], "block", ["p/a"]),
        # the same category id in two policies is two carriers
        ([flag("p", "a", "review"), flag("q", "a", "review")], "review", ["p/a", "q/a"]),
    ],
)
def test_strongest_action_wins_and_names_only_its_carriers(
    flags: list[Flag], action: str, categories: list[str]
) -> None:
    decision = Decision.of(flags)
    assert decision.action == action
    assert decision.categories == categories


FLAGS = st.lists(
    st.builds(
        flag,
        st.sampled_from(["p", "q"]),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["flag", "review", "block"]),
    ),
    max_size=8,
)


@given(FLAGS, st.randoms(use_true_random=False))
def test_decision_depends_on_which_flags_not_their_order(
    flags: list[Flag], rnd: random.Random
) -> None:
    decision = Decision.of(flags)
    shuffled = list(flags)
    rnd.shuffle(shuffled)
    again = Decision.of(shuffled)
    assert again.action == decision.action
    assert sorted(again.categories) == sorted(decision.categories)
    assert len(set(decision.categories)) == len(decision.categories)
    # every carrier's flag has the decision's action; every flag with it is a carrier
    carriers = {f"{f.policy}/{f.category}" for f in flags if f.action == decision.action}
    assert set(decision.categories) == carriers
    assert all(
        DECISION_ACTIONS.index(f.action) <= DECISION_ACTIONS.index(decision.action) for f in flags
    )


# --------------------------------------------------------------------------- route_of


@pytest.mark.parametrize(
    ("when", "actions"),
    [
        (None, None),
        ("review", {"review"}),
        ("review|block", {"review", "block"}),
        ("block | review", {"review", "block"}),
        (["allow", "flag"], {"allow", "flag"}),
    ],
)
def test_when_accepts_decisions_as_a_string_or_a_list(
    when: str | list[str] | None, actions: set[str] | None
) -> None:
    config: dict[str, Any] = {"type": "local", "path": "/tmp/x.jsonl"}
    if when is not None:
        config["when"] = when
    assert route_of(config) == (None if actions is None else frozenset(actions))


@pytest.mark.parametrize("when", ["delete", "", "review|", "Block", [], ["review", 3], 7])
def test_when_refuses_anything_but_decisions(when: object) -> None:
    with pytest.raises(PluginError) as caught:
        route_of({"type": "local", "path": "/tmp/x.jsonl", "when": when})
    message = str(caught.value)
    assert "when=" in message
    assert all(action in message for action in DECISION_ACTIONS)


def test_an_error_result_reaches_only_sinks_without_when() -> None:
    error = Result.model_validate(
        {
            "job_id": "e",
            "status": "error",
            "error": {"code": "image_unreadable", "message": "corrupt"},
            "image": {},
            "model": {"name": "m", "pretrained": "", "fingerprint": "f"},
        }
    )
    assert error.decision is None
    assert routes_to({"type": "local"}, error)
    for when in DECISION_ACTIONS:
        assert not routes_to({"type": "local", "when": when}, error)
    assert not routes_to({"type": "local", "when": "|".join(DECISION_ACTIONS)}, error)


# --------------------------------------------------------------------------- the bands

#: Calibration: nothing is flagged, only the scores are read.
NO_FLAGS = "    threshold: 1.0\n"
#: The narrowest gap a band bound may sit in (it sits in the middle: half of it each side).
IMAGES = 12


@dataclass(frozen=True)
class Banded:
    """Twelve images, their scores without a band, and a policy whose band splits them."""

    env: dict[str, str]
    images: Path
    scores: dict[str, float]  # image file name -> weapons score
    review_at: float
    threshold: float

    def expected(self, name: str) -> str:
        score = self.scores[name]
        if score >= self.threshold:
            return "block"
        return "review" if score >= self.review_at else "allow"


def by_name(stdout: str) -> dict[str, dict[str, Any]]:
    docs = [json.loads(line) for line in stdout.splitlines()]
    return {Path(d["image"]["uri"]).name: d for d in docs}


@pytest.fixture(scope="module")
def banded(tmp_path_factory: pytest.TempPathFactory, tiny_model_name: str) -> Banded:
    root = tmp_path_factory.mktemp("bands")
    images = root / "imgs"
    write_images(images, IMAGES)
    policies = root / "policies"
    write_policy(policies, BANDED_POLICY.format(bounds=NO_FLAGS), "mod.yaml")
    env = {
        "WORKER_MODEL__NAME": tiny_model_name,
        "WORKER_CACHE_DIR": str(root / "cache"),
        "WORKER_POLICY_DIR": str(policies),
        "WORKER_DEVICE": "cpu",
        "WORKER_LOG_FORMAT": "json",
    }
    first = run_cli("classify", str(images), env=env)
    assert first.returncode == 0, first.stderr
    scores = {
        name: d["policies"]["mod"]["scores"]["weapons"] for name, d in by_name(first.stdout).items()
    }
    assert len(scores) == IMAGES
    review_at, threshold = choose_bounds(list(scores.values()))
    print(f"\nweapons scores: {dict(sorted(scores.items(), key=lambda kv: kv[1]))}")
    print(f"review_at={review_at} threshold={threshold}")
    bounds = f"    threshold: {threshold}\n    review_at: {review_at}\n"
    write_policy(policies, BANDED_POLICY.format(bounds=bounds), "mod.yaml")
    return Banded(env, images, scores, review_at, threshold)


def test_review_band_decides_allow_review_or_the_category_action(banded: Banded) -> None:
    proc = run_cli("classify", str(banded.images), env=banded.env)
    assert proc.returncode == 0, proc.stderr
    results = by_name(proc.stdout)
    assert set(results) == set(banded.scores)
    seen = {banded.expected(name) for name in results}
    assert seen == {"allow", "review", "block"}, "every band holds an image"
    for name, doc in results.items():
        # review_at adds flags, it does not move scores
        assert doc["policies"]["mod"]["scores"] == {"weapons": banded.scores[name]}, name
        expected = banded.expected(name)
        assert doc["decision"]["action"] == expected, (name, doc["decision"])
        if expected == "allow":
            assert doc["flags"] == []
            assert doc["decision"]["categories"] == []
            continue
        [only] = doc["flags"]
        assert only["action"] == expected
        assert only["threshold"] == (banded.review_at if expected == "review" else banded.threshold)
        assert only["severity"] == "high"
        assert doc["decision"]["categories"] == ["mod/weapons"]
        assert doc["policies"]["mod"]["flags"] == doc["flags"]


def test_strongest_action_wins_across_policies(banded: Banded, tmp_path: Path) -> None:
    """A second policy flags every image (threshold 0, action flag): it decides only
    where nothing stronger fired, and is never named beside a stronger carrier."""
    policies = tmp_path / "policies"
    shutil.copytree(banded.env["WORKER_POLICY_DIR"], policies)
    write_policy(
        policies,
        "name: spam\nkind: moderation\nbackground: [a photo]\n"
        "categories:\n  - id: anything\n    prompts: [an image]\n    threshold: 0.0\n",
        "spam.yaml",
    )
    proc = run_cli(
        "classify", str(banded.images), env={**banded.env, "WORKER_POLICY_DIR": str(policies)}
    )
    assert proc.returncode == 0, proc.stderr
    for name, doc in by_name(proc.stdout).items():
        expected = banded.expected(name)
        flagged = {(f["policy"], f["category"], f["action"]) for f in doc["flags"]}
        assert ("spam", "anything", "flag") in flagged
        if expected == "allow":
            assert doc["decision"] == {"action": "flag", "categories": ["spam/anything"]}
        else:
            assert doc["decision"] == {"action": expected, "categories": ["mod/weapons"]}


def job_ids(path: Path) -> list[str]:
    return [json.loads(line)["job_id"] for line in path.read_text().splitlines()]


def test_sinks_take_only_the_decisions_they_name(banded: Banded, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    shutil.copytree(banded.images, images)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + os.urandom(300))
    out = tmp_path / "out"
    proc = run_cli(
        "classify",
        str(images),
        "--sink",
        f"local:{out / 'all.jsonl'}",
        "--sink",
        f"local:{out / 'review.jsonl'},when=review",
        "--sink",
        f"local:{out / 'blocks.jsonl'},when=block|review",
        "--sink",
        f"local:{out / 'allowed'},when=allow",  # a directory: one file per job
        env=banded.env,
    )
    assert proc.returncode == 0, proc.stderr
    results = by_name(proc.stdout)
    assert len(results) == IMAGES + 1
    corrupt = results.pop("corrupt.jpg")
    assert corrupt["status"] == "error"
    assert corrupt["error"]["code"] == "image_unreadable"
    assert corrupt["decision"] is None

    def ids(*actions: str) -> set[str]:
        return {d["job_id"] for n, d in results.items() if banded.expected(n) in actions}

    assert {d["decision"]["action"] for d in results.values()} == {"allow", "review", "block"}
    all_ids = job_ids(out / "all.jsonl")
    assert sorted(all_ids) == sorted([corrupt["job_id"], *ids("allow", "review", "block")])
    everything = [json.loads(line) for line in (out / "all.jsonl").read_text().splitlines()]
    assert everything == [json.loads(line) for line in proc.stdout.splitlines()]
    review = job_ids(out / "review.jsonl")
    blocks = job_ids(out / "blocks.jsonl")
    allowed = [p.stem for p in (out / "allowed").glob("*.json")]
    assert sorted(review) == sorted(ids("review"))  # sorted lists: no duplicates either
    assert sorted(blocks) == sorted(ids("review", "block"))
    assert sorted(allowed) == sorted(ids("allow"))
    assert corrupt["job_id"] not in {*review, *blocks, *allowed}
    delivered = json.loads((out / "allowed" / f"{allowed[0]}.json").read_text())
    assert delivered["decision"] == {"action": "allow", "categories": []}


@pytest.mark.parametrize("when", ["when=delete", "when=", "when=review|delete"])
def test_bad_when_is_refused_before_the_model_loads(
    banded: Banded, tmp_path: Path, when: str
) -> None:
    # No model where the settings point: had it been loaded first, that would be the error.
    env = {**banded.env, "WORKER_MODEL__NAME": f"local-dir:{tmp_path / 'no-model'}"}
    out = tmp_path / "out.jsonl"
    proc = run_cli("classify", str(banded.images), "--sink", f"local:{out},{when}", env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    message = " ".join(proc.stderr.split())
    assert "when=" in message
    assert all(action in message for action in DECISION_ACTIONS), message
    assert "WORKER_MODEL__NAME" not in message
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("bounds", "review_at", "threshold"),
    [
        ("threshold: 0.6\n    review_at: 0.7", "0.7", "0.6"),
        ("threshold: 0.6\n    review_at: 0.6", "0.6", "0.6"),  # the band would be empty
        ("review_at: 0.7", "0.7", "0.5"),  # against the default threshold
    ],
)
def test_review_at_at_or_above_threshold_is_a_policy_error(
    tmp_path: Path, banded: Banded, bounds: str, review_at: str, threshold: str
) -> None:
    bad = write_policy(
        tmp_path / "bad",
        "name: mod\nkind: moderation\nbackground: [an ordinary photo]\ncategories:\n"
        f"  - id: weapons\n    prompts: [a gun]\n    {bounds}\n",
        "bad.yaml",
    )
    # the category starts on line 5; review_at is its last line
    last = len(bad.read_text().splitlines())
    pattern = (
        rf"{re.escape(str(bad))}:(5|{last}): category 'weapons': review_at \({review_at}\) "
        rf"must be below threshold \({threshold}\)"
    )
    check = run_cli("policies", "check", str(bad), env=banded.env)
    assert check.returncode == 1
    assert re.search(pattern, check.stderr), check.stderr
    classify = run_cli("classify", str(banded.images), "--policy", str(bad), env=banded.env)
    assert classify.returncode == 2
    assert re.search(pattern, classify.stderr), classify.stderr
    assert classify.stdout == ""
