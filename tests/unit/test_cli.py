"""The `worker` command line, run in-process (typer's CliRunner against the real app)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest

from tests.cli_runner import run_cli
from tests.helpers import GOOD_POLICY_ERRORS, write_images, write_policy
from worker.documents import SCHEMA_FILES, json_schemas

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def test_classify_twenty_images_with_two_bad_ones(
    tmp_path: Path, worker_env: dict[str, str]
) -> None:
    images = tmp_path / "imgs"
    write_images(images, 18)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + os.urandom(300))
    (images / "report.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n")
    proc = run_cli("classify", str(images / "*"), "--batch-size", "8", env=worker_env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 20
    schema = json.loads((SCHEMAS / SCHEMA_FILES["result"]).read_text())
    docs = [json.loads(line) for line in lines]
    for doc in docs:
        jsonschema.validate(doc, schema)
    by_name = {Path(d["image"]["uri"]).name: d for d in docs}
    assert sum(d["status"] == "ok" for d in docs) == 18
    assert by_name["corrupt.jpg"]["error"]["code"] == "image_unreadable"
    assert by_name["report.pdf"]["error"]["code"] == "image_unreadable"
    # stderr is not a terminal here, so the summary is one JSON log event like the rest
    [summary] = [
        event
        for event in map(json.loads, filter(None, proc.stderr.splitlines()))
        if event["event"] == "classify.finished"
    ]
    assert summary["images"] == 20
    assert summary["ok"] == 18
    assert summary["errors"] == {"image_unreadable": 2}
    assert summary["img_per_s"] > 0


def test_classify_directory_out_file_and_policy(tmp_path: Path, worker_env: dict[str, str]) -> None:
    write_images(tmp_path / "a" / "b", 3, fmt="JPEG")
    (tmp_path / "a" / "notes.txt").write_text("skipped: not an image suffix")
    out = tmp_path / "out.jsonl"
    proc = run_cli(
        "classify", str(tmp_path / "a"), "--policy", "shape-tags", "--out", str(out), env=worker_env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(docs) == 3
    assert all(list(d["policies"]) == ["shape-tags"] for d in docs)
    # Stable job ids: a re-run produces the same ids (sinks overwrite, never duplicate).
    again = run_cli(
        "classify", f"file://{tmp_path / 'a'}", "--policy", "shape-tags", env=worker_env
    )
    assert [json.loads(x)["job_id"] for x in again.stdout.splitlines()] == [
        d["job_id"] for d in docs
    ]


def test_classify_exits_1_when_nothing_is_readable(
    tmp_path: Path, worker_env: dict[str, str]
) -> None:
    (tmp_path / "x.png").write_bytes(b"nope")
    proc = run_cli(
        "classify", str(tmp_path / "x.png"), str(tmp_path / "missing.png"), env=worker_env
    )
    assert proc.returncode == 1
    codes = [json.loads(x)["error"]["code"] for x in proc.stdout.splitlines()]
    assert codes == ["image_unreadable", "source_not_found"]


def test_bad_policy_blocks_check_and_classify(tmp_path: Path, worker_env: dict[str, str]) -> None:
    bad = write_policy(tmp_path / "bad", GOOD_POLICY_ERRORS, "bad.yaml")
    check = run_cli("policies", "check", str(bad), env=worker_env)
    assert check.returncode == 1
    expected = f"{bad}:7: category 'weapons': threshold must be between 0 and 1, got 1.5"
    assert expected in check.stderr
    write_images(tmp_path / "imgs", 1)
    classify = run_cli("classify", str(tmp_path / "imgs"), "--policy", str(bad), env=worker_env)
    assert classify.returncode == 2
    assert expected in classify.stderr
    assert classify.stdout == ""


def test_policies_check_and_compile(
    tmp_path: Path, worker_env: dict[str, str], policy_dir: Path
) -> None:
    check = run_cli("policies", "check", env=worker_env)
    assert check.returncode == 0, check.stderr
    assert "2 policies in 1 file(s) are valid" in check.stderr
    first = run_cli("policies", "compile", env=worker_env)
    assert first.returncode == 0, first.stderr
    assert "seconds" in first.stdout
    rows = {
        line.split("│")[1].strip(): line
        for line in first.stdout.splitlines()
        if line.count("│") > 5
    }
    assert rows["shapes"].split("│")[5].strip() == "42"  # (3 + 1 + 2 prompts) x 7 templates
    second = run_cli("policies", "compile", env=worker_env)
    rows = {
        line.split("│")[1].strip(): line
        for line in second.stdout.splitlines()
        if line.count("│") > 5
    }
    assert rows["shapes"].split("│")[5].strip() == "0"  # all from the cache


def test_unloadable_model_is_a_clear_error(tmp_path: Path, worker_env: dict[str, str]) -> None:
    write_images(tmp_path / "imgs", 1)
    env = {**worker_env, "WORKER_MODEL__NAME": f"local-dir:{tmp_path / 'nowhere'}"}
    proc = run_cli("classify", str(tmp_path / "imgs"), env=env)
    assert proc.returncode == 2
    assert "WORKER_MODEL__NAME=local-dir:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_exported_schemas_are_in_sync() -> None:
    for name, schema in json_schemas().items():
        on_disk = json.loads((SCHEMAS / name).read_text())
        assert on_disk == schema, f"docs/schemas/{name} is stale: run `worker schemas`"
    assert run_cli("schemas", "--check", "--out", str(SCHEMAS)).returncode == 0


@pytest.mark.parametrize("command", [[], ["classify"], ["policies"], ["policies", "check"]])
def test_help(command: list[str]) -> None:
    proc = run_cli(*command, "--help")
    assert proc.returncode == 0
    assert "Usage" in proc.stdout
