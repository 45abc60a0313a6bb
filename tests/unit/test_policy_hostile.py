"""Hostile policy files are refused quickly, in bounded memory, with `file:line: message`.

Alias bombs, deep nesting, huge files, long strings, many documents, FIFOs, devices,
binary junk and non-UTF-8 text: each is a PolicyError naming the line, with a bounded
message, without reading or expanding the file into memory. Every case takes well under a
second of CPU (the worst, 1 MiB scanned by ruamel's pure-Python scanner, ~0.4 s); the test
bounds CPU time, which a busy test machine does not inflate, generously, and wall time more
generously still (nothing may block, e.g. on a FIFO).
"""

from __future__ import annotations

import itertools
import os
import random
import time
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import ONE_CATEGORY_POLICY as GOOD
from worker.errors import PolicyError, PolicyProblem
from worker.policy import ModerationPolicy
from worker.policy import yaml_reader as policy
from worker.policy.loading import load_policies, load_policy_file, policy_files
from worker.policy.schema import MAX_CLASSES
from worker.policy.yaml_reader import (
    MAX_DOCUMENTS,
    MAX_MESSAGE_CHARS,
    MAX_NESTING_DEPTH,
    MAX_POLICY_BYTES,
    MAX_PROBLEMS_PER_FILE,
    MAX_SCALAR_CHARS,
    MAX_YAML_NODES,
)
from worker.settings import SHIPPED_POLICY_DIR

pytestmark = pytest.mark.fault

#: Generous bounds: every case takes well under a second of CPU.
CPU_S = 2.0
WALL_S = 5.0
PEAK_BYTES = 50 * 1024 * 1024


def laughs(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs" bomb: each anchor is ``width`` aliases of the previous one."""
    names = "abcdefghijklmnop"
    text = f"a: &a [{', '.join(['lol'] * width)}]\n"
    for prev, name in itertools.pairwise(names[: levels + 1]):
        text += f"{name}: &{name} [{', '.join([f'*{prev}'] * width)}]\n"
    return text


def refuse(path: Path, loader: Callable[[Path], object] = load_policy_file) -> list[str]:
    """Load ``path``: must raise PolicyError within CPU_S, WALL_S and PEAK_BYTES, with
    bounded problems; returns them rendered."""
    started, cpu_started = time.perf_counter(), time.process_time()
    with pytest.raises(PolicyError) as info:
        loader(path)
    cpu = time.process_time() - cpu_started
    elapsed = time.perf_counter() - started
    tracemalloc.start()
    try:
        with pytest.raises(PolicyError):
            loader(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    problems = info.value.problems
    assert cpu < CPU_S, f"took {cpu:.2f} s of CPU"
    assert elapsed < WALL_S, f"took {elapsed:.2f} s"
    assert peak < PEAK_BYTES, f"peak {peak / 1e6:.1f} MB"
    assert 1 <= len(problems) <= MAX_PROBLEMS_PER_FILE + 1
    for problem in problems:
        assert isinstance(problem, PolicyProblem)
        assert len(problem.message) <= MAX_MESSAGE_CHARS, problem.message
        assert "\n" not in problem.message
    return [str(p) for p in problems]


def only(found: list[str], path: Path, line: int, *fragments: str) -> str:
    """The single problem, on ``path:line``, holding every fragment."""
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}:{line}: "), found[0]
    for fragment in fragments:
        assert fragment in found[0], found[0]
    return found[0]


def write(tmp_path: Path, data: str | bytes, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# --------------------------------------------------------------------------- aliases


def test_billion_laughs_is_refused_at_the_alias_that_crosses_the_budget(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, laughs())
    message = only(refuse(path), path, 5, "alias *d", f"{MAX_YAML_NODES:,} YAML values")
    assert "lol" not in message  # nothing is expanded into the text


def test_billion_laughs_on_one_line_in_a_policy(tmp_path: Path) -> None:
    bomb = laughs().replace("\n", ", ").rstrip(", ")
    path = write(tmp_path, f"name: x\nkind: tags\nbomb: {{{bomb}}}\ntags: [a]\n")
    only(refuse(path), path, 3, "alias *")


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nkind: tags\ntags: &t [a, *t]\n")
    only(refuse(path), path, 3, "alias *t refers to a node that contains it")


def test_aliases_under_the_budget_still_work(tmp_path: Path) -> None:
    text = """\
name: x
kind: moderation
background: &bg [an ordinary photo, a landscape]
categories:
  - &base {id: guns, prompts: [a gun], threshold: 0.7, action: block}
  - <<: *base
    id: knives
    prompts: *bg
"""
    [loaded] = load_policy_file(write(tmp_path, text))
    mod = loaded.policy
    assert isinstance(mod, ModerationPolicy)
    assert [(c.id, c.threshold, c.action) for c in mod.categories] == [
        ("guns", 0.7, "block"),
        ("knives", 0.7, "block"),
    ]
    assert mod.categories[1].prompts == ["an ordinary photo", "a landscape"]


def test_thousands_of_redefined_anchors_print_no_warnings(tmp_path: Path) -> None:
    items = ", ".join(f"&a x{i}" for i in range(3000))
    path = write(tmp_path, f"name: x\nkind: tags\nv: [{items}, *a]\ntags: [a]\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ruamel warns once per redefined anchor by default
        only(refuse(path), path, 3, "unknown key 'v'")


def test_an_aliased_value_is_not_expanded_into_the_message(tmp_path: Path) -> None:
    items = ", ".join(f"prompt number {i}" for i in range(500))
    text = f"name: x\nkind: tags\nvocab: &v [{items}]\ntop_k: *v\ntags: *v\n"
    path = write(tmp_path, text)
    found = refuse(path)
    assert any(p.startswith(f"{path}:4: ") and "top_k" in p for p in found), found
    assert not any("prompt number 499" in p for p in found), found


# --------------------------------------------------------------------------- nesting


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param("[" * 10_000 + "]" * 10_000, 1, id="flow-sequences-10000-deep"),
        pytest.param("{a: " * 10_000 + "}" * 10_000, 1, id="flow-mappings-10000-deep"),
        pytest.param("[" * MAX_POLICY_BYTES, 1, id="unclosed-brackets-1MiB"),
        pytest.param("- " * 10_000 + "x\n", 1, id="block-sequences-10000-deep"),
        pytest.param("".join(" " * i + "a:\n" for i in range(1000)), 33, id="block-mappings"),
        pytest.param(
            "name: x\nkind: tags\ntags:\n" + "".join("  " * i + "- \n" for i in range(1, 100)),
            35,  # line k nests k - 2 deep: the document, then one sequence a line
            id="deep-inside-a-policy",
        ),
    ],
)
def test_deep_nesting_is_refused(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, text)
    only(refuse(path), path, line, f"nested more than {MAX_NESTING_DEPTH} levels")


def test_nesting_at_the_limit_is_fine_for_yaml(tmp_path: Path) -> None:
    deep = "[" * (MAX_NESTING_DEPTH - 1) + "x" + "]" * (MAX_NESTING_DEPTH - 1)
    path = write(tmp_path, f"{GOOD}description: {deep}\n")
    found = refuse(path)  # refused by the schema (not a string), not by the depth limit
    only(found, path, 8, "description")


# --------------------------------------------------------------------------- size


def test_huge_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(50 * 1024 * 1024)  # sparse: 50 MiB of NULs, never read
    only(
        refuse(path),
        path,
        0,
        "policy files are limited to 1 MiB",
        "this one is 50 MiB",
    )


def test_one_byte_over_the_limit_is_refused_and_the_limit_is_not(tmp_path: Path) -> None:
    padding = MAX_POLICY_BYTES - len(GOOD) - 2
    at_limit = write(tmp_path, GOOD + "#" + "x" * padding + "\n", "at.yaml")
    assert at_limit.stat().st_size == MAX_POLICY_BYTES
    assert [p.name for p in load_policy_file(at_limit)] == ["mod"]
    over = write(tmp_path, GOOD + "#" + "x" * (padding + 1) + "\n", "over.yaml")
    only(refuse(over), over, 0, "limited to", f"{MAX_POLICY_BYTES + 1:,} bytes")


def test_symlink_to_a_huge_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "data" / "big.bin"
    target.parent.mkdir()
    with target.open("wb") as f:
        f.truncate(5 * MAX_POLICY_BYTES)
    link = tmp_path / "p.yaml"
    link.symlink_to(target)
    only(refuse(link), link, 0, "this one is 5 MiB")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_a_file_whose_size_lies_is_not_read_past_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    maps = Path("/proc/self/maps")  # a regular file whose stat size is 0
    assert maps.stat().st_size == 0
    monkeypatch.setattr(policy, "MAX_POLICY_BYTES", 100)
    only(refuse(maps), maps, 0, "limited to 100 bytes", "grew past it")


def test_very_long_string_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "description: " + "x" * 500_000 + "\n")
    only(refuse(path), path, 8, "500,000 characters", f"{MAX_SCALAR_CHARS:,}")


def test_very_long_quoted_prompt_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("[a gun]", '["' + "a gun " * 20_000 + '"]'))
    only(refuse(path), path, 6, "120,000 characters")


def test_very_long_line_of_values_hits_the_value_budget(tmp_path: Path) -> None:
    tags = ", ".join(f"t{i}" for i in range(MAX_YAML_NODES + 10))
    path = write(tmp_path, f"name: x\nkind: tags\ntags: [{tags}]\n")
    only(refuse(path), path, 3, f"more than {MAX_YAML_NODES:,} YAML values")


def test_value_budget_counts_every_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(policy, "MAX_YAML_NODES", 100)
    doc = "---\nname: p{}\nkind: tags\ntags: [" + ", ".join(["t"] * 10) + "]\n"
    path = write(tmp_path, "".join(doc.replace("{}", str(i)) for i in range(20)))
    # 17 values a document: the 101st is in the 6th document's tags, on line 6 * 4
    only(refuse(path), path, 24, "more than 100 YAML values")


def test_many_documents_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "---\n" * 100_000)
    only(refuse(path), path, MAX_DOCUMENTS + 1, f"more than {MAX_DOCUMENTS} YAML documents")


def test_too_many_tags(tmp_path: Path) -> None:
    tags = ", ".join(f"t{i}" for i in range(MAX_CLASSES + 1))
    path = write(tmp_path, f"name: x\nkind: tags\ntags: [{tags}]\n")
    only(refuse(path), path, 3, f"has {MAX_CLASSES + 1:,} entries", f"at most {MAX_CLASSES:,}")


# --------------------------------------------------------------------------- not files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    os.mkfifo(path)
    only(refuse(path), path, 0, "not a regular file (a FIFO)")
    # the CLI path (`worker policies check FILE`): named, not "no such file"
    only(refuse(path, lambda p: load_policies([p])), path, 0, "a FIFO")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_symlink_to_dev_zero_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.symlink_to("/dev/zero")
    only(refuse(path), path, 0, "not a regular file (a character device)")
    dev = Path("/dev/zero")
    only(refuse(dev, lambda p: load_policies([p])), dev, 0, "a character device")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_directory_names_every_hostile_file(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    write(directory, GOOD, "good.yaml")
    write(directory, laughs(), "bomb.yaml")
    os.mkfifo(directory / "fifo.yaml")
    (directory / "zero.yml").symlink_to("/dev/zero")
    (directory / "dangling.yaml").symlink_to(tmp_path / "nowhere")  # skipped, as before
    (directory / "sub.yaml").mkdir()  # skipped
    with (directory / "huge.yaml").open("wb") as f:
        f.truncate(50 * 1024 * 1024)
    listed = [p.name for p in policy_files(directory)]
    assert listed == ["bomb.yaml", "fifo.yaml", "good.yaml", "huge.yaml", "zero.yml"]
    found = refuse(directory, lambda p: load_policies([p]))
    assert [p.split(":", 1)[0] for p in found] == [
        str(directory / name) for name in ("bomb.yaml", "fifo.yaml", "huge.yaml", "zero.yml")
    ]


# --------------------------------------------------------------------------- not text


def test_binary_junk_is_refused(tmp_path: Path) -> None:
    junk = random.Random(0).randbytes(64 * 1024)
    path = write(tmp_path, junk)
    try:
        junk.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = junk.count(b"\n", 0, exc.start) + 1
    only(refuse(path), path, line, "not UTF-8 text")


def test_latin1_text_is_refused_on_its_line(tmp_path: Path) -> None:
    text = GOOD.replace("a gun", "a gun in a café")
    path = write(tmp_path, text.encode("latin-1"))
    only(refuse(path), path, 6, "not UTF-8 text: byte 0xe9 at column")


def test_utf16_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.encode("utf-16"))
    only(refuse(path), path, 1, "not UTF-8 text")


@pytest.mark.parametrize("junk", ["\x00", "\x07", "\x1b[31m", "\x7f"])
def test_control_characters_are_refused(tmp_path: Path, junk: str) -> None:
    path = write(tmp_path, GOOD.replace("a gun", f"a {junk}gun"))
    only(refuse(path), path, 6, f"control character U+{ord(junk[0]):04X} at column 17")


def test_nul_padded_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, b"\0" * 4096)
    only(refuse(path), path, 1, "U+0000")


def test_utf8_with_a_bom_and_crlf_still_loads(tmp_path: Path) -> None:
    path = write(tmp_path, ("\ufeff" + GOOD).replace("\n", "\r\n"))
    assert [p.name for p in load_policy_file(path)] == ["mod"]


# --------------------------------------------------------------------------- values


def test_values_yaml_cannot_build_are_problems_on_their_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("threshold: 0.6", "threshold: 2001-13-45"))
    only(refuse(path), path, 7, "invalid value: month must be in 1..12")
    path = write(tmp_path, "name: x\nkind: tags\ntop_k: " + "9" * 5000 + "\ntags: [a]\n")
    message = only(refuse(path), path, 3, "invalid value", "5000 digits")
    assert "set_int_max_str_digits" not in message


def test_many_problems_are_capped(tmp_path: Path) -> None:
    bad = "".join(f"  - id: c{i}\n    prompts: []\n" for i in range(1000))
    path = write(tmp_path, GOOD + bad)
    found = refuse(path)
    assert len(found) == MAX_PROBLEMS_PER_FILE + 1
    assert found[-1].endswith(f"… and {1000 - MAX_PROBLEMS_PER_FILE} more problems here")
    assert found[0] == f"{path}:9: category 'c0' has no prompts (or exemplars)"


def test_long_unknown_key_gives_a_short_message(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "? " + "k" * 9000 + "\n: 1\n")
    message = only(refuse(path), path, 8, "unknown key 'kkk")
    assert len(message) < len(str(path)) + 150


def test_long_unknown_kind_and_bad_id_give_short_messages(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("kind: moderation", "kind: " + "z" * 9000))
    only(refuse(path), path, 2, "unknown kind 'zzz")
    path = write(tmp_path, GOOD.replace("id: weapons", "id: '" + "!" * 9000 + "'"))
    only(refuse(path), path, 5, "must start with a letter or digit")


def test_shipped_policies_are_within_every_limit() -> None:
    shipped = SHIPPED_POLICY_DIR
    loaded = load_policies([shipped])
    assert {p.name for p in loaded} >= {"moderation", "tags"}
    for file in policy_files(shipped):
        assert file.stat().st_size * 50 < MAX_POLICY_BYTES
