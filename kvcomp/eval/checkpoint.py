"""Resume a killed evaluation: every finished sample's records go to a JSON-lines file as they finish.

A 52-prompt cell at 4K-8K tokens runs for hours on a 2-core CPU; a reboot, the OOM killer or a
session's end used to throw all of it away. ``Checkpoint(path, identity)`` appends one line per
sample (``{"key", "records"}``) and flushes it to disk; a rerun with the same ``identity`` (model,
dtype, methods' configs, sample grid) skips the samples it holds and returns their records. A file
written for another identity is refused with a clear error (never mixed). Each open appends a header
line with the commit of the code that runs, so a result assembled across commits says so
(``commits``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

__all__ = ["Checkpoint", "sample_key"]


def sample_key(method: str, sample: Any) -> str:
    """One sample of one method: the seed identifies the prompt (it is derived from task, haystack, length, trial)."""
    return "|".join(str(x) for x in (method, sample.task, sample.haystack, sample.context_len,
                                     sample.meta.get("trial"), sample.seed))


class Checkpoint:
    """Per-sample records of a run, on disk as they finish (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, identity: dict, commit: str | None = None) -> None:
        if not isinstance(identity, dict) or not identity:
            raise ValueError("identity must be a non-empty dict (what makes two runs' records comparable)")
        self.path = os.fspath(path)
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        self._done: dict[str, list[dict]] = {}
        self.commits: list[str] = []
        if os.path.exists(self.path):
            self._load()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.resumed = len(self._done)
        self._write({"identity": self.identity, "commit": commit})
        if commit not in self.commits:
            self.commits.append(commit)

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):  # the line being written when the run was killed: drop it
            data = data[: data.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(data))
        for n, line in enumerate(data.decode().splitlines(), 1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{self.path}:{n}: not a JSON line; delete the file to start over") from None
            if "identity" in obj:
                if obj["identity"] != self.identity:
                    diff = sorted(k for k in set(obj["identity"]) | set(self.identity)
                                  if obj["identity"].get(k) != self.identity.get(k))
                    raise ValueError(f"{self.path} holds another run's samples (differs in {diff}); "
                                     "delete it or choose another --out")
                if obj.get("commit") not in self.commits:
                    self.commits.append(obj.get("commit"))
            else:
                self._done[obj["key"]] = obj["records"]

    def _write(self, obj: dict) -> None:
        from .runner import _jsonable

        with open(self.path, "a") as f:
            f.write(json.dumps(obj, default=_jsonable) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def get(self, key: str) -> list[dict] | None:
        """The records of a finished sample, or None."""
        return self._done.get(key)

    def add(self, key: str, records: Sequence[dict]) -> None:
        """Store one finished sample's records (written and flushed before this returns)."""
        self._write({"key": key, "records": list(records)})

    def remove(self) -> None:
        """Delete the file (the run's result is written elsewhere)."""
        if os.path.exists(self.path):
            os.remove(self.path)
