"""Pure parts of the adapters: the address guard, sink specs, signing, S3 tags."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook

from adapters.addresses import blocked_reason, parse_networks
from adapters.s3 import MAX_TAGS, merge_tags, result_tags
from adapters.webhook import decode_secret, retry_after_seconds, sign
from worker.documents import Flag, ImageInfo, ModelInfo, Result
from worker.errors import PluginError
from worker.plugins import parse_sink_spec
from worker.queue.delivery import backoff_delay

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.1",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.0.10",
        "169.254.169.254",
        "fe80::1",
        "fd00:ec2::254",
        "0.0.0.0",
        "::",
        "100.64.0.1",
        "224.0.0.1",
        "239.255.0.1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::1",
        "64:ff9b::a00:1",
        "192.0.2.1",
        "2001:db8::1",
    ],
)
def test_non_public_addresses_are_blocked(address: str) -> None:
    assert blocked_reason(address) is not None


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address: str) -> None:
    assert blocked_reason(address) is None


def test_allowlist_exempts_networks() -> None:
    allow = parse_networks(["10.20.0.0/16", "::1/128"])
    assert blocked_reason("10.20.3.4", allow) is None
    assert blocked_reason("::1", allow) is None
    assert blocked_reason("10.21.0.1", allow) is not None
    assert blocked_reason("::ffff:10.20.3.4", allow) is None  # mapped form of an allowed one


def test_sink_specs() -> None:
    assert parse_sink_spec("s3:s3://bucket/prefix/") == {
        "type": "s3",
        "prefix": "s3://bucket/prefix/",
    }
    assert parse_sink_spec("webhook:https://h/hook,secret=whsec_x,timeout_s=3") == {
        "type": "webhook",
        "url": "https://h/hook",
        "secret": "whsec_x",
        "timeout_s": "3",
    }
    assert parse_sink_spec("local:results.jsonl") == {"type": "local", "path": "results.jsonl"}
    with pytest.raises(PluginError, match=r"unknown sink 'ftp' \(known: .*local.*s3.*webhook"):
        parse_sink_spec("ftp:ftp://x/")
    with pytest.raises(PluginError, match="TYPE:TARGET"):
        parse_sink_spec("local")
    with pytest.raises(PluginError, match="not key=value"):
        parse_sink_spec("local:x.jsonl,fsync")


def test_signature_verifies_with_standardwebhooks() -> None:
    body = json.dumps({"job_id": "j1", "status": "ok"})
    now = int(datetime.now(UTC).timestamp())
    headers = {
        "webhook-id": "j1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(decode_secret(SECRET), "j1", now, body),
    }
    assert Webhook(SECRET).verify(body, headers) == {"job_id": "j1", "status": "ok"}
    with pytest.raises(PluginError, match="whsec_"):
        decode_secret("not-a-secret")


def test_retry_after_forms() -> None:
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    future = datetime.fromtimestamp(datetime.now(UTC).timestamp() + 30, UTC)
    seconds = retry_after_seconds(future.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    assert seconds is not None
    assert 25 <= seconds <= 31


def test_backoff_grows_caps_and_honours_retry_after() -> None:
    delays = [backoff_delay(a, 1.0, 8.0) for a in range(1, 7)]
    assert 0.5 <= delays[0] <= 1.0
    assert 4.0 <= delays[3] <= 8.0
    assert all(d <= 8.0 for d in delays)
    assert backoff_delay(1, 1.0, 8.0, retry_after=30) == 30


def _result(flags: list[tuple[str, str]], labels: list[str]) -> Result:
    return Result(
        job_id="j",
        status="ok",
        image=ImageInfo(uri="s3://b/k.jpg"),
        model=ModelInfo(name="m", pretrained="", fingerprint="f"),
        flags=[
            Flag(policy="p", category=c, score=0.9, threshold=0.5, action=a, severity="high")
            for c, a in flags
        ],
        labels=labels,
    )


def test_s3_tags_fit_limits_and_keep_existing() -> None:
    result = _result(
        [("weapons", "block"), ("drugs", "review")], ["dog (pet)!"] + [f"tag{i}" for i in range(80)]
    )
    ours = result_tags(result, "moderation-")
    assert dict(ours)["moderation-action"] == "block"
    assert dict(ours)["moderation-flags"] == "weapons drugs"
    assert all(len(v) <= 256 for _, v in ours)
    assert "!" not in dict(ours)["moderation-labels"]  # characters S3 refuses are replaced
    existing = [{"Key": f"team{i}", "Value": "x"} for i in range(8)] + [
        {"Key": "moderation-old", "Value": "y"}
    ]
    tags, dropped = merge_tags(existing, ours, "moderation-")
    assert len(tags) == MAX_TAGS
    assert [t["Key"] for t in tags[:8]] == [f"team{i}" for i in range(8)]
    assert [t["Key"] for t in tags[8:]] == ["moderation-status", "moderation-action"]
    assert dropped == 2
