"""Settings, parsed once at start-up and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatmw.recorder import RecorderSettings

__all__ = ["Settings", "DEFAULT_DATABASE_URL", "DATABASE_URL_ENV", "PROCESSES_ENV", "WRITER_ENV",
           "int_setting", "writer_processes"]

DEFAULT_DATABASE_URL = "sqlite:///chatmw.db"
# The database URL when no ``--db`` option or ``database_url`` argument is given.
DATABASE_URL_ENV = "CHATMW_DATABASE_URL"
# The store writer's placement: "process" (the default) or "thread".
WRITER_ENV = "CHATMW_WRITER"
# The number of writer processes on PostgreSQL (see chatmw.writer_process.split_by_user).
PROCESSES_ENV = "CHATMW_WRITER_PROCESSES"
DEFAULT_PROCESSES = 2
MAX_PROCESSES = 8


def _default_recorder_settings() -> RecorderSettings:
    # Imported here because the recorder imports SQLAlchemy, which a command line that
    # only parses its options does not need.
    from chatmw.recorder import RecorderSettings

    return RecorderSettings()


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
    recorder: RecorderSettings = field(default_factory=_default_recorder_settings)
    # Score the sentiment of English user messages as they are written (chatmw.sentiment).
    sentiment: bool = True
    # Run the store writer in a child process (chatmw.writer_process), so that decoding,
    # enrichment and SQL never take the application's interpreter lock or CPU. ``None``
    # reads CHATMW_WRITER ("process" or "thread") when the runtime starts, and means
    # "process" when it is unset. An in-memory SQLite database keeps the writer in the
    # recorder's thread.
    writer_process: bool | None = None

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
        values["writer_process"] = writer_process_from_env(environ)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        from sqlalchemy.engine import make_url

        # The URL may carry a password: the repr shows it masked.
        url = make_url(self.database_url).render_as_string(hide_password=True)
        return (
            f"Settings(database_url={url!r}, session_gap_minutes={self.session_gap_minutes!r}, "
            f"metrics_prefix={self.metrics_prefix!r}, sentiment={self.sentiment!r}, "
            f"writer_process={self.writer_process!r})"
        )

    def use_writer_process(self) -> bool:
        """Return whether the store writer runs in a child process (see ``writer_process``)."""
        if self.writer_process is not None:
            return self.writer_process
        return writer_process_from_env(os.environ)

    @property
    def session_gap_ms(self) -> int:
        return int(self.session_gap_minutes * 60_000)


def writer_process_from_env(environ: Mapping[str, str]) -> bool:
    """Read ``CHATMW_WRITER``: ``process`` (also when unset) or ``thread``."""
    placement = environ.get(WRITER_ENV, "").strip().lower() or "process"
    if placement not in ("process", "thread"):
        raise ValueError(f"{WRITER_ENV} must be 'process' or 'thread', got {placement!r}")
    return placement == "process"


def writer_processes(dialect: str, environ: Mapping[str, str] | None = None) -> int:
    """Read ``CHATMW_WRITER_PROCESSES``, the writer processes of a store on ``dialect``.

    PostgreSQL gets 2 unless the setting gives another number (1 to 8). SQLite lets one
    writer in at a time, so it always gets 1.
    """
    if dialect != "postgresql":
        return 1
    return int_setting(os.environ if environ is None else environ, PROCESSES_ENV, 1,
                       MAX_PROCESSES, DEFAULT_PROCESSES)


def int_setting(environ: Mapping[str, str], name: str, low: int, high: int,
                default: int) -> int:
    """Read the integer variable ``name`` of ``environ``, from ``low`` to ``high``.

    An unset or blank variable gives ``default``; any other value outside the range, or
    not an integer, raises :class:`ValueError` naming the variable and the range.
    """
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value}")
    return value
