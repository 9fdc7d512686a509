"""The configuration of ``chatmw serve``: a TOML file, validated once at start-up.

Every key is optional; an unknown or invalid one raises ``ValueError`` naming it (for
example ``api.burst: must be a whole number of at least 1, got 0``). The layout::

    database_url = "postgresql+psycopg://chatmw@db/chatmw"   # --db and CHATMW_DATABASE_URL win
    metrics_prefix = "/metrics"
    session_gap_minutes = 30
    sentiment = true

    [api]
    require_keys = true        # false opens the read routes (metrics, live, health) to anyone
    rate_per_second = 10.0     # per API key
    burst = 50
    live = true                # GET {metrics_prefix}/live and the dashboard's live panel

    [privacy]                  # without this table the CHATMW_PSEUDONYMISE ... variables apply
    pseudonymise = true        # the key itself comes from CHATMW_PSEUDONYM_KEY or the database
    text_mode = "redacted"     # full | redacted | none
    keep_raw_payloads = false
    pseudonymise_conversations = true

    [business]
    currency = "EUR"
    redact_leads = true
    detect_leads = true
    query_rules_path = "query_rules.toml"

    [business_hours]           # as in chatmw.business_hours
    timezone = "Europe/Paris"
    hours = { mon-fri = ["09:00-18:00"] }

    [surveys.csat]             # as in docs/surveys.md, with [dispatcher]
    ...
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from chatmw.business import BusinessSettings
from chatmw.business_hours import BusinessHours
from chatmw.config import Settings
from chatmw.security.privacy import PrivacySettings
from chatmw.surveys.config import SurveysConfig, parse_config

__all__ = ["AppConfig", "load_app_config", "parse_app_config"]

_CORE_KEYS = ("database_url", "metrics_prefix", "session_gap_minutes", "sentiment")
_TABLES = ("api", "privacy", "business", "business_hours", "surveys", "dispatcher")
_Built = TypeVar("_Built")


@dataclass(slots=True)
class AppConfig:
    """What :func:`chatmw.app.create_app` builds from, beyond the core :class:`Settings`.

    ``require_keys`` guards the read routes (metrics, live figures, health, CSAT and NPS,
    the dashboard's filter values) with an API key of scope ``read``. Admin routes
    (erasure, survey administration) need a key of scope ``admin`` in either case.
    ``key_rate_per_second`` and ``key_burst`` limit each key's requests. ``privacy`` of
    ``None`` stores ids and text as the sources report them. ``surveys`` of ``None``
    runs no survey dispatcher in this process (the CSAT and NPS routes are served anyway).
    """

    settings: Settings = field(default_factory=Settings)
    require_keys: bool = True
    key_rate_per_second: float = 10.0
    key_burst: int = 50
    live: bool = True
    privacy: PrivacySettings | None = field(default_factory=PrivacySettings)
    business: BusinessSettings = field(default_factory=BusinessSettings)
    business_hours: BusinessHours | None = None
    surveys: SurveysConfig | None = None

    def __post_init__(self) -> None:
        if self.key_rate_per_second <= 0:
            raise ValueError(
                f"api.rate_per_second: must be above 0, got {self.key_rate_per_second}"
            )
        if self.key_burst < 1:
            raise ValueError(
                f"api.burst: must be a whole number of at least 1, got {self.key_burst}"
            )


class _Table:
    """A TOML table whose reads name the dotted setting in every error."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a table")
        self.data = data
        self.path = path

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in allowed:
                raise ValueError(
                    f"{self.name(key)}: unknown setting; expected one of {', '.join(allowed)}"
                )

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"{self.name(key)}: must be true or false, got {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{self.name(key)}: must be a number, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.name(key)}: must be a whole number, got {value!r}")
        return value

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.data.get(key, default)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{self.name(key)}: must be a string, got {value!r}")
        return value


def _named(table: str, build: Callable[..., _Built], **values: Any) -> _Built:
    # The settings classes name the field ("text_mode must be ..."); add the table's name.
    try:
        return build(**values)
    except ValueError as error:
        raise ValueError(f"{table}.{error}") from error


def _core(root: _Table, database_url: str | None) -> Settings:
    values: dict[str, Any] = {}
    for key in ("database_url", "metrics_prefix"):
        if key in root.data:
            values[key] = root.text(key)
    if "session_gap_minutes" in root.data:
        values["session_gap_minutes"] = root.number("session_gap_minutes", 30.0)
    if "sentiment" in root.data:
        values["sentiment"] = root.boolean("sentiment", True)
    if database_url:
        values["database_url"] = database_url
    return Settings(**values)


def _privacy(root: _Table, environ: Mapping[str, str] | None) -> PrivacySettings:
    if "privacy" not in root.data:
        return PrivacySettings.from_env(environ)
    table = _Table(root.data["privacy"], "privacy")
    table.check_keys(("pseudonymise", "text_mode", "keep_raw_payloads",
                      "pseudonymise_conversations"))
    # The key stays out of the file: it comes from the environment or the database.
    key = PrivacySettings.from_env(environ).pseudonym_key
    return _named(
        "privacy", PrivacySettings,
        pseudonymise=table.boolean("pseudonymise", True),
        pseudonym_key=key,
        text_mode=table.text("text_mode", "redacted"),
        keep_raw_payloads=table.boolean("keep_raw_payloads", False),
        pseudonymise_conversations=table.boolean("pseudonymise_conversations", True),
    )


def _business(root: _Table) -> BusinessSettings:
    if "business" not in root.data:
        return BusinessSettings()
    table = _Table(root.data["business"], "business")
    table.check_keys(("currency", "redact_leads", "detect_leads", "query_rules_path"))
    return _named(
        "business", BusinessSettings,
        currency=table.text("currency"),
        redact_leads=table.boolean("redact_leads", True),
        detect_leads=table.boolean("detect_leads", True),
        query_rules_path=table.text("query_rules_path"),
    )


def parse_app_config(document: Mapping[str, Any], database_url: str | None = None,
                     environ: Mapping[str, str] | None = None) -> AppConfig:
    """Validate a parsed configuration file; ``database_url`` replaces the file's."""
    root = _Table(document, "")
    root.check_keys(_CORE_KEYS + _TABLES)
    settings = _core(root, database_url)
    api = _Table(root.data.get("api", {}), "api")
    api.check_keys(("require_keys", "rate_per_second", "burst", "live"))
    surveys = None
    if "surveys" in root.data or "dispatcher" in root.data:
        surveys = parse_config({key: root.data[key] for key in ("surveys", "dispatcher")
                                if key in root.data})
    hours = None
    if "business_hours" in root.data:
        hours = BusinessHours.from_mapping(_Table(root.data["business_hours"],
                                                  "business_hours").data)
    return AppConfig(
        settings=settings,
        require_keys=api.boolean("require_keys", True),
        key_rate_per_second=api.number("rate_per_second", 10.0),
        key_burst=api.integer("burst", 50),
        live=api.boolean("live", True),
        privacy=_privacy(root, environ),
        business=_business(root),
        business_hours=hours,
        surveys=surveys,
    )


def load_app_config(path: str | Path | None, database_url: str | None = None,
                    environ: Mapping[str, str] | None = None) -> AppConfig:
    """Read and validate the file at ``path``; without a path, the defaults and environment.

    ``database_url`` (the ``--db`` option) replaces the file's; without either, the
    ``CHATMW_DATABASE_URL`` variable or the default applies.
    """
    if path is None:
        document: dict[str, Any] = {}
    else:
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: invalid TOML: {error}") from None
        except OSError as error:
            raise ValueError(f"{path}: cannot be read: {error.strerror}") from None
    if database_url is None and "database_url" not in document:
        database_url = Settings.from_env(environ).database_url
    return parse_app_config(document, database_url, environ)
