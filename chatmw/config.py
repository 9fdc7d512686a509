"""Settings, parsed once at start-up and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy.engine import make_url

from chatmw.recorder import RecorderSettings

__all__ = ["Settings", "DEFAULT_DATABASE_URL", "DATABASE_URL_ENV"]

DEFAULT_DATABASE_URL = "sqlite:///chatmw.db"
# The database URL when no ``--db`` option or ``database_url`` argument is given.
DATABASE_URL_ENV = "CHATMW_DATABASE_URL"


@dataclass(slots=True)
class Settings:
    """Core settings.

    ``session_gap_minutes`` is the silence after which a user's next message starts a new
    conversation (when the source gives no conversation id); ``metrics_prefix`` is where
    the metrics API is mounted.
    """

    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    session_gap_minutes: float = 30.0
    metrics_prefix: str = "/metrics"
    recorder: RecorderSettings = field(default_factory=RecorderSettings)
    # Score the sentiment of English user messages as they are written (chatmw.sentiment).
    sentiment: bool = True

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ValueError("database_url must not be empty")
        if self.session_gap_minutes <= 0:
            raise ValueError(
                f"session_gap_minutes must be positive, got {self.session_gap_minutes}"
            )
        if not self.metrics_prefix.startswith("/") or self.metrics_prefix.endswith("/"):
            raise ValueError(
                f"metrics_prefix must start with '/' and not end with '/', got {self.metrics_prefix!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``CHATMW_DATABASE_URL`` and keyword overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        if environ.get(DATABASE_URL_ENV):
            values["database_url"] = environ[DATABASE_URL_ENV]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        # The URL may carry a password: the repr shows it masked.
        url = make_url(self.database_url).render_as_string(hide_password=True)
        return (
            f"Settings(database_url={url!r}, session_gap_minutes={self.session_gap_minutes!r}, "
            f"metrics_prefix={self.metrics_prefix!r}, sentiment={self.sentiment!r})"
        )

    @property
    def session_gap_ms(self) -> int:
        return int(self.session_gap_minutes * 60_000)
