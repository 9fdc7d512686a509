"""Tables of the security features: API keys, generated secrets, erasure records.

No table here contains personal data: API keys are stored as SHA-256 hashes, and an erasure
record keeps the counts of what was removed, never whom it was about.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from chatmw.store.models import Base

__all__ = ["ApiKey", "StoredSecret", "ErasureRecord"]


class ApiKey(Base):
    """An API key: its public id, the SHA-256 of the whole key, and its scope."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("key_id", name="uq_api_keys_key_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(255))
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    revoked_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    last_used_at_ms: Mapped[int | None] = mapped_column(BigInteger)


class StoredSecret(Base):
    """A secret chatmw generated because none was configured (the pseudonym key)."""

    __tablename__ = "chatmw_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class ErasureRecord(Base):
    """One erasure: where it came from, when, and how many rows of each table it removed.

    ``confirmation_code`` is what Meta's data-deletion callback returns to the person; one
    request that erases on several channels has one row per channel under the same code.
    """

    __tablename__ = "erasure_records"
    __table_args__ = (Index("ix_erasure_records_code", "confirmation_code"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    confirmation_code: Mapped[str] = mapped_column(String(64))
    origin: Mapped[str] = mapped_column(String(32))
    channel: Mapped[str] = mapped_column(String(32))
    requested_at_ms: Mapped[int] = mapped_column(BigInteger)
    completed_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    removed: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
