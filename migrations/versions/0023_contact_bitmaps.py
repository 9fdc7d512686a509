"""Contact sets become Roaring bitmaps: each zlib bitset of ``rollup_contact_sets`` is converted.

A stored set was a zlib-compressed little-endian bitset whose bit ``i`` is contact id
``i``. This migration rewrites each one as a serialized Roaring bitmap of the same ids,
so no rebuild is needed. Sets already in the new format are left as they are.

Revision ID: 0023_contact_bitmaps
Revises: 0022_attribution_bitmaps
"""

import zlib
from array import array
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from pyroaring import BitMap

revision: str = "0023_contact_bitmaps"
down_revision: str | Sequence[str] | None = "0022_attribution_bitmaps"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEYS = ("kind", "level", "start_ms", "channel")
# The first byte of a zlib stream. A serialized Roaring bitmap starts with another byte.
_ZLIB_HEADER = b"\x78"


# The conversion is written out here rather than imported from chatmw.metrics, so that
# this migration keeps working whatever the application code becomes.
def _members(bitset: bytes) -> array:
    digits = bin(int.from_bytes(bitset, "little"))[:1:-1]
    members = array("I")
    position = digits.find("1")
    while position >= 0:
        members.append(position)
        position = digits.find("1", position + 1)
    return members


def _bitset(members: BitMap) -> bytes:
    bits = bytearray((members.max() >> 3) + 1 if members else 0)
    for contact_id in members:
        bits[contact_id >> 3] |= 1 << (contact_id & 7)
    return zlib.compress(bytes(bits), 1)


def _convert(to_bitmap: bool) -> None:
    table = sa.table(
        "rollup_contact_sets",
        *(sa.column(name) for name in _KEYS),
        sa.column("contacts", sa.LargeBinary()),
    )
    connection = op.get_bind()
    rows = connection.execute(sa.select(table.c.kind, table.c.level, table.c.start_ms,
                                        table.c.channel, table.c.contacts)).all()
    update = (
        sa.update(table)
        .where(*(table.c[name] == sa.bindparam(f"key_{name}") for name in _KEYS))
        .values(contacts=sa.bindparam("blob"))
    )
    changed = []
    for *keys, blob in rows:
        is_bitset = bytes(blob[:1]) == _ZLIB_HEADER
        if is_bitset and to_bitmap:
            bitmap = BitMap(_members(zlib.decompress(blob)))
            bitmap.run_optimize()
            new_blob = bitmap.serialize()
        elif not is_bitset and not to_bitmap:
            new_blob = _bitset(BitMap.deserialize(bytes(blob)))
        else:
            continue
        changed.append({**{f"key_{name}": key for name, key in zip(_KEYS, keys, strict=True)},
                        "blob": new_blob})
    for index in range(0, len(changed), 500):
        connection.execute(update, changed[index : index + 500])


def upgrade() -> None:
    _convert(to_bitmap=True)


def downgrade() -> None:
    _convert(to_bitmap=False)
