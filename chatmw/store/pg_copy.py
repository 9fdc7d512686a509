"""Rows sent to PostgreSQL by binary ``COPY`` into a temporary table, for one statement.

A batch of message rows travels cheaper this way than as one JSON document
(:func:`chatmw.store.identity._pg_rows`). On 20,000 message rows of ``bench/workload.py``
in batches of 2,000 (2-core machine, load average about 10), the server spent 12 to 13
microseconds of CPU per row on the copy and the ``INSERT ... SELECT`` against 15 to 16.5 for
the document, and the client 1.8 to 2.6 against 3.5 to 3.9. The staging table has one
column per row column, typed by its family (``text``, ``int8``, ``float8``, ``bool``), and
the ``SELECT`` casts each column to its table's type as the document path does, so both
store the same values.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import BigInteger, Boolean, Float, Integer, String, Table, text
from sqlalchemy.orm import Session

from chatmw.store.engine import json_text

__all__ = ["copy_into", "copy_rows"]

logger = logging.getLogger("chatmw")

# Binary COPY sends int8 and float8 values as they are, so an integer outside int8 or one
# that float8 cannot hold exactly leaves the batch to the document path, whose casts
# raise or round as before.
_INT8_MIN, _INT8_MAX = -(2**63), 2**63 - 1
_EXACT_FLOAT_INT = 2**53
_INT4_MIN, _INT4_MAX = -(2**31), 2**31 - 1
# The savepoint around a direct copy (see copy_into).
_SAVEPOINT = "chatmw_copy"
# The Session.info key of the number of the session's last staged batch. Staged rows last
# until their transaction ends, so the rows of one batch are those of its number.
_STAGED = "chatmw.copy_staged"


def copy_rows(session: Session, alias: str, types: dict[str, Any],
              rows: Sequence[Any], columns: Sequence[Sequence[Any]] | None = None) -> str | None:
    """Copy ``rows`` into a staging table and return SQL for them as a table ``alias``.

    The returned ``(SELECT ...) AS alias`` has the columns of ``types``, cast to them, in
    the order of ``rows``. It is valid until the transaction ends, because the staging
    table is emptied at each commit. Returns ``None``, having sent nothing, when a value
    does not fit its column's staging type (the caller then uses the JSON document path)
    or when the connection's driver is not psycopg 3. ``columns``, when given, holds the
    values of each column of ``types`` in row order, and ``rows`` are then not read.
    """
    dialect = session.get_bind().dialect
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        return None
    names = list(types)
    staging = [_staging_type(types[name]) for name in names]
    if None in staging:
        return None
    if columns is None:
        columns = [[row.get(name) for row in rows] for name in names]
    staged = _staged_columns(columns, names, staging, types, dialect)
    if staged is None:
        return None
    staging_types = [str(kind) for kind in staging]
    table = _ensure_table(session, names, staging_types)
    batch = session.info.get(_STAGED, 0) + 1
    session.info[_STAGED] = batch
    driver = session.connection().connection.driver_connection
    quoted = ", ".join(f'"{name}"' for name in names)
    command = f"COPY {table} (batch, ordinal, {quoted}) FROM STDIN (FORMAT BINARY)"
    with driver.cursor() as cursor, cursor.copy(command) as copy:  # type: ignore[union-attr]
        copy.set_types(["int4", "int4", *staging_types])
        for ordinal, values in enumerate(zip(*staged, strict=True)):
            copy.write_row((batch, ordinal, *values))
    type_names = [types[name].compile(dialect=dialect) for name in names]
    selected = ", ".join(f'CAST(s."{name}" AS {type_name}) AS {name}'
                         for name, type_name in zip(names, type_names, strict=True))
    return (f"(SELECT {selected} FROM {table} AS s WHERE s.batch = {batch} "
            f"ORDER BY s.ordinal) AS {alias}")


def copy_into(session: Session, table: Table, names: Sequence[str],
              columns: Sequence[Sequence[Any]]) -> bool:
    """Copy rows straight into ``table`` by binary ``COPY``, or send nothing and return False.

    ``columns`` contains the values of each column of ``names`` in row order. Nothing is sent
    when a value does not fit its column as stored, because an ``INSERT`` would cast such
    a value where ``COPY`` fails. Such values are a string longer than its ``VARCHAR``, an
    integer beyond its column's range and a type the copy does not carry. The copy runs in
    a savepoint. When the server rejects it (for example a key that another writer stored
    since the caller read the stored keys), the savepoint is rolled back, the transaction
    goes on, and the result is False. So either every row went in, in order, with ids
    drawn in that order, or none did.
    """
    dialect = session.get_bind().dialect
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        return False
    kinds = [_copy_type(table.c[name].type) for name in names]
    if None in kinds:
        return False
    # The conversions of copy_rows, by staging type: integers are checked against int8
    # first and against int4 below, and JSON values are serialised as text.
    staging: list[str] = []
    for kind in kinds:
        if kind in ("int4", "int8"):
            staging.append("int8")
        elif kind == "json":
            staging.append("text")
        else:
            staging.append(kind)
    types = {name: table.c[name].type for name in names}
    staged = _staged_columns(columns, names, staging, types, dialect)
    if staged is None or not all(
            _fits(values, kind, table.c[name].type)
            for values, kind, name in zip(staged, kinds, names, strict=True)):
        return False
    quoted = ", ".join(f'"{name}"' for name in names)
    connection = session.connection()
    driver = connection.connection.driver_connection
    connection.exec_driver_sql(f"SAVEPOINT {_SAVEPOINT}")
    try:
        with driver.cursor() as cursor, cursor.copy(  # type: ignore[union-attr]
                f"COPY {table.name} ({quoted}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["text" if kind == "json" else kind for kind in kinds])
            for values in zip(*staged, strict=True):
                copy.write_row(values)
    except Exception as error:  # noqa: BLE001 - the caller inserts the rows its own way instead
        logger.info("copy of %d rows into %s failed, so they are inserted with a conflict "
                    "check instead: %s", len(staged[0]) if staged else 0, table.name, error)
        connection.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
        connection.exec_driver_sql(f"RELEASE SAVEPOINT {_SAVEPOINT}")
        return False
    connection.exec_driver_sql(f"RELEASE SAVEPOINT {_SAVEPOINT}")
    return True


def _copy_type(column_type: Any) -> str | None:
    # The binary COPY type of a column as stored, for the types message rows use.
    affinity = getattr(column_type, "_type_affinity", None)
    if type(column_type).__name__ == "JSON":
        return "json"
    if affinity is String:
        return "text"
    if affinity is Integer:
        return "int8" if isinstance(column_type, BigInteger) else "int4"
    if affinity is Float:
        return "float8"
    if affinity is Boolean:
        return "bool"
    return None


def _fits(values: Sequence[Any], kind: str, column_type: Any) -> bool:
    if kind == "text":
        length = getattr(column_type, "length", None)
        return length is None or all(value is None or len(value) <= length for value in values)
    if kind == "int4":
        return all(value is None or _INT4_MIN <= value <= _INT4_MAX for value in values)
    return True


def _staging_type(column_type: Any) -> str | None:
    affinity = getattr(column_type, "_type_affinity", None)
    if affinity is String:
        return "text"
    if affinity is Integer:
        return "int8"
    if affinity is Float:
        return "float8"
    if affinity is Boolean:
        return "bool"
    if type(column_type).__name__ in ("JSON", "JSONB"):
        return "text"
    return None


def _staged_columns(values_by_column: Sequence[Sequence[Any]], names: Sequence[str],
                    staging: Sequence[str | None], types: dict[str, Any],
                    dialect: Any) -> list[Sequence[Any]] | None:
    # Each column's values, converted for its staging type, or None when one does not fit.
    columns: list[Sequence[Any]] = []
    for values, name, kind in zip(values_by_column, names, staging, strict=True):
        if type(types[name]).__name__ in ("JSON", "JSONB"):
            serialise: Callable[[Any], str] = types[name].bind_processor(dialect) or json_text
            columns.append([None if value is None else serialise(value) for value in values])
            continue
        converted = _converted(values, kind)
        if converted is None:
            return None
        columns.append(converted)
    return columns


def _converted(values: Sequence[Any], kind: str | None) -> Sequence[Any] | None:
    if kind == "text":
        return values if all(type(value) is str or value is None for value in values) else None
    if kind == "bool":
        return values if all(type(value) is bool or value is None for value in values) else None
    if kind == "int8":
        fits = all(value is None or (type(value) is int and _INT8_MIN <= value <= _INT8_MAX)
                   for value in values)
        return values if fits else None
    converted: list[Any] = []
    for value in values:
        if value is None or type(value) is float:
            converted.append(value)
        elif type(value) is int and -_EXACT_FLOAT_INT <= value <= _EXACT_FLOAT_INT:
            converted.append(float(value))
        else:
            return None
    return converted


def _ensure_table(session: Session, names: Sequence[str], staging_types: Sequence[str]) -> str:
    # One staging table per set of columns and types, created once per connection. Its
    # rows are deleted at each commit, so it never grows past one transaction's batches.
    spec = ",".join(f"{name}:{kind}" for name, kind in zip(names, staging_types, strict=True))
    table = f"chatmw_staging_{hashlib.sha1(spec.encode()).hexdigest()[:12]}"
    columns = ", ".join(f'"{name}" {kind}' for name, kind in zip(names, staging_types,
                                                                 strict=True))
    session.connection().execute(text(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {table} (batch int4, ordinal int4, {columns}) "
        "ON COMMIT DELETE ROWS"))
    return table

