"""A process that acknowledges durable submits, for the SIGKILL test.

Usage: ``python fault_child.py DATABASE_URL SPOOL_DIR``. It submits batches of five
messages with :meth:`Recorder.submit_durable` and prints the keys of each acknowledged
batch on one line, flushed, until it is killed.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

from chatmw import events as ev
from chatmw.config import Settings
from chatmw.recorder import RecorderSettings
from chatmw.runtime import Runtime
from chatmw.spool import FileSpool, SpoolSettings

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)


def main(database_url: str, spool_dir: str) -> None:
    settings = Settings(database_url=database_url,
                        recorder=RecorderSettings(batch_size=50, batch_interval_s=0.01))
    runtime = Runtime.from_settings(settings, spool=FileSpool(SpoolSettings(directory=spool_dir)))
    runtime.start(migrate=False)
    index = 0
    while True:
        batch = [
            ev.Message(channel="messenger", occurred_at=T0 + timedelta(seconds=index + n),
                       key=f"k{index + n:06d}", role="user", user_id=f"u{(index + n) % 7}",
                       text="hello")
            for n in range(5)
        ]
        if runtime.recorder.submit_durable(batch):
            print(" ".join(event.key for event in batch), flush=True)
        index += 5


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
