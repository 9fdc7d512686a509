"""Server time of the conversation-attribute upsert with and without a foreign key.

A scratch PostgreSQL database gets 200,000 conversations and two copies of
``conversation_attributes``: one whose ``conversation_id`` references ``conversations``
(as before migration ``0025_attribute_keys``) and one without the key. Each round upserts
474 rows (237 random conversations with a plan and a country) into both tables, in
alternating order, under ``EXPLAIN ANALYZE``, and keeps PostgreSQL's execution time and the
time of the key's trigger. The first 10 rounds are a warm-up. The database is dropped at
the end::

    python -m bench.attribute_key --rounds 300
"""

from __future__ import annotations

import argparse
import random
import re
import statistics

import psycopg

from bench.common import PG_ADMIN_URL

DATABASE = "chatmw_bench_attribute_key"
CONVERSATIONS = 200_000
PER_ROUND = 237
WARMUP = 10
TABLES = {
    "with_key": "REFERENCES conversations (id) ON DELETE CASCADE",
    "without_key": "",
}
UPSERT = ("EXPLAIN (ANALYZE, FORMAT TEXT) INSERT INTO {table} (conversation_id, name, value) "
          "SELECT * FROM unnest(CAST(%s AS INTEGER[]), CAST(%s AS VARCHAR[]), "
          "CAST(%s AS VARCHAR[])) "
          "ON CONFLICT (conversation_id, name) DO UPDATE SET value = excluded.value")


def _database_url() -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + DATABASE


def _recreate(drop_only: bool = False) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        if not drop_only:
            admin.execute(f"CREATE DATABASE {DATABASE}")


def _prepare(connection: psycopg.Connection) -> None:
    connection.execute("CREATE TABLE conversations (id integer PRIMARY KEY, "
                       "external_id text NOT NULL)")
    connection.execute("INSERT INTO conversations SELECT g, 'c' || g "
                       f"FROM generate_series(1, {CONVERSATIONS}) g")
    for table, key in TABLES.items():
        connection.execute(
            f"CREATE TABLE {table} (conversation_id integer NOT NULL {key}, "
            "name varchar(64) NOT NULL, value varchar(255) NOT NULL, "
            "PRIMARY KEY (conversation_id, name))")
        connection.execute(f"CREATE INDEX ON {table} (name, value)")
    connection.execute("ANALYZE")


def measure(rounds: int, seed: int = 1) -> dict[str, list[float]]:
    """Return the execution times (ms) per table, and the key's trigger times."""
    times: dict[str, list[float]] = {table: [] for table in TABLES}
    times["trigger"] = []
    rng = random.Random(seed)
    _recreate()
    try:
        with psycopg.connect(_database_url(), autocommit=True) as connection:
            _prepare(connection)
            for number in range(rounds + WARMUP):
                ids = rng.sample(range(1, CONVERSATIONS + 1), PER_ROUND)
                conversation_ids = [value for value in ids for _ in (0, 1)]
                names = ["plan", "country"] * PER_ROUND
                values = [rng.choice(("free", "pro", "team")) if name == "plan"
                          else rng.choice(("DE", "FR", "US")) for name in names]
                order = list(TABLES) if number % 2 == 0 else list(reversed(TABLES))
                for table in order:
                    with connection.transaction():
                        rows = connection.execute(UPSERT.format(table=table),
                                                  (conversation_ids, names, values)).fetchall()
                    plan = "\n".join(row[0] for row in rows)
                    if number < WARMUP:
                        continue
                    executed = re.search(r"Execution Time: ([\d.]+) ms", plan)
                    if executed is None:
                        raise RuntimeError(f"no execution time in the plan of {table}:\n{plan}")
                    times[table].append(float(executed.group(1)))
                    trigger = re.search(r"Trigger for constraint \S+: time=([\d.]+)", plan)
                    if trigger is not None:
                        times["trigger"].append(float(trigger.group(1)))
    finally:
        _recreate(drop_only=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    times = measure(args.rounds)
    print(f"{2 * PER_ROUND} rows per upsert, {args.rounds} rounds after {WARMUP} warm-up rounds")
    for name, values in times.items():
        if values:
            quartiles = statistics.quantiles(values, n=4)
            print(f"{name}: median {statistics.median(values):.2f} ms, "
                  f"quartiles {quartiles[0]:.2f} to {quartiles[2]:.2f} ms")


if __name__ == "__main__":
    main()
