"""Migration 0023_contact_bitmaps rewrites the zlib bitsets of ``rollup_contact_sets``."""

from __future__ import annotations

import random
import zlib

from alembic import command
from sqlalchemy import Engine, text

from chatmw.metrics.contact_sets import decode, encode
from chatmw.store.engine import _alembic_config, make_engine, upgrade


def _zlib_bitset(ids: list[int]) -> bytes:
    bits = bytearray((max(ids) >> 3) + 1 if ids else 0)
    for contact_id in ids:
        bits[contact_id >> 3] |= 1 << (contact_id & 7)
    return zlib.compress(bytes(bits), 1)


def _blobs(engine: Engine) -> dict[str, bytes]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT channel, contacts FROM rollup_contact_sets"))
        return {channel: bytes(blob) for channel, blob in rows}


def _downgrade(engine: Engine, revision: str) -> None:
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def test_bitsets_become_bitmaps_and_back(database_url: str) -> None:
    rng = random.Random(11)
    sets = {
        "empty": [],
        "one": [0],
        "sparse": sorted(rng.sample(range(3_000_000), 2_000)),
        "dense": list(range(5, 90_000, 2)),
    }
    engine = make_engine(database_url)
    # The fixture's database is at the head revision.
    _downgrade(engine, "0022_attribution_bitmaps")
    insert = text(
        "INSERT INTO rollup_contact_sets (kind, level, start_ms, channel, contacts)"
        " VALUES ('users', 2, 0, :channel, :blob)"
    )
    try:
        with engine.begin() as connection:
            for channel, ids in sets.items():
                connection.execute(insert, {"channel": channel, "blob": _zlib_bitset(ids)})
            # A set already written as a bitmap is left as it is.
            connection.execute(insert, {"channel": "bitmap", "blob": encode([4, 5])})

        upgrade(engine)
        blobs = _blobs(engine)
        for channel, ids in sets.items():
            assert blobs[channel][:1] != b"\x78", channel
            assert list(decode(blobs[channel])) == ids
        assert blobs["bitmap"] == encode([4, 5])

        _downgrade(engine, "0022_attribution_bitmaps")
        blobs = _blobs(engine)
        for channel, ids in {**sets, "bitmap": [4, 5]}.items():
            assert blobs[channel][:1] == b"\x78", channel
            assert list(decode(blobs[channel])) == ids
    finally:
        upgrade(engine)
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM rollup_contact_sets"))
        engine.dispose()
