"""Survey settings, read from a TOML file or a JSON document and validated at start-up.

Every invalid or unknown setting raises ``ValueError`` with its dotted name, for example
``surveys.csat.sampling_rate: must be between 0 and 1, got 1.5``. The layout is documented
in ``docs/surveys.md`` and shown in ``examples/surveys.toml``.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SurveysConfig",
    "SurveySettings",
    "SurveyTexts",
    "TemplateSettings",
    "DispatcherSettings",
    "KINDS",
    "TRIGGERS",
    "CHANNELS",
    "SCALES",
    "load_config",
    "parse_config",
]

KINDS = ("csat", "nps")
# ended: the bot or the app ended the conversation (ConversationUpdate ended=True);
# inactivity: no message for ``inactivity_minutes``; ended_or_inactivity: whichever comes
# first; on_demand: only when requested through the API.
TRIGGERS = ("ended", "inactivity", "ended_or_inactivity", "on_demand")
CHANNELS = ("web", "messenger", "whatsapp")
# The answer scale of each kind, inclusive.
SCALES = {"csat": (1, 5), "nps": (0, 10)}
# WhatsApp limits, from Meta's Cloud API pages on interactive messages: a list's button label
# and a reply button's title take at most 20 characters.
# https://developers.facebook.com/docs/whatsapp/cloud-api/messages/interactive-reply-buttons-messages
WHATSAPP_BUTTON_TITLE_MAX = 20
_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_LOCALE = re.compile(r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]{2,8})*$")


@dataclass(frozen=True, slots=True)
class SurveyTexts:
    """The texts of one survey in one locale.

    ``prompt`` asks for the score; ``reask`` is sent once after an unclear or out-of-range
    answer; ``follow_up`` asks for a comment after the score; ``thanks`` closes the survey
    (after the comment, or after the score when there is no follow-up). ``list_button``
    opens the WhatsApp list; ``step2_prompt`` asks for the exact NPS score on WhatsApp after
    the user chose a range.
    """

    prompt: str
    reask: str
    follow_up: str | None = None
    thanks: str | None = None
    list_button: str = "Rate"
    step2_prompt: str | None = None


@dataclass(frozen=True, slots=True)
class TemplateSettings:
    """An approved WhatsApp template sent instead of the prompt outside the 24-hour window.

    ``components`` is passed to the platform as given.
    """

    name: str
    language: str
    components: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class SurveySettings:
    """One survey definition. Each channel is covered by at most one survey.

    Times: ``inactivity_minutes`` of silence end a conversation for the inactivity
    triggers; the prompt goes out ``delay_minutes`` after the end; ``sampling_rate`` is the
    share of conversations surveyed, decided by a hash of ``sampling_seed`` and the
    conversation, so the same seed picks the same conversations; no user gets two surveys
    within ``cooldown_days``; a score is accepted for ``answer_window_hours`` after the
    prompt and a comment for ``comment_window_minutes`` after the score.
    """

    name: str
    kind: str
    channels: tuple[str, ...]
    texts: Mapping[str, SurveyTexts]
    trigger: str = "ended"
    inactivity_minutes: float = 30.0
    delay_minutes: float = 0.0
    sampling_rate: float = 1.0
    sampling_seed: str = ""
    cooldown_days: float = 30.0
    answer_window_hours: float = 24.0
    comment_window_minutes: float = 30.0
    default_locale: str = "en"
    whatsapp_template: TemplateSettings | None = None

    @property
    def scale(self) -> tuple[int, int]:
        return SCALES[self.kind]

    def texts_for(self, locale: str | None) -> SurveyTexts:
        """Return the texts of ``locale``, or of the default locale when it has none."""
        if locale and locale in self.texts:
            return self.texts[locale]
        return self.texts[self.default_locale]


@dataclass(frozen=True, slots=True)
class DispatcherSettings:
    """How the dispatcher runs.

    It polls every ``poll_seconds`` and claims at most ``batch_size`` sends a round. A send
    that fails with a retryable error is tried again after ``retry_backoff_seconds``,
    doubled each time, up to ``max_attempts`` tries in all. A claim older than
    ``claim_timeout_seconds`` (its process died while sending) is marked failed, never
    sent again, because the platform may have accepted it. Conversations that ended more
    than ``lookback_hours`` ago are not surveyed. ``outbound`` maps a channel to a
    ``module:callable`` that returns its outbound channel, for ``chatmw surveys run``.
    """

    poll_seconds: float = 5.0
    batch_size: int = 50
    max_attempts: int = 4
    retry_backoff_seconds: float = 30.0
    claim_timeout_seconds: float = 300.0
    lookback_hours: float = 48.0
    outbound: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SurveysConfig:
    """Every survey definition and the dispatcher settings."""

    surveys: Mapping[str, SurveySettings] = field(default_factory=dict)
    dispatcher: DispatcherSettings = field(default_factory=DispatcherSettings)

    def for_channel(self, channel: str) -> SurveySettings | None:
        """Return the survey that covers ``channel``, if any."""
        for survey in self.surveys.values():
            if channel in survey.channels:
                return survey
        return None

    def to_document(self) -> dict[str, Any]:
        """Return the configuration as plain data that :func:`parse_config` reads back."""
        surveys: dict[str, Any] = {}
        for name, survey in self.surveys.items():
            data = asdict(survey)
            data.pop("name")
            data["channels"] = list(survey.channels)
            data["texts"] = {locale: _drop_none(asdict(t)) for locale, t in survey.texts.items()}
            if survey.whatsapp_template is None:
                data.pop("whatsapp_template")
            else:
                data["whatsapp_template"]["components"] = [
                    dict(c) for c in survey.whatsapp_template.components
                ]
            surveys[name] = data
        dispatcher = asdict(self.dispatcher)
        dispatcher["outbound"] = dict(self.dispatcher.outbound)
        return {"dispatcher": dispatcher, "surveys": surveys}


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if value is not None}


class _Section:
    """A table of the document being read; tracks its dotted path and unread keys."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: must be a table, got {type(data).__name__}")
        self.data = data
        self.path = path
        self.read: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.data.get(key, default)

    def text(
        self,
        key: str,
        default: str | None = None,
        required: bool = False,
        max_length: int | None = None,
    ) -> str | None:
        value = self.get(key, default)
        if value is None:
            if required:
                raise ValueError(f"{self.name(key)}: missing; it is required")
            return None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{self.name(key)}: must be a non-empty string, got {value!r}")
        if max_length is not None and len(value) > max_length:
            raise ValueError(f"{self.name(key)}: longer than {max_length} characters: {value!r}")
        return value

    def number(
        self,
        key: str,
        default: float,
        minimum: float | None = None,
        maximum: float | None = None,
        positive: bool = False,
    ) -> float:
        value = self.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(f"{self.name(key)}: must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise ValueError(f"{self.name(key)}: must be positive, got {value!r}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{self.name(key)}: must be at least {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise ValueError(f"{self.name(key)}: must be at most {maximum}, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int, minimum: int) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.name(key)}: must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"{self.name(key)}: must be at least {minimum}, got {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self.get(key, default)
        if value is None:
            raise ValueError(f"{self.name(key)}: missing; expected one of {', '.join(choices)}")
        if value not in choices:
            raise ValueError(
                f"{self.name(key)}: expected one of {', '.join(choices)}, got {value!r}"
            )
        return str(value)

    def section(self, key: str) -> _Section | None:
        value = self.get(key)
        return None if value is None else _Section(value, self.name(key))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise ValueError(f"{self.name(unknown[0])}: unknown setting")


def _parse_texts(section: _Section, kind: str) -> SurveyTexts:
    texts = SurveyTexts(
        prompt=section.text("prompt", required=True) or "",
        reask=section.text("reask", required=True) or "",
        follow_up=section.text("follow_up"),
        thanks=section.text("thanks"),
        list_button=section.text("list_button", "Rate", max_length=WHATSAPP_BUTTON_TITLE_MAX)
        or "Rate",
        step2_prompt=section.text("step2_prompt"),
    )
    section.finish()
    return texts


def _parse_template(section: _Section) -> TemplateSettings:
    name = section.text("name", required=True) or ""
    language = section.text("language", required=True) or ""
    components = section.get("components", [])
    if not isinstance(components, list) or not all(isinstance(c, Mapping) for c in components):
        raise ValueError(f"{section.name('components')}: must be a list of tables")
    section.finish()
    return TemplateSettings(
        name=name, language=language, components=tuple(dict(c) for c in components)
    )


def _parse_survey(name: str, section: _Section) -> SurveySettings:
    if not _NAME.match(name):
        raise ValueError(
            f"{section.path}: invalid survey name {name!r}; use letters, digits, _ and -"
        )
    kind = section.choice("kind", KINDS)
    channels = section.get("channels", list(CHANNELS))
    if isinstance(channels, str) or not isinstance(channels, list) or not channels:
        raise ValueError(f"{section.name('channels')}: must be a non-empty list of channels")
    for channel in channels:
        if channel not in CHANNELS:
            raise ValueError(
                f"{section.name('channels')}: unknown channel {channel!r}; "
                f"expected {', '.join(CHANNELS)}"
            )
    trigger = section.choice("trigger", TRIGGERS, "ended")
    default_locale = section.text("default_locale", "en") or "en"
    texts_section = section.section("texts")
    if texts_section is None:
        raise ValueError(f"{section.name('texts')}: missing; give the texts of {default_locale!r}")
    texts: dict[str, SurveyTexts] = {}
    for locale in texts_section.data:
        if not isinstance(locale, str) or not _LOCALE.match(locale):
            raise ValueError(f"{texts_section.name(str(locale))}: invalid locale name")
        texts[locale] = _parse_texts(
            _Section(texts_section.get(locale), texts_section.name(locale)), kind
        )
    texts_section.finish()
    if default_locale not in texts:
        raise ValueError(
            f"{section.name('default_locale')}: no texts for {default_locale!r}; "
            f"add [{texts_section.name(default_locale)}]"
        )
    template_section = section.section("whatsapp_template")
    settings = SurveySettings(
        name=name,
        kind=kind,
        channels=tuple(dict.fromkeys(channels)),
        texts=texts,
        trigger=trigger,
        inactivity_minutes=section.number("inactivity_minutes", 30.0, positive=True),
        delay_minutes=section.number("delay_minutes", 0.0, minimum=0),
        sampling_rate=section.number("sampling_rate", 1.0, minimum=0, maximum=1),
        sampling_seed=str(section.get("sampling_seed", "")),
        cooldown_days=section.number("cooldown_days", 30.0, minimum=0),
        answer_window_hours=section.number("answer_window_hours", 24.0, positive=True),
        comment_window_minutes=section.number("comment_window_minutes", 30.0, minimum=0),
        default_locale=default_locale,
        whatsapp_template=None if template_section is None else _parse_template(template_section),
    )
    section.finish()
    return settings


def _parse_dispatcher(section: _Section | None) -> DispatcherSettings:
    if section is None:
        return DispatcherSettings()
    outbound_section = section.section("outbound")
    outbound: dict[str, str] = {}
    if outbound_section is not None:
        for channel in list(outbound_section.data):
            if channel not in CHANNELS:
                raise ValueError(f"{outbound_section.name(str(channel))}: unknown channel")
            target = outbound_section.text(channel, required=True) or ""
            if ":" not in target:
                raise ValueError(
                    f"{outbound_section.name(channel)}: expected 'module:callable', got {target!r}"
                )
            outbound[channel] = target
        outbound_section.finish()
    settings = DispatcherSettings(
        poll_seconds=section.number("poll_seconds", 5.0, positive=True),
        batch_size=section.integer("batch_size", 50, minimum=1),
        max_attempts=section.integer("max_attempts", 4, minimum=1),
        retry_backoff_seconds=section.number("retry_backoff_seconds", 30.0, minimum=0),
        claim_timeout_seconds=section.number("claim_timeout_seconds", 300.0, positive=True),
        lookback_hours=section.number("lookback_hours", 48.0, positive=True),
        outbound=outbound,
    )
    section.finish()
    return settings


def parse_config(document: Mapping[str, Any]) -> SurveysConfig:
    """Validate ``document`` (a parsed TOML file or API body) and build the configuration."""
    root = _Section(document, "")
    dispatcher = _parse_dispatcher(root.section("dispatcher"))
    surveys_section = root.section("surveys")
    surveys: dict[str, SurveySettings] = {}
    owner: dict[str, str] = {}
    if surveys_section is not None:
        for name in list(surveys_section.data):
            sub = _Section(surveys_section.get(name), surveys_section.name(str(name)))
            survey = _parse_survey(str(name), sub)
            for channel in survey.channels:
                if channel in owner:
                    raise ValueError(
                        f"surveys.{name}.channels: channel {channel!r} is already "
                        f"covered by survey {owner[channel]!r}"
                    )
                owner[channel] = str(name)
            surveys[str(name)] = survey
        surveys_section.finish()
    root.finish()
    return SurveysConfig(surveys=surveys, dispatcher=dispatcher)


def load_config(path: str | Path) -> SurveysConfig:
    """Read and validate a TOML survey configuration file."""
    with open(path, "rb") as handle:
        try:
            document = tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: invalid TOML: {error}") from error
    return parse_config(document)
