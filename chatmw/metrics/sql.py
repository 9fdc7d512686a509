"""SQL helpers shared by the metrics that aggregate in the database."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, text

__all__ = ["disable_jit", "split_sum", "joined_sum"]

# The divisor that splits a 64-bit integer into a quotient and a remainder for split_sum.
_SPLIT = 2**32


def disable_jit(connection: Connection) -> None:
    """Turn PostgreSQL's JIT compilation off for the rest of the current transaction.

    Correlated subqueries make the planner's cost estimates large enough to start JIT
    compilation, which then takes longer than the query it compiles (hundreds of
    milliseconds with PostgreSQL 15's defaults). ``SET LOCAL`` ends with the transaction,
    so pooled connections keep the server's setting. Other databases are left as they are.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SET LOCAL jit = off"))


def split_sum(column: Any) -> tuple[Any, Any]:
    """Return SQL sums of ``column``'s quotients and remainders by 2**32, for :func:`joined_sum`.

    SQLite fails with "integer overflow" when a sum of 64-bit integers leaves 64 bits, as a
    sum of conversion values in micros does from about 9.2 trillion. The sums of the parts
    stay within 64 bits for fewer than 2**31 rows. Both databases divide integers with
    truncation and give the remainder the dividend's sign, so each value equals its
    quotient times 2**32 plus its remainder, negative values included.
    """
    return (func.coalesce(func.sum(column // _SPLIT), 0),
            func.coalesce(func.sum(column % _SPLIT), 0))


def joined_sum(quotients: Any, remainders: Any) -> int:
    """Return the exact sum of a column from the two sums that :func:`split_sum` selects."""
    return int(quotients or 0) * _SPLIT + int(remainders or 0)
