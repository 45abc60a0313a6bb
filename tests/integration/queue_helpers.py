"""Helpers the queue's integration tests share: a client on a worker's settings, whether
the queue has drained, and the result files a local sink wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from worker.client import Client
from worker.settings import load_settings

QUEUE = "moderation"


def queue_client(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, plugin_path: Path | None = None
) -> Client:
    """A queue client in this process on the worker's settings (with the test plugin
    package importable when ``plugin_path`` is given)."""
    if plugin_path is not None:
        monkeypatch.syspath_prepend(str(plugin_path))
    for key, value in env.items():
        if key.startswith("WORKER_"):
            monkeypatch.setenv(key, value)
    return Client(load_settings())


def queue_drained(url: str) -> bool:
    """Nothing waiting on the queue and nothing taken but unacknowledged."""
    r = redis.Redis.from_url(url)
    return r.llen(QUEUE) == 0 and r.hlen("unacked") == 0


def result_files(directory: Path) -> dict[str, dict[str, Any]]:
    """The result documents a local sink wrote to ``directory``, by job id."""
    return {p.stem: json.loads(p.read_text()) for p in directory.glob("*.json")}
