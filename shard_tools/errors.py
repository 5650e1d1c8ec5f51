"""What the shard tools share in reporting: whole-run failures and the shard-set part of a run's result."""

from __future__ import annotations


class ToolError(SystemExit):
    """A tool failed as a whole. A SystemExit: the CLI exits 1 with this one-line message."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")
        self.message = message


class ShardSetTotals:
    """For result dataclasses holding the written `index` (index.json as a dict)."""

    index: dict

    @property
    def shards(self) -> int:
        return len(self.index.get("shards", []))

    @property
    def bytes(self) -> int:
        return sum(s["bytes"] for s in self.index.get("shards", []))
