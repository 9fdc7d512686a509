"""SQL helpers shared by the metrics that aggregate in the database."""

from __future__ import annotations

from sqlalchemy import Connection, text

__all__ = ["disable_jit"]


def disable_jit(connection: Connection) -> None:
    """Turn PostgreSQL's JIT compilation off for the rest of the current transaction.

    Correlated subqueries make the planner's cost estimates large enough to start JIT
    compilation, which then takes longer than the query it compiles (hundreds of
    milliseconds with PostgreSQL 15's defaults). ``SET LOCAL`` ends with the transaction,
    so pooled connections keep the server's setting. Other databases are left as they are.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SET LOCAL jit = off"))
