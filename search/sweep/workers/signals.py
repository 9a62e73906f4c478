"""Stop signals: recorded at once, raised only where raising cannot do harm.

SIGINT, SIGTERM and SIGHUP are recorded at once, but raised as
:class:`Interrupted` only where the process allows it (``interruptible``) and
no storage, database driver, library clean-up code or import is on the stack:
an exception raised inside a SQLAlchemy callback is swallowed ("Exception
ignored in ..."), one raised inside a transaction leaves the database locked.
Otherwise the signal waits and is tried again every 20 ms (SIGALRM); code that
is not interruptible looks at the flag between its steps. A second signal that
arrives while the first still waits ends the process at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import CodeType, FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RETRY_S = 0.02


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """A stop signal, raised where it is safe; ``except Exception`` does not catch it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    # Imported here, not at the top: commands import this module before anything else.
    import sqlite3
    import weakref

    import optuna
    import sqlalchemy

    dirs = [Path(optuna.__file__).parent, Path(sqlalchemy.__file__).parent]
    dirs += [Path(sqlite3.__file__).parent, Path(weakref.__file__)]
    dirs += [Path(threading.__file__), Path(contextlib.__file__).parent / "logging"]
    with contextlib.suppress(ImportError):
        import psycopg2

        dirs.append(Path(psycopg2.__file__).parent)
    dirs += [Path(__file__).parent / "storage.py", Path(__file__).parent / "history.py"]
    return tuple(str(d) for d in dirs)


_PROCESS_MAINS: set[CodeType] = set()


def process_main(function):  # noqa: ANN001, ANN201 - returns the function it is given
    """Mark ``function`` as the main of a forked process: the frames below it are the
    forking thread's (a Dask worker's thread, say), which never run again in the child,
    so :func:`_safe_to_raise` looks no further down than it."""
    _PROCESS_MAINS.add(function.__code__)
    return function


def _safe_to_raise(frame: FrameType | None) -> bool:
    """No frame of a storage, a driver, a clean-up callback or an import on the stack."""
    while frame is not None and frame.f_code not in _PROCESS_MAINS:
        name = frame.f_code.co_filename
        if name.startswith(_library_dirs()) or name.startswith("<frozen importlib"):
            return False
        frame = frame.f_back
    return True


class StopFlag:
    """The stop signals of a process: recorded at once, raised only where safe.

    ``interruptible`` says whether the process wants :class:`Interrupted` raised
    (a command training in-process does; a worker loop between steps and a pool
    supervising its workers do not, they look at the flag). ``presses`` counts
    the signals; a second one that arrives while the first still waits (not
    raised, not acted on) ends the process at once with 128 + its number.
    """

    def __init__(self, *, interruptible: bool = False, hard_exit: bool = True) -> None:
        self.hard_exit = hard_exit  # False in workers: their parent ends them if need be
        self.signum: int | None = None
        self.presses = 0
        self.event = threading.Event()
        self.interruptible = interruptible
        self.acted = False  # set by whoever handles the first signal (no hard exit then)
        # Processes that get every signal at once (a pool's workers): kill() is safe in a
        # handler, and a worker must not wait for the supervisor's next look.
        self.forward_to: list[int] = []

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def install(self) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_signal)
        signal.signal(signal.SIGALRM, self._on_retry)

    def request(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
        self.event.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.presses += 1
        for pid in self.forward_to:
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
        if self.presses > 1 and not self.acted and self.hard_exit:
            os._exit(128 + signum)
        self.request(signum)
        self._maybe_raise(frame)

    def _on_retry(self, signum: int, frame: FrameType | None) -> None:
        self._maybe_raise(frame)

    def _maybe_raise(self, frame: FrameType | None) -> None:
        if self.signum is None or not self.interruptible or self.acted:
            return
        if _safe_to_raise(frame):
            self.interruptible = False
            self.acted = True
            raise Interrupted(self.signum)
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)

    def raise_if_waiting(self) -> None:
        """Raise :class:`Interrupted` now if a signal waits and the process allows it."""
        if self.signum is not None and self.interruptible and not self.acted:
            self.interruptible = False
            self.acted = True
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        """Let signals raise :class:`Interrupted` inside (at once if one already waits)."""
        self.interruptible = True
        try:
            if self.signum is not None and not self.acted:
                self.interruptible = False
                self.acted = True
                raise Interrupted(self.signum)
            yield
        finally:
            self.interruptible = False

    def wait(self, seconds: float) -> None:
        self.event.wait(seconds)


_CURRENT: list[StopFlag] = []


def exit_at_once_while_starting() -> None:
    """Until a command installs its own handlers: a stop signal ends it at once, with
    one line and 128 + the signal (it has changed nothing yet; without this, Ctrl-C
    during the imports would print a traceback). Call it first, before other imports."""

    def leave(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        os.write(2, f"interrupted ({name}) while starting: nothing was changed\n".encode())
        os._exit(128 + signum)

    for s in STOP_SIGNALS:
        signal.signal(s, leave)


def checkpoint() -> None:
    """Raise a waiting stop signal here, if the process allows it.

    For loops of storage calls (queueing a large target): a signal that lands
    inside a call waits for it to end, and the next call would usually begin
    before the 20 ms retry, so the loop looks itself.
    """
    if _CURRENT:
        _CURRENT[-1].raise_if_waiting()


def current() -> StopFlag:
    """The flag whose handlers are installed (by a command), else a flag no signal sets."""
    return _CURRENT[-1] if _CURRENT else StopFlag()


@contextlib.contextmanager
def signals_recorded(stop: StopFlag) -> Iterator[StopFlag]:
    """Install ``stop``'s handlers for the duration (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (*STOP_SIGNALS, signal.SIGALRM)}
    stop.install()
    _CURRENT.append(stop)
    try:
        yield stop
    finally:
        _CURRENT.remove(stop)
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in previous.items():
            signal.signal(s, handler)
