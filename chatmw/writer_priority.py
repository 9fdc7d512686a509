"""The scheduling priority of the writer processes, and how it rises when they starve.

A writer process competes with the application for CPU. On Linux it runs under the idle
scheduling policy (``SCHED_IDLE``) by default: it gets a CPU only when no other task wants
it, and a task of the application that wakes up takes the CPU from it at once. Below
capacity the machine has idle CPU and the writer keeps up; when the application keeps every
core busy, the recorder's queue absorbs the delay.

A host whose cores stay busy for long would starve such a writer. The parent process
therefore watches the writer processes' threads while it waits for a reply (their state and
run time in ``/proc/PID/task/TID``). A thread can stay runnable for seconds while the
processes together run for at most half of that time. The parent then stops the writer
processes and starts new ones under the batch policy (``SCHED_BATCH``) with the configured
niceness, where they get their share of a contended CPU. Those processes return to the
idle policy by themselves after a calm period. Without ``CAP_SYS_NICE`` a thread may leave
the idle policy only for a niceness its ``RLIMIT_NICE`` allows (``sched(7)``), and the usual
limit of 0 allows none, so rising means starting new processes.

Settings: ``CHATMW_WRITER_POLICY`` (``idle``, the default, or ``batch`` to keep the batch
policy always) and ``CHATMW_WRITER_NICE`` (0-19, the niceness added under the batch policy;
0 keeps the parent's policy and niceness and turns the idle policy off too).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from chatmw.config import int_setting

__all__ = ["DEFAULT_NICENESS", "IDLE_SUPPORTED", "NICE_ENV", "POLICIES", "POLICY_ENV",
           "StarvationWatch", "WriterPriority", "enter_idle_policy", "runs_idle",
           "start_priority", "thread_samples", "writer_niceness", "writer_policy"]

logger = logging.getLogger("chatmw")

# The niceness the writer process adds to its own under the batch policy, so the application
# wins contended CPU. At 5 Linux weighs the writer 335 against 1,024 for a process at 0, so
# on a CPU both want the writer gets about a quarter of it.
NICE_ENV = "CHATMW_WRITER_NICE"
DEFAULT_NICENESS = 5
# The policy of the writer processes: "idle" (the default) runs them under SCHED_IDLE and
# raises them when they starve, "batch" keeps the batch policy with the niceness above.
POLICY_ENV = "CHATMW_WRITER_POLICY"
POLICIES = ("idle", "batch")
DEFAULT_POLICY = "idle"
# The idle policy needs Linux's SCHED_IDLE, and the thread states and run times of /proc,
# without which a starving writer would go unnoticed.
IDLE_SUPPORTED = (hasattr(os, "SCHED_IDLE") and os.path.exists("/proc/self/task")
                  and os.path.exists("/proc/self/schedstat"))


def writer_niceness(environ: Mapping[str, str] | None = None) -> int:
    """Read ``CHATMW_WRITER_NICE``, the niceness the writer process adds to its own (0-19)."""
    return int_setting(os.environ if environ is None else environ, NICE_ENV, 0, 19,
                       DEFAULT_NICENESS)


def writer_policy(environ: Mapping[str, str] | None = None) -> str:
    """Read ``CHATMW_WRITER_POLICY``: ``idle`` (also when unset) or ``batch``."""
    raw = (os.environ if environ is None else environ).get(POLICY_ENV, "").strip()
    policy = raw.lower() or DEFAULT_POLICY
    if policy not in POLICIES:
        raise ValueError(f"{POLICY_ENV} must be 'idle' or 'batch', got {raw!r}")
    return policy


@dataclass(frozen=True)
class WriterPriority:
    """The scheduling settings of the writer processes.

    ``niceness`` is added under the batch policy (0 leaves the processes as the parent is).
    ``idle`` runs them under the idle policy while they keep up. Processes whose thread
    stays runnable for ``starved_after_s`` while they do not run for at least
    ``starved_share`` of that time start again under the batch policy, for ``calm_s``
    seconds (see :class:`StarvationWatch`).
    """

    niceness: int = DEFAULT_NICENESS
    idle: bool = True
    calm_s: float = 300.0
    starved_after_s: float = 2.0
    starved_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.niceness <= 19:
            raise ValueError(f"niceness must be from 0 to 19, got {self.niceness}")
        for name in ("calm_s", "starved_after_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.starved_share <= 1:
            raise ValueError(f"starved_share must be above 0 and at most 1, "
                             f"got {self.starved_share}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> WriterPriority:
        """Read ``CHATMW_WRITER_NICE`` and ``CHATMW_WRITER_POLICY``.

        A bad value is logged and replaced by its default.
        """
        try:
            niceness = writer_niceness(environ)
        except ValueError as error:
            logger.warning("%s; the writer process keeps the default niceness %d",
                           error, DEFAULT_NICENESS)
            niceness = DEFAULT_NICENESS
        try:
            policy = writer_policy(environ)
        except ValueError as error:
            logger.warning("%s; the writer process uses the %s policy", error, DEFAULT_POLICY)
            policy = DEFAULT_POLICY
        return cls(niceness=niceness, idle=policy == "idle" and niceness > 0)

    @property
    def uses_idle(self) -> bool:
        """Return whether the processes run under the idle policy on this system."""
        return self.idle and IDLE_SUPPORTED

    def start_argument(self, raised: bool) -> tuple[int, float | None]:
        """Return the niceness and the seconds until the idle policy, for a process started now.

        ``raised`` starts it under the batch policy for the calm period. ``None`` means
        never idle, ``0.0`` idle from the start.
        """
        if not self.uses_idle:
            return self.niceness, None
        return self.niceness, (self.calm_s if raised else 0.0)


def start_priority(priority: tuple[int, float | None]) -> float | None:
    """Set the calling process's priority when it starts; return when to enter the idle
    policy (a ``time.monotonic`` value), or ``None``.

    Called first in a writer process, before it starts any thread, so that its threads
    inherit what is set here.
    """
    niceness, idle_after_s = priority
    if niceness and hasattr(os, "nice"):
        with contextlib.suppress(OSError):
            os.nice(niceness)
    if niceness and hasattr(os, "SCHED_BATCH"):
        # Linux treats a batch task as CPU-bound and disfavours it when it wakes up (a new
        # batch arrived), per sched(7). Any user may choose this policy, so a failure here
        # is unexpected and only skipped.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    if idle_after_s is None:
        return None
    if idle_after_s <= 0:
        enter_idle_policy()
        return None
    return time.monotonic() + idle_after_s


def enter_idle_policy() -> None:
    """Put every thread of the calling process under the idle policy (Linux)."""
    if not hasattr(os, "SCHED_IDLE"):
        return
    try:
        threads = [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for thread in threads:
        # Only a thread that ended since the listing can fail here, because lowering the
        # priority of the caller's own threads needs no privilege.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))


def thread_samples(pid: int) -> dict[int, tuple[bool, int]]:
    """Return whether each thread of ``pid`` is runnable now, and the nanoseconds it has run.

    Read from ``/proc/PID/task/TID/stat`` (the state ``R`` is running or waiting for a
    CPU) and ``schedstat`` (the first figure). Empty when the process is gone or the system
    does not report them.
    """
    samples: dict[int, tuple[bool, int]] = {}
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return samples
    for thread in threads:
        folder = f"/proc/{pid}/task/{thread}"
        try:
            with open(f"{folder}/stat", "rb") as stat:
                # The command name in parentheses may contain spaces, so the state is read
                # after the last parenthesis.
                state = stat.read().rpartition(b")")[2].split()[0]
            with open(f"{folder}/schedstat", "rb") as schedstat:
                ran = int(schedstat.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue
        samples[int(thread)] = (state == b"R", ran)
    return samples


def runs_idle(pid: int) -> bool:
    """Return whether the main thread of ``pid`` runs under the idle policy."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        return os.sched_getscheduler(pid) == os.SCHED_IDLE
    except OSError:
        return False


class StarvationWatch:
    """A watch of processes under the idle policy while a reply from them is due.

    Each call of :meth:`starved` samples the threads of the processes. They are starved
    once some thread has been runnable at every sample for ``starved_after_s`` while all
    their threads together ran for at most ``1 - starved_share`` of that time. Counting
    every thread's run time keeps processes that share a CPU with each other from looking
    starved. The kernel adds to a thread's run-queue wait only when it gets a CPU, so a
    starved thread's wait would show late. Its state and its run time are current.
    """

    def __init__(self, pids: Sequence[int], priority: WriterPriority) -> None:
        self.pids = list(pids)
        self.priority = priority
        # Per sample: its time and the run time of each thread.
        self.samples: list[tuple[float, dict[tuple[int, int], int]]] = []
        # Each thread runnable at the last sample, with the index of the sample since which
        # it was runnable at every sample.
        self.runnable_since: dict[tuple[int, int], int] = {}
        # The share of the time the processes did not run, at the last call.
        self.share = 0.0
        self._sample()

    def _sample(self) -> None:
        ran: dict[tuple[int, int], int] = {}
        runnable: list[tuple[int, int]] = []
        for pid in self.pids:
            for thread, (is_runnable, nanoseconds) in thread_samples(pid).items():
                ran[(pid, thread)] = nanoseconds
                if is_runnable:
                    runnable.append((pid, thread))
        index = len(self.samples)
        self.samples.append((time.monotonic(), ran))
        self.runnable_since = {key: self.runnable_since.get(key, index) for key in runnable}

    def starved(self) -> bool:
        """Sample the threads; return whether the processes are starved of CPU."""
        self._sample()
        if not self.runnable_since:
            self.share = 0.0
            return False
        now, ran_now = self.samples[-1]
        since, ran_then = self.samples[min(self.runnable_since.values())]
        elapsed = now - since
        if elapsed < self.priority.starved_after_s:
            return False
        # Threads that started or ended in between are left out.
        progress = sum(ran_now[key] - ran for key, ran in ran_then.items() if key in ran_now)
        self.share = 1 - progress / 1e9 / elapsed
        return self.share >= self.priority.starved_share
