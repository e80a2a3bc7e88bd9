"""At interpreter exit, the threads that run torch operators stop before Python finalises.

Why: while it finalises, Python ends every daemon thread that next asks for the GIL with
pthread_exit, called from inside that request. A thread busy in a torch operator asks for the
GIL back in a pybind11 guard's destructor, which is noexcept: the unwinding that pthread_exit
starts reaches it, C++ calls std::terminate, and the process aborts (SIGABRT, "terminate called
without an active exception") instead of exiting 0: after a server drained its calls, or after
a test run that passed (CI saw exactly that).

How: the owners of such threads (generation engines, Whisper batch schedulers, the compute
lanes) register here. At exit, before finalisation, each is stopped and its threads joined; the
lanes, which the others hand their work to, last: they finish the task they are running (a
task that calls `compute.yield_point()` ends at its next one) and stop. A thread still busy
after EXIT_GRACE_S is left running and named in the log: the abort can then still happen, but
exit never hangs.
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Iterable, Protocol

log = logging.getLogger(__name__)

# The longest exit waits for model work to end (a sliced task returns within milliseconds;
# a task that never yields, e.g. one long forward pass, gets this long).
EXIT_GRACE_S = 10.0


class ExitOwner(Protocol):
    def stop_for_exit(self) -> Iterable[threading.Thread]:
        """Stops taking work and tells the owner's threads to end, without waiting for them
        (the guard waits, within one deadline for all); -> those threads."""


_first: "weakref.WeakSet[ExitOwner]" = weakref.WeakSet()
_last: "weakref.WeakSet[ExitOwner]" = weakref.WeakSet()  # the compute lanes
_owners_lock = threading.Lock()


def register(owner: ExitOwner, last: bool = False) -> None:
    """`owner` is stopped at exit (held weakly: an owner that goes away needs no stopping); `last`:
    after every other owner's threads ended (the compute lanes, which run their work)."""
    with _owners_lock:
        (_last if last else _first).add(owner)


def stop_model_threads(grace_s: float | None = None) -> list[threading.Thread]:
    """Stops every registered owner, then the `last` ones, and waits up to `grace_s` in all
    (default EXIT_GRACE_S) for their threads; returns those still running."""
    grace_s = EXIT_GRACE_S if grace_s is None else grace_s
    deadline = time.monotonic() + grace_s
    with _owners_lock:
        stages = [list(_first), list(_last)]
    threads: list[threading.Thread] = []
    for owners in stages:
        stage = [thread for owner in owners for thread in owner.stop_for_exit()]
        for thread in stage:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        threads += stage
    left = [thread for thread in threads if thread.is_alive()]
    if left:
        log.warning("still running model work at exit after %.0fs: %s", grace_s,
                    ", ".join(thread.name for thread in left))
    return left


atexit.register(stop_model_threads)
