"""The pieces one process runs: engine, writer and recorder, started and stopped together."""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING

from chatmw.business import install as install_business
from chatmw.config import Settings
from chatmw.sentiment import sentiment_enricher
from chatmw.store.writer import Writer, WriterSettings
from chatmw.surveys.service import install_answer_preprocessor

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from chatmw.business_hours import BusinessHours
    from chatmw.metrics.rollup_refresh import Refresher
    from chatmw.recorder import Recorder, Spool
    from chatmw.security.privacy import Privacy, PrivacySettings
    from chatmw.writer_process import ProcessWriter

# Runtime imports the recorder, the rollups and the privacy rules when it is built, so a
# process that only builds a writer (such as ``chatmw import``) starts without them.

__all__ = ["Runtime", "build_writer", "PRIVACY_FROM_ENV"]

# The default of ``Runtime.from_settings(privacy=...)``: privacy settings read from the
# environment, which pseudonymise ids and redact text unless the variables turn that off.
PRIVACY_FROM_ENV = object()

logger = logging.getLogger("chatmw")


def build_writer(settings: Settings, engine: Engine,
                 privacy: PrivacySettings | None = None) -> Writer:
    """Build the writer every recording path shares, with its enrichers and handlers.

    Sentiment scoring (when ``settings.sentiment`` is on), lead detection, query-type rules
    and the survey answer preprocessor run in every process that records messages. An app
    that mounts the business router installs its own business settings over the defaults.
    """
    writer = Writer(engine, WriterSettings(session_gap_ms=settings.session_gap_ms))
    if settings.sentiment:
        writer.enrichers.append(sentiment_enricher)
    install_business(writer, text_mode=None if privacy is None else privacy.text_mode)
    install_answer_preprocessor(writer)
    return writer


class Runtime:
    """Owns the engine, the writer and the recorder of one process.

    Create it with :meth:`from_settings`; ``start`` migrates the database (when asked) and
    starts the recorder and the rollup refresher thread (see docs/rollups.md); ``stop``
    stops the refresher and flushes the recorder within the configured time limit.

    ``survey_channels`` are the channels whose users' platform ids are kept for surveys
    when ids are pseudonymised (see :mod:`chatmw.surveys.addresses`); set it before
    ``start``. It is empty by default, so no platform id is stored unless surveys need it.
    """

    def __init__(self, settings: Settings, engine: Engine, writer: Writer, recorder: Recorder,
                 privacy_settings: PrivacySettings | None = None,
                 survey_channels: Collection[str] = ()) -> None:
        self.settings = settings
        self.engine = engine
        self.writer = writer
        self.recorder = recorder
        self.privacy_settings = privacy_settings
        self.survey_channels = tuple(survey_channels)
        # Set by start() when privacy settings were given: the resolved pseudonymiser.
        self.privacy: Privacy | None = None
        self._capturing = False
        # Set by start() when the writer runs in a child process (Settings.writer_process).
        self._process_writer: ProcessWriter | None = None
        # Seconds between rollup refreshes of the thread ``start`` runs; None runs no thread.
        from chatmw.metrics.rollup_refresh import REFRESH_INTERVAL_S

        self.rollup_interval_s: float | None = REFRESH_INTERVAL_S
        self._rollups: Refresher | None = None
        # The business hours this process serves metrics with; ``start`` registers them as
        # the schedule of the business-hours rollups (``mount_chatmw`` sets it). None
        # leaves the stored schedule as it is.
        self.business_hours: BusinessHours | None = None

    @classmethod
    def from_settings(cls, settings: Settings, spool: Spool | None = None,
                      privacy: PrivacySettings | None | object = PRIVACY_FROM_ENV) -> Runtime:
        """Build the engine, writer and recorder.

        ``privacy`` defaults to :meth:`PrivacySettings.from_env`: platform user ids are
        stored as keyed pseudonyms and e-mail addresses and phone numbers are redacted from
        text, unless ``CHATMW_PSEUDONYMISE`` or ``CHATMW_TEXT_MODE`` turn that off. With
        ``privacy=None`` ids and text are stored as the sources report them. The writer
        comes from :func:`build_writer`.
        """
        from chatmw.recorder import Recorder
        from chatmw.security.privacy import PrivacySettings
        from chatmw.store.engine import make_engine

        if privacy is PRIVACY_FROM_ENV:
            privacy = PrivacySettings.from_env()
        if privacy is not None and not isinstance(privacy, PrivacySettings):
            kind = type(privacy).__name__
            raise TypeError(f"privacy must be PrivacySettings or None, got {kind}")
        engine = make_engine(settings.database_url)
        writer = build_writer(settings, engine, privacy)
        recorder = Recorder(writer, settings.recorder, spool=spool)
        return cls(settings, engine, writer, recorder, privacy)

    def start(self, migrate: bool = True) -> None:
        """Apply migrations (unless ``migrate`` is false) and start the recorder.

        With privacy settings, the pseudonym key is resolved first (from the settings, or
        from the database, which must then be reachable) and installed in the writer and
        the recorder. Address capture for ``survey_channels`` is installed after that, so
        that it copies the platform ids before they are pseudonymised.
        """
        from chatmw.metrics.rollup_refresh import Refresher
        from chatmw.security.privacy import Privacy
        from chatmw.store.engine import upgrade
        from chatmw.surveys.addresses import install_address_capture
        from chatmw.writer_process import start_process_writer

        if migrate:
            upgrade(self.engine)
        if self.business_hours is not None:
            self._register_business_hours(self.business_hours)
        if self.privacy_settings is not None and self.privacy is None:
            self.privacy = Privacy.load(self.privacy_settings, self.engine)
            self.privacy.install(self.writer, self.recorder)
        if self.survey_channels and not self._capturing:
            install_address_capture(self.recorder, self.survey_channels)
            self._capturing = True
        # Events decoded from chat exchanges by the writer get the recorder's transform.
        self.writer.transform = self.recorder.transform
        if self._process_writer is None and self.settings.use_writer_process():
            self._process_writer = start_process_writer(
                self.writer, self.settings.database_url, self.rollup_interval_s)
            if self._process_writer is not None:
                self.recorder.writer = self._process_writer
                # The child refreshes the rollups once it starts, at the first write.
                self._process_writer.start()
        self.recorder.start()
        if (self.rollup_interval_s is not None and self._rollups is None
                and self._process_writer is None):
            self._rollups = Refresher(self.engine, self.rollup_interval_s)
            self._rollups.start()

    def _register_business_hours(self, hours: BusinessHours) -> None:
        from sqlalchemy.exc import DBAPIError

        from chatmw.metrics.business_rollups import register_business_hours

        try:
            register_business_hours(self.engine, hours)
        except DBAPIError as error:
            # The metrics stay exact: response-time-business reads raw rows for this schedule.
            logger.warning(
                "rollups: registering the business hours failed (%s); "
                "response-time-business reads raw rows until they are registered",
                type(error.orig).__name__,
            )

    def stop(self) -> bool:
        """Flush and stop the recorder, then close the spool; ``False`` when events were lost.

        Events the recorder could not write in time are in the spool (when there is one)
        and are replayed by the next start.
        """
        if self._rollups is not None:
            self._rollups.stop()
            self._rollups = None
        flushed = self.recorder.stop()
        if self._process_writer is not None:
            self._process_writer.close()
            self._process_writer = None
            self.recorder.writer = self.writer
        close = getattr(self.recorder.spool, "close", None)
        if close is not None:
            close()
        self.engine.dispose()
        return flushed
