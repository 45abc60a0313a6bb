"""Local files: one JSON file per job id in a directory, or JSON lines appended to a file.

``local:results.jsonl`` appends one line per delivery (fsync'd, under an exclusive lock, so
several worker processes may share the file). ``local:results/`` writes
``results/{job_id}.json`` atomically (temp file + rename), so a redelivered job overwrites
its file and never duplicates it.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.documents import Result
from worker.errors import RetryableSinkError
from worker.plugins import PluginContext, Sink


class LocalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="A *.jsonl file to append to, or a directory.")
    mode: Literal["auto", "jsonl", "dir"] = Field(
        "auto", description="auto: jsonl when path ends in .jsonl, else a directory."
    )


class LocalSink(Sink):
    name = "local"
    Options = LocalOptions
    target_option = "path"

    def __init__(self, options: LocalOptions, context: PluginContext) -> None:
        super().__init__(options, context)
        self.path = Path(options.path).expanduser()
        mode = options.mode
        if mode == "auto":
            mode = "jsonl" if self.path.suffix == ".jsonl" else "dir"
        self.mode = mode

    @classmethod
    def job_option_problem(cls, options: LocalOptions, context: PluginContext) -> str | None:
        """A job may write only under WORKER_SINK_ROOTS (symlinks and ``..`` resolved)."""
        roots = [Path(r).expanduser().resolve() for r in context.settings.sink_roots]
        target = Path(options.path).expanduser()
        if not target.is_absolute():
            return f"local sink path {options.path[:200]!r} must be absolute in a job"
        resolved = target.resolve()
        if any(resolved.is_relative_to(root) for root in roots):
            return None
        allowed = ", ".join(map(str, roots)) or "none configured"
        return f"local sink path {options.path[:200]!r} is outside WORKER_SINK_ROOTS ({allowed})"

    def deliver(self, result: Result) -> None:
        body = result.to_json()
        try:
            if self.mode == "jsonl":
                self._append(body)
            else:
                self._write_file(result.job_id, body)
        except OSError as exc:  # disk full, missing mount, permissions: may be fixed
            raise RetryableSinkError(f"cannot write {self.path}: {exc}") from exc

    def _append(self, body: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.write(body + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write_file(self, job_id: str, body: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{job_id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path / f"{job_id}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
