"""Pure checks: which queue messages a worker takes, and what redaction takes out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.documents import Job
from worker.errors import MessageRefusedError
from worker.queue.delivery import sink_label
from worker.queue.intake import MAX_DEPTH, envelope_problem, job_of_message
from worker.redact import REDACTED, redact_config, redact_job, redact_text, redact_uri
from worker.sealing import Sealer, generate_key

pytestmark = pytest.mark.fault
TASK = "moderation.score"
HEADERS = {"task": TASK, "id": "abc"}
JOB = {"image": {"uri": "/data/x.png"}}


def take(body: Any, headers: Any = HEADERS, content_type: str = "application/json") -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return job_of_message(headers, content_type, raw, task_name=TASK, max_bytes=1 << 20)


def test_a_well_formed_call_gives_its_job() -> None:
    assert take([[JOB], {}, {"callbacks": None, "chain": None}]) == JOB
    assert take([[], {"job": JOB}, None]) == JOB


@pytest.mark.parametrize(
    ("body", "headers", "content_type", "reason"),
    [
        (None, HEADERS, "application/json", "got null"),
        (123, HEADERS, "application/json", "got int"),
        ({"a": 1}, HEADERS, "application/json", "got dict"),
        ([1], HEADERS, "application/json", "of length 1"),
        ([[JOB], {}, {}], {"task": "x.y"}, "application/json", "unknown task 'x.y'"),
        ([[JOB], {}, {}], None, "application/json", "no task header"),
        ([[JOB], {}, {}], HEADERS, "application/x-python-serialize", "only application/json"),
        ([[JOB, 1], {}, {}], HEADERS, "application/json", "exactly one argument"),
        ([[JOB], {"job": JOB}, {}], HEADERS, "application/json", "exactly one argument"),
        ([[], {"jobs": JOB}, {}], HEADERS, "application/json", "exactly one argument"),
        ([[[1]], {}, {}], HEADERS, "application/json", "got list"),
        ([JOB, {}, {}], HEADERS, "application/json", "args must be a list"),
        ([[JOB], {}, {"chain": [{}]}], HEADERS, "application/json", "not supported"),
        ([[JOB], {}, {}], {**HEADERS, "eta": "2999-01-01"}, "application/json", "'eta'"),
        (b"\xff\xfe{", HEADERS, "application/json", "not JSON"),
        (b"[" * 5000 + b"]" * 5000, HEADERS, "application/json", "nested deeper"),
    ],
)
def test_anything_else_is_refused_with_a_reason(
    body: Any, headers: Any, content_type: str, reason: str
) -> None:
    with pytest.raises(MessageRefusedError, match=reason.replace("(", r"\(")):
        take(body, headers, content_type)


def test_depth_just_under_the_limit_passes_and_over_it_is_refused() -> None:
    def nested(depth: int) -> Any:
        value: Any = 1
        for _ in range(depth):
            value = [value]
        return value

    take([[JOB], {}, {"x": nested(MAX_DEPTH - 3)}])
    with pytest.raises(MessageRefusedError, match="nested deeper"):
        take([[JOB], {}, {"x": nested(MAX_DEPTH)}])


def test_oversized_bodies_are_refused_before_decoding() -> None:
    with pytest.raises(MessageRefusedError, match="over the 100-byte"):
        job_of_message(HEADERS, "application/json", b"x" * 101, task_name=TASK, max_bytes=100)


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        (42, "a JSON int"),
        ({"body": 5}, "delivery_tag"),
        ({"properties": {"delivery_tag": "t", "body_encoding": "rot13"}}, "body encoding"),
        ({"properties": {"delivery_tag": "t"}, "body": 5}, "body is a int"),
        ({"properties": {"delivery_tag": "t"}, "headers": []}, "headers is a list"),
    ],
)
def test_envelopes_that_kombu_cannot_read_are_named(item: Any, problem: str) -> None:
    assert problem in (envelope_problem(item) or "")


def test_job_metadata_is_bounded() -> None:
    deep: Any = "x"
    for _ in range(17):
        deep = {"k": deep}
    with pytest.raises(ValueError, match="nested deeper than 16"):
        Job.model_validate({**JOB, "metadata": deep})
    with pytest.raises(ValueError, match="over 65536"):
        Job.model_validate({**JOB, "metadata": {"pad": "x" * 70_000}})
    with pytest.raises(ValueError, match=r"at most 8"):
        Job.model_validate({**JOB, "sinks": [{"type": "local", "path": "/x"}] * 9})


SIGNED = (
    "https://bucket.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIA123%2F20260101&X-Amz-Signature=abcdef0123&X-Amz-Expires=300"
)


def test_presigned_urls_lose_their_signature_and_keep_the_rest() -> None:
    clean = redact_uri(SIGNED)
    assert "abcdef0123" not in clean
    assert "AKIA123" not in clean
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in clean
    assert "X-Amz-Expires=300" in clean
    assert clean.startswith("https://bucket.s3.amazonaws.com/k.jpg?")
    assert redact_uri("https://user:pw@host/x") == f"https://user:{REDACTED}@host/x"
    assert redact_uri("https://t0k3n@host/x") == f"https://{REDACTED}@host/x"
    assert redact_uri("/plain/path.png") == "/plain/path.png"
    assert redact_uri("s3://bucket/key.png") == "s3://bucket/key.png"


def test_free_text_loses_secrets_wherever_they_stand() -> None:
    text = (
        "webhook:https://h/x,secret=whsec_QUJDREVGR0hJSktMTU5PUA==,token=t0k3n failed; "
        f'body {{"secret": "s3cr3t", "url": "{SIGNED}"}}'
    )
    clean = redact_text(text)
    for secret in ("QUJDREVGR0hJSktMTU5PUA", "t0k3n", "s3cr3t", "abcdef0123"):
        assert secret not in clean
    assert "webhook:https://h/x" in clean


def test_jobs_and_configs_report_what_they_lost() -> None:
    job = {**JOB, "sinks": [{"type": "webhook", "url": "https://h/x", "secret": "whsec_x"}]}
    clean, lost = redact_job(job)
    assert lost
    assert clean["sinks"][0]["secret"] == REDACTED
    assert redact_job(JOB) == (JOB, False)
    assert redact_config({"type": "local", "path": "/x"}) == {"type": "local", "path": "/x"}


def test_sealing_round_trips_only_with_the_same_key() -> None:
    key = generate_key()
    sealed = Sealer(key).seal({"secret": "whsec_x"})
    assert sealed is not None
    assert "whsec_x" not in sealed
    assert Sealer(key).open(sealed) == {"secret": "whsec_x"}
    assert Sealer(None).seal({"a": 1}) is None
    with pytest.raises(Exception, match="another WORKER_SECRET_KEY"):
        Sealer(generate_key()).open(sealed)
    with pytest.raises(Exception, match="worker secrets keygen"):
        Sealer("not a key")


def test_made_up_sink_names_share_one_metrics_label() -> None:
    assert sink_label("local") == "local"
    assert sink_label("made-up-1") == sink_label("made-up-2") == "unknown"
