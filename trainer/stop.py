"""Graceful stop on SIGTERM / SIGINT for long training runs (classifiers and policies alike).

A long run on a shared box is ended by `pkill -TERM -f "trainer CONFIG"`: the first signal asks the trainer to stop at
its next safe point (`trainer.request_stop()`: the classifier trainer's next log point, the policy trainer's end of
the current meta-iteration), where it saves its state exactly as a `--max_seconds` stop does; a second signal gets the
handler that was there before (the default one ends the process at once).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(trainer, where: str, enabled: bool = True):
    """While inside, SIGTERM / SIGINT call `trainer.request_stop()` once, announcing `where` it will stop; the
    caller's handlers are back on exit. Off the main thread (where signals cannot be caught), or with `enabled`
    False, it changes nothing."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def stop(signum, _frame):
        print(f"{signal.Signals(signum).name}: stopping {where}; send it again to quit at once", file=sys.stderr)
        for s, handler in previous.items():
            signal.signal(s, handler)
        trainer.request_stop()

    for s in previous:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():  # the caller's handlers again (in-process callers: the tests)
            signal.signal(s, handler)
