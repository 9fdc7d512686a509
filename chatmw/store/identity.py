"""Contacts and conversations: find or create them for a batch of events."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Float,
    Integer,
    String,
    Table,
    any_,
    bindparam,
    cast,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from chatmw.events import fit_id
from chatmw.store.engine import json_text
from chatmw.store.models import Contact, Conversation
from chatmw.store.pg_copy import copy_into, copy_rows

__all__ = [
    "bulk_update",
    "id_in",
    "lock_rows",
    "insert_ignore",
    "insert_ignore_expected",
    "select_by_keys",
    "upsert",
    "KnownKeys",
    "resolve_contacts",
    "resolve_named_conversations",
    "assign_sessions",
    "OpenConversation",
    "CHUNK",
]

# Rows per IN list or multi-row INSERT: below SQLite's default limit of 32766 variables.
CHUNK = 500


def _insert(session: Session, table: Table) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"unsupported database dialect {dialect!r}: use SQLite or PostgreSQL")


def insert_ignore(session: Session, table: Table, rows: Sequence[dict[str, Any]],
                  conflict: Sequence[str]) -> None:
    """Insert ``rows``, skipping each row whose ``conflict`` columns already exist."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        _insert_ignore_pg(session, table, rows, conflict)
        return
    _insert_ignore_sqlite(session, table, rows, conflict)


def insert_ignore_expected(session: Session, table: Table, rows: Sequence[Any],
                           conflict: Sequence[str], expected: Sequence[Any],
                           names: Sequence[str] | None = None) -> bool:
    """Insert ``rows`` as :func:`insert_ignore` does, and return whether ``expected`` went in.

    ``expected`` are the ``key`` values of the rows the caller expects to be inserted, in
    row order. The result is true when those rows, and no others, were inserted, and
    their ids increase in that order. On PostgreSQL the statement returns the inserted
    keys and ids. On SQLite the inserted row count is compared, because SQLite gives new
    rows increasing ids and lets no other writer in while this transaction writes.
    PostgreSQL gets the expected rows by binary ``COPY`` straight into the table when
    they fit it (:func:`chatmw.store.pg_copy.copy_into`); otherwise, or when the copy fails
    (another writer stored one of the keys meanwhile), every row goes by ``COPY`` into a
    staging table, when their values fit it (:func:`chatmw.store.pg_copy.copy_rows`), and
    an ``INSERT ... ON CONFLICT DO NOTHING`` reads them from there. Rows are dicts, or
    sequences of the values of the columns ``names`` in that order.
    """
    if not rows:
        return not expected
    if names is None:
        names = list(rows[0])
        columns = None
    else:
        names, columns = _valued_columns(table, names, list(zip(*rows, strict=True)))
    if session.get_bind().dialect.name != "postgresql":
        if columns is None:
            return _insert_ignore_sqlite(session, table, rows, conflict) == len(expected)
        return _insert_sqlite_columns(session, table, names, columns, conflict) == len(expected)
    if columns is not None and conflict == ["key"]:
        # The expected rows alone, without the conflict check: the caller read the stored
        # keys in this transaction, so only a key another writer stored since then makes
        # the copy fail, and the statement below then skips it.
        first_rows = _expected_rows(columns[names.index("key")], expected)
        if first_rows is not None and copy_into(
                session, table, names, [[values[i] for i in first_rows] for values in columns]):
            return True
    types = _column_types(session, table, names)
    parameters: dict[str, Any] = {}
    source = copy_rows(session, "new_rows", types, rows, columns)
    if source is None:
        dict_rows = rows if columns is None else [dict(zip(names, values, strict=True))
                                                  for values in zip(*columns, strict=True)]
        source, parameters = _pg_rows(session, "new_rows", types, dict_rows)
    statement = text(
        f"INSERT INTO {table.name} ({', '.join(names)}) SELECT * FROM {source} "
        f"ON CONFLICT ({', '.join(conflict)}) DO NOTHING RETURNING key, id"
    )
    inserted = dict(session.connection().execute(statement, parameters).all())
    if len(inserted) != len(expected) or any(key not in inserted for key in expected):
        return False
    ids = [inserted[key] for key in expected]
    return all(earlier < later for earlier, later in zip(ids, ids[1:], strict=False))


def _expected_rows(keys: Sequence[Any], expected: Sequence[Any]) -> list[int] | None:
    # Indexes of the rows an insert that skips stored keys would store: the first row of
    # each expected key, which must come in the order of ``expected``. None otherwise.
    first_rows: list[int] = []
    position = 0
    for index, key in enumerate(keys):
        if position < len(expected) and key == expected[position]:
            first_rows.append(index)
            position += 1
    return first_rows if position == len(expected) else None


def _valued_columns(table: Table, names: Sequence[str],
                    columns: list[Sequence[Any]]) -> tuple[list[str], list[Sequence[Any]]]:
    # Leaves out the columns that are NULL in every row and have no server default, which
    # the insert then sets to NULL all the same. (Python's sqlite3 module binds each None
    # through its adapters, and a message batch has several such columns.)
    kept = [index for index, (name, values) in enumerate(zip(names, columns, strict=True))
            if values.count(None) < len(values) or table.c[name].server_default is not None]
    if len(kept) == len(names):
        return list(names), columns
    return [names[index] for index in kept], [columns[index] for index in kept]


def _insert_ignore_sqlite(session: Session, table: Table, rows: Sequence[dict[str, Any]],
                          conflict: Sequence[str]) -> int:
    # The driver's executemany with plain tuples: SQLAlchemy's per-row parameter handling
    # cost more than SQLite's own work on the message batches. Returns the rows inserted.
    names = list(rows[0])
    return _insert_sqlite_columns(session, table, names, _columns(rows, names), conflict)


def _insert_sqlite_columns(session: Session, table: Table, names: Sequence[str],
                           columns: list[Sequence[Any]], conflict: Sequence[str]) -> int:
    # ``columns`` contains the values of each of ``names``, one per row.
    dialect = session.get_bind().dialect.name
    if dialect != "sqlite":
        raise ValueError(f"unsupported database dialect {dialect!r}: use SQLite or PostgreSQL")
    processors = _bind_processors(session, table, names)
    statement = (
        f"INSERT INTO {table.name} ({', '.join(_quoted(names))}) "
        f"VALUES ({', '.join('?' for _ in names)}) "
        f"ON CONFLICT ({', '.join(_quoted(conflict))}) DO NOTHING"
    )
    result = session.connection().exec_driver_sql(statement, _processed(columns, processors))
    return int(result.rowcount)


def _quoted(names: Sequence[str]) -> list[str]:
    return [f'"{name}"' for name in names]


def _bind_processors(session: Session, table: Table, names: Sequence[str]) -> list[Any]:
    dialect = session.get_bind().dialect
    return [table.c[name].type.bind_processor(dialect) for name in names]


def _tuples(rows: Sequence[dict[str, Any]], names: Sequence[str],
            processors: Sequence[Any]) -> list[tuple[Any, ...]]:
    return _processed(_columns(rows, names), processors)


def _columns(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> list[Sequence[Any]]:
    # One itemgetter call per row reads every column, when every row has every column
    # (a missing one counts as None).
    try:
        if len(names) < 2:
            raise KeyError(names)
        return list(zip(*map(itemgetter(*names), rows), strict=True))
    except KeyError:
        return [[row.get(name) for row in rows] for name in names]


def _processed(columns: list[Sequence[Any]], processors: Sequence[Any]) -> list[tuple[Any, ...]]:
    # The rows of ``columns`` as tuples. Only the columns with a bind processor (Boolean
    # and JSON on SQLite) are processed, column by column.
    if any(processors):
        columns = list(columns)
        for index, processor in enumerate(processors):
            if processor is not None:
                columns[index] = [processor(value) for value in columns[index]]
    return list(zip(*columns, strict=True))


def _insert_ignore_pg(session: Session, table: Table, rows: Sequence[dict[str, Any]],
                      conflict: Sequence[str], returning: str | None = None) -> list[Any]:
    # One INSERT ... SELECT per batch: psycopg's executemany sends a statement per row, and
    # a multi-row VALUES list is compiled anew for every length. With ``returning``, the
    # statement returns those columns of the inserted rows.
    names = list(rows[0])
    source, parameters = _pg_rows(session, "new_rows", _column_types(session, table, names), rows)
    statement = text(
        f"INSERT INTO {table.name} ({', '.join(names)}) SELECT * FROM {source} "
        f"ON CONFLICT ({', '.join(conflict)}) DO NOTHING"
        + (f" RETURNING {returning}" if returning else "")
    )
    result = session.connection().execute(statement, parameters)
    return result.all() if returning else []


def _column_types(session: Session, table: Table, names: Sequence[str]) -> dict[str, Any]:
    return {name: table.c[name].type for name in names}


def _pg_rows(session: Session, alias: str, types: dict[str, Any],
             rows: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Return SQL for a PostgreSQL table ``alias`` of ``rows`` (columns: ``types``) and parameters.

    The rows travel as one JSON document of arrays, read by ``jsonb_array_elements``:
    ``json.dumps`` serialises a batch in a fraction of the time psycopg takes to adapt one
    array per column. (``jsonb`` rather than ``json``, because ``->>`` on ``json`` parses
    the row again for every column.) Each value is cast to its column's type, as the array
    path casts each array, so both store the same values: ``VARCHAR(n)`` casts truncate in
    both, and a float's repr, cast to ``float8``, is the same double. Rows that JSON cannot
    carry exactly (dates, decimals, floats in integer columns) take the array path.
    """
    dialect = session.get_bind().dialect
    names = list(types)
    type_names = [types[name].compile(dialect=dialect) for name in names]
    # psycopg's dialect has no JSON bind processor (the driver adapts dicts itself), but
    # these values travel as text, so they are serialised here.
    json_columns = {i: types[name].bind_processor(dialect) or json_text
                    for i, (name, type_name) in enumerate(zip(names, type_names, strict=True))
                    if type_name in ("JSON", "JSONB")}
    affinities = [getattr(types[name], "_type_affinity", None) for name in names]
    integer_columns = {i for i, affinity in enumerate(affinities) if affinity is Integer}
    float_columns = {i for i, affinity in enumerate(affinities) if affinity is Float}
    document = _rows_document(rows, names, json_columns, integer_columns, float_columns)
    if document is None:
        return _pg_arrays(alias, names, type_names, json_columns, rows)
    selected = ", ".join(f"CAST(e.v->>{i} AS {type_name}) AS {name}"
                         for i, (name, type_name) in enumerate(zip(names, type_names, strict=True)))
    elements = f"jsonb_array_elements(CAST(:{alias} AS JSONB))"
    source = f"(SELECT {selected} FROM {elements} AS e(v)) AS {alias}"
    return source, {alias: document}


def _rows_document(rows: Sequence[dict[str, Any]], names: Sequence[str],
                   json_columns: dict[int, Any], integer_columns: set[int],
                   float_columns: set[int]) -> str | None:
    # JSON values travel as their serialised text, the same text the array path sends.
    # A float or bool in an integer column goes the array way, where PostgreSQL casts it
    # to an integer, because its JSON text (``5.0``, ``true``) is no valid integer input.
    # Floats travel as strings of their repr, which ``float8`` reads back exactly, NaN,
    # infinities and -0.0 included. A JSON number read by jsonb loses the sign of 0.
    columns = []
    for i, name in enumerate(names):
        values = [row.get(name) for row in rows]
        if i in integer_columns and any(type(value) in (float, bool) for value in values):
            return None
        if i in float_columns:
            values = [float.__repr__(value) if isinstance(value, float) else value
                      for value in values]
        if i in json_columns:
            processor = json_columns[i]
            values = [None if value is None else processor(value) for value in values]
        columns.append(values)
    try:
        return json.dumps(list(zip(*columns, strict=True)), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None


def _pg_arrays(alias: str, names: Sequence[str], type_names: Sequence[str],
               json_columns: dict[int, Any],
               rows: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    # ``unnest`` of one array parameter per column.
    casts = []
    parameters: dict[str, list[Any]] = {}
    for i, (name, type_name) in enumerate(zip(names, type_names, strict=True)):
        values = [row.get(name) for row in rows]
        parameter = f"{alias}_{name}"
        if i in json_columns:
            processor = json_columns[i]
            values = [None if value is None else processor(value) for value in values]
            casts.append(f"CAST(CAST(:{parameter} AS TEXT[]) AS {type_name}[])")
        else:
            casts.append(f"CAST(:{parameter} AS {type_name}[])")
        parameters[parameter] = values
    return f"unnest({', '.join(casts)}) AS {alias}({', '.join(names)})", parameters



def upsert(session: Session, table: Table, rows: Sequence[dict[str, Any]],
           conflict: Sequence[str], update_columns: Sequence[str]) -> None:
    """Insert ``rows``; where the ``conflict`` columns exist, overwrite ``update_columns``."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    keys = {tuple(row[name] for name in conflict) for row in rows}
    # One statement for the whole list, unless it names a row twice: a single INSERT ... ON
    # CONFLICT may not update the same row twice, while row-by-row updates apply in order.
    if len(keys) == len(rows) and dialect in ("postgresql", "sqlite"):
        _upsert_at_once(session, table, rows, conflict, update_columns)
        return
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start:start + CHUNK]
        statement = _insert(session, table)
        statement = statement.on_conflict_do_update(
            index_elements=conflict,
            set_={name: statement.excluded[name] for name in update_columns},
        )
        session.execute(statement, list(chunk))


def _upsert_at_once(session: Session, table: Table, rows: Sequence[dict[str, Any]],
                    conflict: Sequence[str], update_columns: Sequence[str]) -> None:
    names = list(rows[0])
    assignments = ", ".join(f'"{name}" = excluded."{name}"' for name in update_columns)
    action = f"DO UPDATE SET {assignments}" if update_columns else "DO NOTHING"
    target = f"ON CONFLICT ({', '.join(_quoted(conflict))}) {action}"
    if session.get_bind().dialect.name == "sqlite":
        statement = (f"INSERT INTO {table.name} ({', '.join(_quoted(names))}) "
                     f"VALUES ({', '.join('?' for _ in names)}) {target}")
        processors = _bind_processors(session, table, names)
        session.connection().exec_driver_sql(statement, _tuples(rows, names, processors))
        return
    source, parameters = _pg_rows(session, "new_rows", _column_types(session, table, names), rows)
    statement = text(f"INSERT INTO {table.name} ({', '.join(_quoted(names))}) "
                     f"SELECT * FROM {source} {target}")
    session.connection().execute(statement, parameters)


def update_from(session: Session, table: Table, rows: Sequence[dict[str, Any]],
                types: dict[str, Any], where: str, assignments: str) -> int:
    """Run one ``UPDATE table SET assignments FROM changes WHERE where`` for all ``rows``.

    ``changes`` is :func:`derived_table` of ``rows``. ``where`` and ``assignments`` are SQL
    that refer to ``changes.NAME``. A target row matched by two changes rows is updated
    once, by either, so callers pass one change per target row. Returns the rows updated.
    """
    if not rows:
        return 0
    source, parameters = derived_table(session, "changes", types, rows)
    statement = text(f"UPDATE {table.name} SET {assignments} FROM {source} WHERE {where}")
    return int(session.connection().execute(statement, parameters).rowcount)


def derived_table(session: Session, alias: str, types: dict[str, Any],
                  rows: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Return SQL for a table ``alias`` of ``rows`` (columns: ``types``) and its parameters.

    PostgreSQL gets :func:`_pg_rows`; SQLite gets ``json_each`` of one JSON document
    (``UPDATE ... FROM`` needs SQLite 3.33 or later). Either way one statement text serves
    every number of rows.
    """
    names = list(types)
    if session.get_bind().dialect.name == "postgresql":
        return _pg_rows(session, alias, types, rows)
    columns = ", ".join(f"json_extract(value, '$[{i}]') AS {name}" for i, name in enumerate(names))
    document = json.dumps([[row[name] for name in names] for row in rows])
    return f"(SELECT {columns} FROM json_each(:{alias})) AS {alias}", {alias: document}


def bulk_update(session: Session, table: Table, rows: Sequence[dict[str, Any]],
                columns: Sequence[str]) -> int:
    """Set ``columns`` on the rows of ``table`` whose ``id`` is each row's ``id``.

    PostgreSQL gets one ``UPDATE ... FROM`` statement over :func:`_pg_rows`, because
    executemany sends a statement per row; SQLite runs in process, where executemany is as fast.
    Returns the rows updated.
    """
    if not rows:
        return 0
    dialect = session.get_bind().dialect
    if dialect.name != "postgresql":
        assignments = ", ".join(f'"{name}" = ?' for name in columns)
        names = (*columns, "id")
        processors = _bind_processors(session, table, names)
        result = session.connection().exec_driver_sql(
            f"UPDATE {table.name} SET {assignments} WHERE id = ?",
            _tuples(rows, names, processors))
        return int(result.rowcount)
    names = ("id", *columns)
    source, parameters = _pg_rows(session, "changes", _column_types(session, table, names), rows)
    assignments = ", ".join(f"{name} = changes.{name}" for name in columns)
    statement = text(f"UPDATE {table.name} SET {assignments} FROM {source} "
                     f"WHERE {table.name}.id = changes.id")
    return int(session.connection().execute(statement, parameters).rowcount)


def id_in(session: Session, column: Any, ids: Iterable[int]) -> ColumnElement[bool]:
    """Return ``column IN ids`` as one bound parameter, whatever the number of ids.

    PostgreSQL gets ``= ANY(array)`` and SQLite ``IN (SELECT value FROM json_each(...))``:
    an expanded ``IN (?, ?, ...)`` list is a new statement text for each length, which
    both drivers parse and plan again, and it is bounded by SQLite's variable limit.
    """
    values = list(map(int, ids))
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(cast(bindparam(None, values, unique=True), ARRAY(column.type)))
    table = func.json_each(bindparam(None, json.dumps(values), unique=True)).table_valued("value")
    return column.in_(select(table.c.value))


def select_by_keys(session: Session, table: Table, key_columns: Sequence[str],
                   keys: Sequence[tuple[Any, ...]], result_columns: Sequence[str]) -> list[Any]:
    """Return ``result_columns`` of the rows whose ``key_columns`` equal one of ``keys``.

    The keys travel as one JSON document joined to the table, so one statement text
    serves every batch.
    """
    if not keys:
        return []
    selected = ", ".join(f"t.{name}" for name in result_columns)
    if session.get_bind().dialect.name == "postgresql":
        types = _column_types(session, table, key_columns)
        key_rows = [dict(zip(key_columns, key, strict=True)) for key in keys]
        source, parameters = _pg_rows(session, "k", types, key_rows)
        on = " AND ".join(f"t.{name} = k.{name}" for name in key_columns)
        statement = text(f"SELECT {selected} FROM {source} JOIN {table.name} AS t ON {on}")
        return session.connection().execute(statement, parameters).all()
    on = " AND ".join(f"t.{name} = json_extract(k.value, '$[{i}]')"
                      for i, name in enumerate(key_columns))
    statement = text(f"SELECT {selected} FROM json_each(:keys) AS k JOIN {table.name} AS t ON {on}")
    document = json.dumps([list(key) for key in keys])
    return session.connection().execute(statement, {"keys": document}).all()


class KnownKeys:
    """Natural keys of rows found stored, with their ids, at most ``size`` of them.

    :func:`resolve_contacts` and :func:`resolve_named_conversations` neither insert nor
    read the rows it holds: they return the remembered ids. An id is stale when erasure or
    retention removed its row or a failed transaction never stored it, and SQLite may give
    that id to another row. So the caller checks the ids in the same transaction and calls
    :meth:`clear` when one is wrong (see ``chatmw.store.writer``). The oldest keys are
    dropped first.
    """

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._ids: dict[Any, int] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, key: Any) -> int | None:
        """Return the remembered id of ``key``, or ``None``."""
        return self._ids.get(key)

    def add(self, ids: Mapping[Any, int]) -> None:
        """Remember the id of each key of ``ids``."""
        entries = self._ids
        entries.update(ids)
        excess = len(entries) - self.size
        if excess > 0:
            for key in list(itertools.islice(entries, excess)):
                del entries[key]

    def clear(self) -> None:
        """Forget every key."""
        self._ids.clear()


def _resolve(session: Session, table: Table, wanted: Mapping[tuple[str, str], Any],
             make_row: Callable[[tuple[str, str], Any], dict[str, Any]],
             known: KnownKeys | None) -> dict[tuple[str, str], int]:
    # Takes the ids that ``known`` holds, inserts the other rows and reads their ids. A row
    # that the insert skipped and that is gone when read (removed by another transaction
    # in between) is inserted again. ``make_row`` builds the row of a key and its value in
    # ``wanted``, for the keys that ``known`` does not hold only.
    keys = sorted(wanted)
    found: dict[tuple[str, str], int] = {}
    unknown = keys
    if known is not None:
        unknown = []
        for key in keys:
            row_id = known.get(key)
            if row_id is None:
                unknown.append(key)
            else:
                found[key] = row_id
    if not unknown:
        _hold_write_lock(session, table)
        return found
    rows = {key: make_row(key, wanted[key]) for key in unknown}
    read = _insert_new_keys(session, table, unknown, [rows[key] for key in unknown])
    stored = [key for key in unknown if key not in read]
    if stored:
        for channel, external, row_id in select_by_keys(
                session, table, ("channel", "external_id"), stored,
                ("channel", "external_id", "id")):
            read[(channel, external)] = row_id
    if len(read) < len(unknown):
        missing = [key for key in unknown if key not in read]
        insert_ignore(session, table, [rows[key] for key in missing], ["channel", "external_id"])
        for channel, external, row_id in select_by_keys(
                session, table, ("channel", "external_id"), missing,
                ("channel", "external_id", "id")):
            read[(channel, external)] = row_id
    if known is not None:
        known.add(read)
    found.update(read)
    return found


def _insert_new_keys(session: Session, table: Table, keys: Sequence[tuple[str, str]],
                     rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], int]:
    # Inserts ``rows`` (one per ``(channel, external_id)`` of ``keys``, in that order),
    # skipping existing keys, and returns the ids of the rows it inserted. The ids of the
    # skipped keys are read afterwards by the caller.
    conflict = ["channel", "external_id"]
    if session.get_bind().dialect.name == "postgresql":
        returned = _insert_ignore_pg(session, table, rows, conflict,
                                     returning="channel, external_id, id")
        return {(channel, external): row_id for channel, external, row_id in returned}
    inserted = _insert_ignore_sqlite(session, table, rows, conflict)
    if inserted != len(rows):
        return {}
    # Every row went in. This transaction holds SQLite's write lock, so no other writer
    # inserted meanwhile, and an integer primary key gives each new row the largest id
    # plus one: the new ids are the last ``inserted`` ids, in row order. Once the largest
    # id is 2**63 - 1, SQLite picks unused ids at random instead, and the last new id is
    # then not the largest: the caller reads the ids back.
    last, largest = session.connection().exec_driver_sql(
        f"SELECT last_insert_rowid(), max(id) FROM {table.name}").one()
    if last != largest:
        return {}
    first = int(last) - inserted + 1
    return {key: first + offset for offset, key in enumerate(keys)}


def _hold_write_lock(session: Session, table: Table) -> None:
    # The insert that known rows skip made an SQLite transaction the writer, and the reads
    # after it (latest conversations, conversation figures) rely on that. The driver runs
    # reads before a transaction's first write outside it, where another process may write
    # in between. An update of no row takes the write lock all the same.
    if session.get_bind().dialect.name == "sqlite":
        session.connection().exec_driver_sql(f"UPDATE {table.name} SET id = id WHERE 0")


def resolve_contacts(session: Session, identities: dict[tuple[str, str], int],
                     known: KnownKeys | None = None) -> dict[tuple[str, str], int]:
    """Return contact ids for ``(channel, external_id)`` pairs, creating missing contacts.

    ``identities`` maps each pair to the earliest time (ms) it was seen in the batch.
    Concurrent writers are safe: the unique constraint decides, and ids are read back.
    The pairs in ``known`` get their remembered ids, unchecked.
    """
    if not identities:
        return {}
    return _resolve(session, Contact.__table__, identities, _contact_row, known)


def _contact_row(identity: tuple[str, str], at_ms: int) -> dict[str, Any]:
    return {"channel": identity[0], "external_id": identity[1], "first_seen_ms": at_ms,
            "last_seen_ms": at_ms}


def resolve_named_conversations(
    session: Session, wanted: dict[tuple[str, str], tuple[int, int | None]],
    known: KnownKeys | None = None,
) -> dict[tuple[str, str], int]:
    """Return conversation ids for ``(channel, external_id)``, creating missing ones.

    ``wanted`` maps each pair to ``(earliest time in ms, contact id)``. The pairs in
    ``known`` get their remembered ids, unchecked.
    """
    if not wanted:
        return {}
    return _resolve(session, Conversation.__table__, wanted, _conversation_row, known)


def _conversation_row(identity: tuple[str, str], value: tuple[int, int | None]) -> dict[str, Any]:
    at_ms, contact_id = value
    return {"channel": identity[0], "external_id": identity[1], "contact_id": contact_id,
            "started_at_ms": at_ms, "last_message_at_ms": at_ms, "message_count": 0,
            "user_message_count": 0, "handed_off": False}


@dataclass(slots=True)
class OpenConversation:
    """The latest conversation of a contact, with the times sessionisation compares."""

    id: int
    started_at_ms: int
    last_message_at_ms: int
    ended_at_ms: int | None
    key: tuple[str, str] | None = None


def lock_rows(session: Session, table: Table, ids: Iterable[int]) -> None:
    """Lock the rows of ``table`` with ``ids`` until the transaction ends, in id order.

    Writers that lock contacts this way before they lock conversations wait for each other
    instead of deadlocking. A writer that has waited then reads what the other committed.
    ``FOR NO KEY UPDATE`` is the lock an ``UPDATE`` of non-key columns takes, so foreign
    key checks of other transactions (``FOR KEY SHARE``) do not wait for it. PostgreSQL
    only, because SQLite lets one writer in at a time.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    ordered = sorted(set(ids))
    if not ordered:
        return
    session.connection().execute(
        text(f"SELECT id FROM {table.name} WHERE id = ANY(CAST(:ids AS BIGINT[])) "
             "ORDER BY id FOR NO KEY UPDATE"),
        {"ids": ordered})


def _latest_conversations(session: Session, channel_contacts: Sequence[tuple[str, int]]) -> dict[
        tuple[str, int], OpenConversation]:
    # One statement for every pair: each pair's latest conversation by start time, the
    # highest id among conversations that started at the same millisecond.
    source, parameters = derived_table(
        session, "pairs", {"channel": String(), "contact_id": Integer()},
        [{"channel": channel, "contact_id": contact_id}
         for channel, contact_id in channel_contacts])
    # ``|| ''`` keeps the planners off the (channel, external_id) index, which matches
    # every conversation of the channel, and on the (contact_id, started_at_ms) one.
    latest_of_pair = (
        "SELECT l.id, l.started_at_ms, l.last_message_at_ms, l.ended_at_ms FROM conversations AS l "
        "WHERE l.contact_id = pairs.contact_id AND l.channel || '' = pairs.channel "
        "ORDER BY l.started_at_ms DESC, l.id DESC LIMIT 1")
    if session.get_bind().dialect.name == "postgresql":
        # A correlated ``c.id = (subquery)`` makes PostgreSQL scan every conversation.
        statement = text(
            "SELECT pairs.channel, pairs.contact_id, c.id, c.started_at_ms, c.last_message_at_ms, "
            f"c.ended_at_ms FROM {source} CROSS JOIN LATERAL ({latest_of_pair}) AS c")
    else:
        # SQLite has no LATERAL, but it runs the correlated subquery once per pair.
        statement = text(
            "SELECT pairs.channel, pairs.contact_id, c.id, c.started_at_ms, c.last_message_at_ms, "
            f"c.ended_at_ms FROM {source} JOIN conversations AS c "
            f"ON c.id = (SELECT latest.id FROM ({latest_of_pair}) AS latest)")
    latest: dict[tuple[str, int], OpenConversation] = {}
    rows = session.connection().execute(statement, parameters).all()
    for channel, contact_id, conversation_id, started, last, ended in rows:
        latest[(channel, int(contact_id))] = OpenConversation(conversation_id, started, last, ended)
    return latest


# The conversation of a contact on a channel that covers a late message's time (within the
# gap), the latest first. {p} is the driver's placeholder.
_COVERING_SQL = (
    "SELECT id, started_at_ms, last_message_at_ms, ended_at_ms FROM conversations "
    "WHERE channel = {p} AND contact_id = {p} AND started_at_ms <= {p} "
    "AND (last_message_at_ms >= {p} OR started_at_ms >= {p}) "
    "ORDER BY started_at_ms DESC LIMIT 1")
_COVERING_SQLITE = _COVERING_SQL.format(p="?")
_COVERING_POSTGRESQL = _COVERING_SQL.format(p="%s")


def _covering_conversation(session: Session, channel: str, contact_id: int, at_ms: int,
                           gap_ms: int) -> OpenConversation | None:
    # Runs once per late message, so a fixed text goes to the driver's connection, in the
    # session's transaction. On SQLite that took about 11 µs a call, and the same query
    # built from expressions and run through the session about 390 µs (bench/late_lookup.py).
    connection = session.connection()
    dialect = connection.dialect
    sql = _COVERING_SQLITE if dialect.name == "sqlite" else _COVERING_POSTGRESQL
    lower = at_ms - gap_ms
    parameters = (channel, contact_id, at_ms + gap_ms, lower, lower)

    driver = connection.connection.driver_connection
    cursor = driver.cursor()
    try:
        cursor.execute(sql, parameters)
        row = cursor.fetchone()
    except dialect.loaded_dbapi.Error as error:
        # The error SQLAlchemy would raise, so that the recorder's retry rules apply.
        lost = dialect.is_disconnect(error, driver, cursor)
        raise DBAPIError.instance(sql, parameters, error, dialect.loaded_dbapi.Error,
                                  connection_invalidated=lost) from error
    finally:
        cursor.close()

    if row is None:
        return None
    return OpenConversation(row[0], row[1], row[2], row[3])


def _join_earlier(session: Session, known: list[OpenConversation], channel: str,
                  contact_id: int, at_ms: int, gap_ms: int) -> OpenConversation | None:
    # Returns the conversation a late message joins, or None: of the stored ones and those
    # in ``known``, the latest started whose [start - gap, last + gap] covers ``at_ms``.
    # Stored rows keep their times from before this batch. ``known`` has the times that
    # this batch's earlier messages gave them, and the conversations this batch started.
    candidates = [conversation for conversation in known
                  if conversation.started_at_ms - gap_ms <= at_ms
                  <= conversation.last_message_at_ms + gap_ms]

    stored = _covering_conversation(session, channel, contact_id, at_ms, gap_ms)
    # A copy in ``known`` has times only widened from the stored ones, so when the stored row
    # covers ``at_ms`` the copy does too, and it is a candidate already.
    if stored is not None and all(conversation.id != stored.id for conversation in known):
        known.append(stored)
        candidates.append(stored)
    if not candidates:
        return None

    joined = max(candidates, key=lambda conversation: conversation.started_at_ms)
    joined.started_at_ms = min(joined.started_at_ms, at_ms)
    joined.last_message_at_ms = max(joined.last_message_at_ms, at_ms)
    return joined


def assign_sessions(session: Session, items: Sequence[tuple[str, int, str, int]],
                    gap_ms: int) -> dict[int, int]:
    """Assign messages without a conversation id to conversations by silence.

    ``items`` are ``(channel, contact id, contact external id, time in ms)``, one per
    message, and the result maps each item's index to a conversation id. A message joins
    the contact's latest conversation on that channel when it comes at most ``gap_ms``
    after that conversation's last message, and starts a new conversation otherwise. A late
    message from before the latest conversation joins the conversation that covers its time,
    with the times that this batch's earlier messages gave it, so a batch assigns what the
    same messages written one per batch would.
    The conversations' start and end times are not updated here: the writer recomputes
    them from the stored messages. On PostgreSQL the caller holds the contacts' row locks
    (:func:`lock_rows`), so that two writers that sessionise one contact at once do not
    each start a conversation.
    """
    if not items:
        return {}
    pairs = sorted({(channel, contact_id) for channel, contact_id, _, _ in items})
    latest = _latest_conversations(session, pairs)
    order = sorted(range(len(items)), key=lambda index: items[index][3])
    assigned: dict[int, int] = {}
    # Conversations this batch starts are known by their new external id until inserted.
    pending: dict[int, tuple[str, str]] = {}
    new_rows: dict[tuple[str, str], dict[str, Any]] = {}
    # Per channel and contact, the conversations from before the latest one that late
    # messages of this batch joined or started, with the times those messages give them.
    earlier: dict[tuple[str, int], list[OpenConversation]] = {}
    for index in order:
        channel, contact_id, external, at_ms = items[index]
        current = latest.get((channel, contact_id))
        if current is not None and at_ms < current.started_at_ms - gap_ms:
            covering = _join_earlier(session, earlier.setdefault((channel, contact_id), []),
                                     channel, contact_id, at_ms, gap_ms)
            if covering is not None:
                if covering.id > 0:
                    assigned[index] = covering.id
                else:
                    pending[index] = new_rows_key(covering)
                continue
        elif current is not None and at_ms - current.last_message_at_ms <= gap_ms:
            current.last_message_at_ms = max(current.last_message_at_ms, at_ms)
            if current.id > 0:
                assigned[index] = current.id
            else:
                pending[index] = new_rows_key(current)
            continue
        external_id = fit_id(f"{external}@{at_ms}", 255)
        new_rows[(channel, external_id)] = {
            "channel": channel, "external_id": external_id, "contact_id": contact_id,
            "started_at_ms": at_ms, "last_message_at_ms": at_ms, "message_count": 0,
            "user_message_count": 0, "handed_off": False}
        created = OpenConversation(-len(new_rows), at_ms, at_ms, None)
        created.key = (channel, external_id)
        if current is None or at_ms >= current.started_at_ms:
            latest[(channel, contact_id)] = created
        else:
            earlier.setdefault((channel, contact_id), []).append(created)
        pending[index] = (channel, external_id)
    if new_rows:
        # Inserted in time order, so the new conversations' ids follow their start times.
        insert_ignore(session, Conversation.__table__, list(new_rows.values()),
                      ["channel", "external_id"])
        found = {(channel, external): conversation_id
                 for channel, external, conversation_id in select_by_keys(
                     session, Conversation.__table__, ("channel", "external_id"), sorted(new_rows),
                     ("channel", "external_id", "id"))}
        for index, key in pending.items():
            assigned[index] = found[key]
    return assigned


def new_rows_key(conversation: OpenConversation) -> tuple[str, str]:
    """Return the ``(channel, external_id)`` of a conversation this batch started."""
    if conversation.key is None:
        raise ValueError("conversation has no key: it was not started by this batch")
    return conversation.key
