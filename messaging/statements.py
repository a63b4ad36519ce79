"""Statement shapes shared by the consumer's writers and the relay: parts under the parameter limit, padded IN lists."""
from __future__ import annotations

MAX_PARAMETERS = 30_000  # per statement: SQLite binds at most 32,766, PostgreSQL 65,535


def parts(values: list, size: int | None = None) -> list[list]:
    """`values` in lists of at most `size` (by default, one bound parameter each under MAX_PARAMETERS)."""
    size = size or MAX_PARAMETERS
    return [values[i:i + size] for i in range(0, len(values), size)]


def slots(count: int, most: int | None = None) -> int:
    """How many rows or values a SQLite statement is written for: `count` rounded up to a power of two.

    sqlite3 keeps each connection's last 128 statements compiled, by their text: written for the
    exact count, every batch size is a statement of its own, compiled afresh and kept, which grew
    a process's memory. Rounded, a connection needs a dozen shapes; the spare slots are NULL.
    """
    return min(1 << (count - 1).bit_length(), most or MAX_PARAMETERS) if count > 1 else 1


def padded(values: list) -> list:
    """`values` filled with NULLs (which match nothing in an IN list) to `slots(len(values))` values."""
    return values + [None] * (slots(len(values)) - len(values))
