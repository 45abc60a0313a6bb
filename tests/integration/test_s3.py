"""S3 source and sink against moto's standalone server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import image_bytes, shape_image, wait_until
from tests.integration.conftest import AWS_ENV
from tests.processes import WorkerProcess, run_python

pytestmark = pytest.mark.integration


def _submit(env: dict[str, str], job: dict[str, Any]) -> None:
    proc = run_python(f"from worker.client import submit\nsubmit({job!r})", env)
    assert proc.returncode == 0, proc.stderr


def test_s3_job_writes_result_tags_and_sidecar_idempotently(
    s3: Any,
    s3_endpoint: str,
    queue_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    s3.create_bucket(Bucket="uploads")
    s3.create_bucket(Bucket="results")
    s3.put_object(
        Bucket="uploads", Key="cats/1.png", Body=image_bytes(shape_image("circle", "red"))
    )
    s3.put_object_tagging(
        Bucket="uploads",
        Key="cats/1.png",
        Tagging={"TagSet": [{"Key": "owner", "Value": "team-a"}]},
    )
    env = {
        **queue_env,
        **AWS_ENV,
        "WORKER_S3__ENDPOINT_URL": s3_endpoint,
        "WORKER_S3__ADDRESSING_STYLE": "path",
    }
    worker = start_worker(env=env)
    job = {
        "job_id": "upload-1",
        "image": {"uri": "s3://uploads/cats/1.png"},
        "sinks": [
            {"type": "s3", "prefix": "s3://results/mod/", "tag_source": True, "sidecar": True}
        ],
    }
    _submit(env, job)

    def stored() -> bool:
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="results").get("Contents", [])]
        return "mod/upload-1.json" in keys

    wait_until(stored, 60, "results/mod/upload-1.json")
    first = s3.get_object(Bucket="results", Key="mod/upload-1.json")
    doc = json.loads(first["Body"].read())
    assert doc["status"] == "ok"
    assert doc["image"]["uri"] == "s3://uploads/cats/1.png"
    tags = {
        t["Key"]: t["Value"]
        for t in s3.get_object_tagging(Bucket="uploads", Key="cats/1.png")["TagSet"]
    }
    assert tags["owner"] == "team-a"  # the object's own tag is kept
    assert tags["moderation-status"] == "ok"
    assert tags["moderation-flags"] == (" ".join(f["category"] for f in doc["flags"]) or "none")
    assert tags["moderation-labels"] == (" ".join(doc["labels"]) or "none")
    sidecar = s3.get_object(Bucket="uploads", Key="cats/1.png.moderation.json")["Body"].read()
    assert json.loads(sidecar) == doc

    _submit(env, job)  # the same job again: overwrite, not duplicate
    wait_until(lambda: len(worker.events("sink.delivered")) >= 2, 60, "the second delivery")
    listing = s3.list_objects_v2(Bucket="results")["Contents"]
    assert [o["Key"] for o in listing] == ["mod/upload-1.json"]
    again = s3.get_object(Bucket="results", Key="mod/upload-1.json")
    assert again["ETag"] == first["ETag"]  # byte-identical content
    assert worker.stop() == 0


def test_missing_s3_object_is_an_error_result(
    s3: Any,
    s3_endpoint: str,
    queue_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    s3.create_bucket(Bucket="uploads")
    env = {**queue_env, **AWS_ENV, "WORKER_S3__ENDPOINT_URL": s3_endpoint}
    start_worker(env=env)
    out = tmp_path / "out"
    _submit(
        env,
        {
            "job_id": "gone",
            "image": {"uri": "s3://uploads/nope.png"},
            "sinks": [{"type": "local", "path": str(out)}],
        },
    )
    wait_until((out / "gone.json").exists, 60, "the error result")
    doc = json.loads((out / "gone.json").read_text())
    assert doc["status"] == "error"
    assert doc["error"]["code"] == "source_not_found"
