"""Waiting awake for a moment before sleeping, where the wait is usually short.

A thread that sleeps on a lock or a socket lets its CPU go idle, and on a
virtual machine an idle CPU halts: whatever it waits for then has to wake it,
which costs tens of microseconds, often more than the wait itself.  On the
2-core test VM (its kernel runs with ``haltpoll.guest_halt_poll_ns=0``) a
loopback PING answered to a sleeping process took 60 to 105 µs, against 19 µs
to one that stayed awake.  Adaptive mutexes do the same (glibc's
``PTHREAD_MUTEX_ADAPTIVE_NP``, the kernel's optimistic spinning); the waits
here (``flock``, a ``threading.Lock`` held as a signal, a Redis socket) have no
such mode, hence :func:`spin`.

Under gevent nothing spins: the waiting greenlet must go back to its hub,
where the others that could run, the one it waits for among them, are.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable


def spin(ready: Callable[[], bool], seconds: float) -> bool:
    """Call ``ready`` until it is true or ``seconds`` have passed, yielding the CPU between calls.

    ``sched_yield`` lets any thread with work run first, and gives up the GIL.
    Returns whether ``ready`` came true.
    """
    deadline = time.perf_counter() + seconds
    while not ready():
        if time.perf_counter() >= deadline:
            return False
        os.sched_yield()
    return True


def gevent_patched(module: str) -> bool:
    """Whether gevent has patched ``module`` (``"select"``, ``"threading"``) in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched(module))


def let_others_run() -> None:
    """Under gevent, let the greenlets that are ready run before this one goes on."""
    # Imported here: gevent is an extra, and this runs only under it.  It ships
    # no type hints, and its stubs (types-gevent) are not in the registry.
    from gevent import sleep  # type: ignore[import-untyped]

    sleep(0)


#: Whether this process's socket waits go through gevent's hub; see :func:`waits_through_hub`.
_through_hub: bool | None = None


def waits_through_hub() -> bool:
    """Whether gevent has patched ``select`` here, so that a socket wait goes through its hub.

    Decided at the first wait of each process, once gevent's workers have
    patched it, and forgotten in a forked child, which may run another worker class.
    """
    global _through_hub
    if _through_hub is None:
        _through_hub = gevent_patched("select")
    return _through_hub


def _forget() -> None:
    global _through_hub
    _through_hub = None


os.register_at_fork(after_in_child=_forget)
