"""A third-party sink, installed into the test environment through its own entry point.

``record:DIR`` writes ``DIR/{job_id}.json`` and appends every delivery to
``DIR/deliveries.jsonl``, so tests can count deliveries per job id. ``delay_ms`` makes
each delivery slow (to kill a worker mid-batch); ``fail_while`` makes deliveries fail
with a retryable error while that file exists.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from worker.documents import Result
from worker.errors import RetryableSinkError
from worker.plugins import PluginContext, Sink


class RecordOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    delay_ms: int = 0
    fail_while: str | None = None


class RecordingSink(Sink):
    name = "record"
    Options = RecordOptions
    target_option = "path"

    def __init__(self, options: RecordOptions, context: PluginContext) -> None:
        super().__init__(options, context)
        self.directory = Path(options.path)
        self.directory.mkdir(parents=True, exist_ok=True)

    def deliver(self, result: Result) -> None:
        if self.options.fail_while and Path(self.options.fail_while).exists():
            raise RetryableSinkError(f"{self.options.fail_while} exists")
        if self.options.delay_ms:
            time.sleep(self.options.delay_ms / 1000)
        body = result.to_json()
        tmp = self.directory / f".{result.job_id}.tmp"
        tmp.write_text(body)
        os.replace(tmp, self.directory / f"{result.job_id}.json")
        with (self.directory / "deliveries.jsonl").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(
                json.dumps({"job_id": result.job_id, "pid": os.getpid(), "body": body}) + "\n"
            )
            handle.flush()
