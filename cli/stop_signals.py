"""How `molmoact-edge run` ends on Ctrl-C and SIGTERM: one stop path, and an exit with a deadline.

SIGINT (Ctrl-C) and SIGTERM (`kill`, systemd, `docker stop`) both raise KeyboardInterrupt in the main
thread, which the control loop turns into a stop of the arm (runtime/control/loop.py). The first one
also starts the exit deadline; later ones are only counted, so that they cannot cut the stop and
the cleanup short (each close is bounded by itself: worker 3.5 s, camera 2 s, arm 3 s, franky-sim 2 s).

The deadline is the guarantee that does not depend on any of those bounds holding: faulthandler's
watchdog, a C thread that needs no GIL, prints every thread's stack and ends the process with status 1
if the cleanup is still running `EXIT_DEADLINE_S` after it started (a driver blocking in C code, a
join that never returns). By then the stop was sent long ago: it is the first thing the loop does on
an interrupt. The children end by themselves when this process is gone (the inference worker watches
its parent, franky-sim gets SIGKILL from the kernel, the multiprocessing resource tracker sees EOF).
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading

# Longer than the bounded cleanup (about 11 s if every close used its whole budget; under 4 s measured
# beside CPU hogs), shorter than systemd's 90 s before it sends SIGKILL.
EXIT_DEADLINE_S = 15.0


class StopSignals:
    """`with StopSignals() as stops:` around a run; `stops.arm_deadline()` when its cleanup begins."""

    def __init__(self, deadline_s: float | None = None) -> None:
        self.deadline_s = EXIT_DEADLINE_S if deadline_s is None else deadline_s
        self.received: list[int] = []
        self._previous: dict[int, object] = {}
        self._mask: set | None = None
        self._armed = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may install handlers; the caller keeps its own
        # A crash of a process that drives an arm must say where: on SIGSEGV (seen once, after a SIGTERM
        # stop beside CPU hogs, not yet explained) Python prints every thread's stack. Left enabled
        # after the run: a crash while the interpreter shuts down is reported too.
        if not faulthandler.is_enabled():
            faulthandler.enable(file=sys.__stderr__ or sys.stderr)
        self._install(signal.SIGTERM)
        # Ctrl-C: only where Python's own handler is in place. A run started with SIGINT ignored (a
        # background job of a non-interactive shell) keeps ignoring it, as every Unix program does.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._install(signal.SIGINT)
        # A blocked signal is never delivered, and a blocked mask is inherited from whatever started
        # this process (it is no user's choice, unlike SIG_IGN): `kill` must reach the handlers.
        self._mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, list(self._previous))
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            self._mask = None
        self._previous.clear()
        self.cancel_deadline()

    def _install(self, signum: int) -> None:
        self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received.append(signum)
        if len(self.received) > 1:
            return  # the stop is under way; the deadline bounds it
        self.arm_deadline()
        raise KeyboardInterrupt("SIGTERM" if signum == signal.SIGTERM else "")

    def arm_deadline(self) -> None:
        """From now on the process ends within `deadline_s`, one way or the other."""
        if self._armed:
            return
        self._armed = True
        faulthandler.dump_traceback_later(self.deadline_s, exit=True, file=sys.__stderr__ or sys.stderr)

    def cancel_deadline(self) -> None:
        if self._armed:
            faulthandler.cancel_dump_traceback_later()
            self._armed = False
