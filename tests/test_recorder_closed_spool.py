"""Events that reach a spool closed by Runtime.stop are counted as spool_closed."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from chatmw import events as ev
from chatmw.recorder import Recorder, RecorderSettings
from chatmw.spool import FileSpool, SpoolSettings
from chatmw.store.writer import Writer

FAST = RecorderSettings(batch_size=10, batch_interval_s=0.01)


def message(key: str) -> ev.Message:
    return ev.Message(channel="web", occurred_at=ev.now_utc(), key=key, role="user",
                      user_id="u1", text=key)


def test_durable_submit_closed_spool(tmp_path: Path, engine: Engine) -> None:
    # submit_durable after the stop that closed the spool: the spool rejects the events
    # because it is closed, so they are dropped as spool_closed, as submit counts them.
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    recorder = Recorder(Writer(engine), FAST, spool=spool)
    recorder.start()
    assert recorder.stop(10)
    spool.close()

    durable = recorder.submit_durable([message("late-durable")])
    queued = recorder.submit(message("late-queued"))
    stats = recorder.stats()

    assert durable is False
    assert queued is False
    assert stats.dropped == {"spool_closed": 2}
    assert stats.submitted == 0
