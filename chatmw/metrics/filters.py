"""The filter every metric takes, and its parsing from query parameters.

The API and the CLI both turn their parameters into a :class:`MetricFilter` here, so that
the same input gives the same figures and the same error messages everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from chatmw.events import to_ms

__all__ = [
    "MetricFilter",
    "GroupBy",
    "FilterError",
    "parse_filter",
    "parse_datetime",
    "COMMON_PARAMS",
    "TOUCH_FIELDS",
    "MAX_WINDOW_DAYS",
]

# Conversation touch fields that can filter and group; ``ad`` is the ad id.
TOUCH_FIELDS = {"source": "source", "medium": "medium", "campaign": "campaign", "ad": "ad_id"}
COMMON_PARAMS = ("since", "until", "tz", "channel", "group_by", "touch", *TOUCH_FIELDS)
ATTRIBUTE_PREFIX = "attr."
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_VALUE_LENGTH = 255
_SURROGATE = re.compile("[\ud800-\udfff]")
# The widest window a query may cover; wider ones are rejected rather than scanned.
MAX_WINDOW_DAYS = 3660


class FilterError(ValueError):
    """An invalid metric parameter: ``param`` is its name and ``message`` the problem."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass(frozen=True, slots=True)
class GroupBy:
    """A split of results by ``channel``, an attribute, or a touch field."""

    kind: str
    name: str | None = None

    @property
    def label(self) -> str:
        return self.kind if self.name is None else f"{self.kind}:{self.name}"


@dataclass(frozen=True, slots=True)
class MetricFilter:
    """The conversations a metric covers, and the split of its results.

    A conversation belongs to the window in which it started: ``since`` inclusive, ``until``
    exclusive. ``tz`` is the zone of day and hour buckets. ``touch`` chooses the first or
    the last attribution touch for ``touch_filters`` and touch groupings.
    """

    since: datetime | None = None
    until: datetime | None = None
    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    channels: tuple[str, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)
    touch: str = "last"
    touch_filters: Mapping[str, str] = field(default_factory=dict)
    group_by: GroupBy | None = None

    @property
    def since_ms(self) -> int | None:
        return None if self.since is None else to_ms(self.since)

    @property
    def until_ms(self) -> int | None:
        return None if self.until is None else to_ms(self.until)

    def shifted_back(self) -> MetricFilter | None:
        """Return the same filter over the previous window of equal length, if bounded.

        Returns ``None`` also when the previous window would start before the year 1.
        """
        if self.since is None or self.until is None:
            return None
        length = self.until - self.since
        if self.since - datetime.min.replace(tzinfo=UTC) < length:
            return None
        return MetricFilter(
            since=self.since - length,
            until=self.since,
            tz=self.tz,
            channels=self.channels,
            attributes=self.attributes,
            touch=self.touch,
            touch_filters=self.touch_filters,
            group_by=self.group_by,
        )

    def describe(self) -> dict[str, object]:
        """Return the filter as plain data, echoed in every result."""
        return {
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
            "tz": self.tz.key,
            "channel": list(self.channels),
            "attributes": dict(self.attributes),
            "touch": self.touch,
            "touch_filters": dict(self.touch_filters),
            "group_by": None if self.group_by is None else self.group_by.label,
        }


def parse_datetime(param: str, value: str, tz: ZoneInfo) -> datetime:
    """Parse ISO-8601 (a date, or a date and time); a value without offset is read in ``tz``."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(
            param,
            f"invalid ISO-8601 date or time {value!r}; "
            "expected e.g. 2024-03-01 or 2024-03-01T09:00:00Z",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise FilterError(param, f"date or time {value!r} is out of range in UTC") from None


def _single(params: Mapping[str, Iterable[str]], name: str) -> str | None:
    values = [value for value in params.get(name, ()) if value != ""]
    if len(values) > 1:
        raise FilterError(name, "given more than once")
    return values[0] if values else None


def _check_value(param: str, value: str) -> str:
    if len(value) > MAX_VALUE_LENGTH:
        raise FilterError(param, f"value longer than {MAX_VALUE_LENGTH} characters")
    if "\x00" in value:
        raise FilterError(param, "value contains a NUL character")
    if _SURROGATE.search(value):
        # The command line decodes invalid UTF-8 in arguments to lone surrogates.
        raise FilterError(param, "value is not valid UTF-8")
    return value


def _parse_tz(value: str | None) -> ZoneInfo:
    if value is None:
        return ZoneInfo("UTC")
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise FilterError(
            "tz", f"unknown time zone {value!r}; use an IANA name such as Europe/Paris or UTC"
        ) from None


def _parse_group_by(value: str | None) -> GroupBy | None:
    if value is None:
        return None
    if value == "channel" or value in TOUCH_FIELDS:
        return GroupBy(value)
    if value.startswith("attr:"):
        name = value[len("attr:") :]
        if not _NAME.match(name):
            raise FilterError("group_by", f"invalid attribute name {name!r}")
        return GroupBy("attr", name)
    choices = ", ".join(["channel", "attr:NAME", *TOUCH_FIELDS])
    raise FilterError("group_by", f"unknown grouping {value!r}; expected one of {choices}")


def parse_filter(
    params: Mapping[str, Iterable[str]], now: datetime | None = None, allowed: Iterable[str] = ()
) -> MetricFilter:
    """Build a :class:`MetricFilter` from query parameters (each name to its values).

    ``attr.NAME=value`` filters on a conversation attribute. Names other than the common
    ones, attribute filters and ``allowed`` are rejected, so a typo never silently widens
    a query.
    """
    known = set(COMMON_PARAMS) | set(allowed) | {"format"}
    for name in params:
        if name.startswith(ATTRIBUTE_PREFIX):
            continue
        if name not in known:
            raise FilterError(name, "unknown parameter")
    tz = _parse_tz(_single(params, "tz"))
    since_text, until_text = _single(params, "since"), _single(params, "until")
    since = None if since_text is None else parse_datetime("since", since_text, tz)
    until = None if until_text is None else parse_datetime("until", until_text, tz)
    if since is not None and until is None:
        until = now or datetime.now(UTC)
    if since is not None and until is not None:
        if until <= since:
            raise FilterError("until", "must be later than since")
        if until - since > timedelta(days=MAX_WINDOW_DAYS):
            raise FilterError("since", f"window longer than {MAX_WINDOW_DAYS} days")

    channels: list[str] = []
    for value in params.get("channel", ()):
        channels.extend(
            _check_value("channel", part.strip()) for part in value.split(",") if part.strip()
        )

    attributes: dict[str, str] = {}
    for name, values in params.items():
        if not name.startswith(ATTRIBUTE_PREFIX):
            continue
        attribute = name[len(ATTRIBUTE_PREFIX) :]
        if not _NAME.match(attribute):
            raise FilterError(name, f"invalid attribute name {attribute!r}")
        value = _single(params, name)
        if value is None:
            raise FilterError(name, "missing value")
        attributes[attribute] = _check_value(name, value)

    touch = _single(params, "touch") or "last"
    if touch not in ("first", "last"):
        raise FilterError("touch", f"expected 'first' or 'last', got {touch!r}")
    touch_filters = {}
    for name in TOUCH_FIELDS:
        value = _single(params, name)
        if value is not None:
            touch_filters[name] = _check_value(name, value)

    return MetricFilter(
        since=since,
        until=until,
        tz=tz,
        channels=tuple(dict.fromkeys(channels)),
        attributes=attributes,
        touch=touch,
        touch_filters=touch_filters,
        group_by=_parse_group_by(_single(params, "group_by")),
    )
