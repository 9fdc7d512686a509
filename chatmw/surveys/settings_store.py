"""The survey configuration set through the API, stored so that every process uses it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from chatmw.store.models_surveys import SURVEY_CONFIG, SurveyConfigDocument
from chatmw.surveys.config import SurveysConfig, parse_config

__all__ = ["ConfigSource", "save_config_document", "clear_config_document"]

_ROW_ID = 1


def save_config_document(engine: Engine, document: Mapping[str, Any]) -> SurveysConfig:
    """Validate ``document`` and store it; it replaces the file's configuration everywhere.

    Raises ``ValueError`` naming the invalid setting; nothing is stored then.
    """
    config = parse_config(document)
    row = {
        "id": _ROW_ID,
        "document": config.to_document(),
        "updated_at_ms": int(time.time() * 1000),
    }
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(SURVEY_CONFIG).values(**row)
    statement = statement.on_conflict_do_update(
        index_elements=["id"],
        set_={
            "document": statement.excluded.document,
            "updated_at_ms": statement.excluded.updated_at_ms,
        },
    )
    with engine.begin() as connection:
        connection.execute(statement)
    return config


def clear_config_document(engine: Engine) -> None:
    """Remove the stored configuration, so the file's applies again."""
    with engine.begin() as connection:
        connection.execute(SURVEY_CONFIG.delete())


class ConfigSource:
    """The configuration in force: the stored document when there is one, else ``fallback``.

    :meth:`current` reads one small row, so a dispatcher can call it every round and pick
    up changes made through the API by any process.
    """

    def __init__(self, engine: Engine, fallback: SurveysConfig) -> None:
        self.engine = engine
        self.fallback = fallback
        self._cached: tuple[int, SurveysConfig] | None = None

    def current(self) -> SurveysConfig:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(SurveyConfigDocument.updated_at_ms, SurveyConfigDocument.document).where(
                    SurveyConfigDocument.id == _ROW_ID
                )
            ).first()
        if row is None:
            return self.fallback
        if self._cached is None or self._cached[0] != row[0]:
            self._cached = (row[0], parse_config(row[1]))
        return self._cached[1]
