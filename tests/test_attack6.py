"""Attacks on the textblob loader, the new contact and conversation ids, and a timed-out stop."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from chatmw.recorder import Recorder, RecorderSettings
from chatmw.store.engine import make_engine
from chatmw.store.identity import resolve_contacts, resolve_named_conversations
from chatmw.store.models import Contact, Conversation
from chatmw.store.writer import Writer
from tests.test_attack5 import (
    _assert_spooled_once,
    _messages,
    _slow_writer,
    _spooling_recorder,
    _wait_pending,
    _wait_until,
)


def _largest_id(engine: Engine) -> int:
    # The largest id the column takes: SQLite's rowid, or PostgreSQL's INTEGER.
    return 2**63 - 1 if engine.dialect.name == "sqlite" else 2**31 - 1

# In a fresh process, thread A loads the lexicon and pauses after _text.Sentiment.load has
# stored the XML's words, before the adverbs that textblob.en derives are added. Thread B
# scores a text with such an adverb meanwhile. A resumes when B is done, or after 2 s when
# B waits for the load. The script prints both polarities, TextBlob's and chatmw's after.
_FIRST_USE_SCRIPT = textwrap.dedent("""
    import threading

    from chatmw import _textblob_parts
    from chatmw.sentiment import polarity

    TEXT = "This is terribly good and really quite nice, not bad at all"
    words_stored = threading.Event()
    second_done = threading.Event()
    load_words = _textblob_parts.TEXT.Sentiment.load

    def paused_load(self, path=None):
        load_words(self, path)
        words_stored.set()
        second_done.wait(2)

    _textblob_parts.TEXT.Sentiment.load = paused_load
    results = {}

    def first():
        results["first"] = polarity(TEXT)

    def second():
        words_stored.wait(10)
        results["second"] = polarity(TEXT)
        second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    from textblob.en import sentiment
    print(repr((results, round(sentiment(TEXT)[0], 4), polarity(TEXT))))
""")


def test_lexicon_first_use_in_threads() -> None:
    completed = subprocess.run([sys.executable, "-c", _FIRST_USE_SCRIPT], capture_output=True,
                               text=True, timeout=120, check=True)
    results, expected, later = eval(completed.stdout)  # noqa: S307 - output of the script above

    assert results["first"] == expected
    assert results["second"] == expected
    assert later == expected


def _stored_ids(engine: Engine, model: type) -> dict[tuple[str, str], int]:
    with engine.connect() as connection:
        rows = connection.execute(select(model.channel, model.external_id, model.id))
        return {(channel, external): row_id for channel, external, row_id in rows}


@pytest.mark.parametrize("below_largest", [0, 2])
def test_new_contacts_after_largest_rowid(engine: Engine, below_largest: int) -> None:
    # SQLite picks unused ids at random once the largest id is 2**63 - 1, so the new ids are
    # not consecutive. PostgreSQL's sequence starts at 1 whatever ids exist.
    largest = _largest_id(engine)
    with Session(engine) as session, session.begin():
        session.execute(insert(Contact).values(
            id=largest - below_largest, channel="web", external_id="largest",
            first_seen_ms=0, last_seen_ms=0))
    wanted = {("web", f"new{index}"): 1000 for index in range(5)}
    with Session(engine) as session, session.begin():
        found = resolve_contacts(session, wanted)

    stored = _stored_ids(engine, Contact)
    assert found == {key: stored[key] for key in wanted}
    assert len(stored) == 6


def test_new_conversations_after_largest_rowid(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        largest = _largest_id(engine)
        contact = resolve_contacts(session, {("web", "u1"): 1000})[("web", "u1")]
        session.execute(insert(Conversation).values(
            id=largest, channel="web", external_id="largest", contact_id=contact,
            started_at_ms=0, last_message_at_ms=0))
    wanted = {("web", f"c{index}"): (1000 + index, contact) for index in range(4)}
    with Session(engine) as session, session.begin():
        found = resolve_named_conversations(session, wanted)

    stored = _stored_ids(engine, Conversation)
    assert found == {key: stored[key] for key in wanted}


def test_stop_timeout_then_failed_write_counted(engine: Engine, database_url: str) -> None:
    # The in-process write is still running when stop() gives up, and then fails. Without a
    # spool the stop leaves that batch to the writer thread, which must count it as dropped.
    writer = _slow_writer(database_url, 0.6, fail_odd=True)
    recorder = Recorder(writer, RecorderSettings(batch_size=5, batch_interval_s=0.01))
    recorder.start()
    thread = recorder._thread
    for event in _messages(5):
        recorder.submit(event)
    deadline = time.monotonic() + 30
    while writer.calls == 0 and not recorder._writer_run.in_flight:
        assert time.monotonic() < deadline, "no write started"
        time.sleep(0.01)
    assert recorder.stop(timeout=0.1) is False
    thread.join(30)
    assert not thread.is_alive()

    stats = recorder.stats()
    assert stats.submitted == 5
    assert stats.written == 0
    assert stats.dropped == {"shutdown_timeout": 5}


class _AlwaysLocked(Writer):
    """A store writer whose every write fails as retryable, in the child."""

    def write(self, batch):  # type: ignore[no-untyped-def]
        time.sleep(0.2)
        raise OperationalError("INSERT", {}, Exception("database is locked"))


def _always_locked(url: str) -> _AlwaysLocked:
    return _AlwaysLocked(make_engine(url))


def test_stop_timeout_before_rewrite_spools_batch(database_url: str, tmp_path) -> None:
    # The pending batch's result is a failure, and stop() gives up after the writer thread
    # read it but before the thread writes the batch again. The stop spools the batch, and
    # the failed rewrite does not count it a second time.
    recorder, writer, spool = _spooling_recorder(
        functools.partial(_always_locked, database_url), tmp_path, retries=0)
    rewrite = recorder._write_in_flight
    stopped = threading.Event()

    def rewrite_after_stop(batch):  # type: ignore[no-untyped-def]
        assert stopped.wait(30), "stop() did not time out"
        return rewrite(batch)

    recorder._write_in_flight = rewrite_after_stop  # type: ignore[method-assign]
    recorder.start()
    thread = recorder._thread
    try:
        for event in _messages(5):
            recorder.submit(event)
        _wait_pending(recorder)
        _wait_until(lambda: recorder._writer_run.pending is None, "the pending batch never settled")
        assert recorder.stop(timeout=0.1) is False
        stopped.set()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        writer.close()
    assert recorder.stats().submitted == 5
    _assert_spooled_once(recorder, spool, 5)
