"""Result statuses and the counter columns they feed (compat.md section 3)."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_STATUS_ID = 25

# Counter column for status id N: id 1 feeds `untested_count`, id N > 1 feeds `status{N-1}_count`.
COUNT_COLUMNS: tuple[str, ...] = ("untested_count", *(f"status{i}_count" for i in range(1, MAX_STATUS_ID)))


# Run and thread `status`: running until completed, then failed if any result failed, else passed.
RUN_STATUS_PASSED = 2
RUN_STATUS_FAILED = 3
RUN_STATUS_RUNNING = 4


@dataclass(frozen=True)
class Status:
    id: int
    name: str
    system_name: str
    color: str
    is_final: bool = False
    is_untested: bool = False
    is_passed: bool = False
    is_failed: bool = False
    aliases: tuple[str, ...] = field(default=())


# Seeded by the first migration; an administrator may edit them or add custom ids 7..25 later.
DEFAULT_STATUSES: tuple[Status, ...] = (
    Status(1, "Untested", "untested", "#a3a3a3", is_untested=True, aliases=("untested",)),
    Status(2, "Passed", "passed", "#22c55e", is_final=True, is_passed=True,
           aliases=("passed", "pass", "success", "ok")),
    Status(3, "Failed", "failed", "#ef4444", is_final=True, is_failed=True,
           aliases=("failed", "fail", "failure", "error", "broken")),
    Status(4, "Retest", "retest", "#f59e0b", aliases=("retest",)),
    Status(5, "Blocked", "blocked", "#6b7280", is_final=True, aliases=("blocked",)),
    Status(6, "Skipped", "skipped", "#3b82f6", is_final=True,
           aliases=("skipped", "skip", "ignored", "disabled", "pending")),
)


# The status table as `Status` objects are made from it (`status_of`), by the shim and by the worker alike.
STATUS_TABLE_SQL = ("SELECT id, name, system_name, color, is_final, is_untested, is_passed, is_failed, aliases "
                    "FROM statuses ORDER BY id")


def status_of(row: Mapping[Any, Any]) -> Status:
    return Status(**{**row, "aliases": tuple(row["aliases"])})


def alias_map(statuses: tuple[Status, ...] | list[Status]) -> dict[str, int]:
    """Lower-cased accepted string -> status id."""
    return {alias.lower(): s.id for s in statuses for alias in s.aliases}
