"""Ctrl-C during long torch work (an export): never lost, never half-applied.

Python turns SIGINT into a KeyboardInterrupt at whatever bytecode runs next, and torch's ONNX
exporter does not always let it through. Measured with torch 2.13: a Ctrl-C that lands while the
exporter lazily imports `torch._dynamo` leaves that package half-initialised; the exporter's
`except torch._dynamo.exc.UserError` clause then re-imports it, fails with an AttributeError that
replaces the KeyboardInterrupt, counts that as a failed capture strategy and tries its fallback
strategy. The export then ended in an unrelated `TorchExportError` with a traceback (seen); had the
fallback succeeded, it would have run on and written the bundle (the exporter's code allows it).

`InterruptGuard` records every SIGINT as well as raising it, so that the caller can check at each
stage boundary (and when the exporter returns or fails) whether one arrived and was swallowed.
Inside `deferred()` (committing the result, cleaning up) a SIGINT is only recorded: a folder is
either moved into place whole or removed whole.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class InterruptGuard:
    """`with InterruptGuard() as ctrl_c: ...; ctrl_c.check(); ...`.

    Only where Python's own SIGINT handler (or another callable one) is installed: a process started
    with SIGINT ignored (a background job of a non-interactive shell) keeps ignoring it, as every
    Unix program does, and a thread other than the main one cannot install handlers."""

    def __init__(self) -> None:
        self.seen = 0  # SIGINTs received while the guard was active
        self._raising = True
        self._previous = None
        self._installed = False

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous):  # SIG_IGN (respected) or SIG_DFL (the process just dies)
            return self
        self._previous = previous
        signal.signal(signal.SIGINT, self._handle)
        self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum, frame) -> None:
        self.seen += 1
        if self._raising:
            # The previous handler decides what a Ctrl-C raises (Python's raises KeyboardInterrupt).
            self._previous(signum, frame)

    def check(self) -> None:
        """Raise KeyboardInterrupt if a Ctrl-C arrived, whatever became of the one the handler raised."""
        if self.seen:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        """Record, but do not raise, a Ctrl-C inside the block (it must run to its end)."""
        raising, self._raising = self._raising, False
        try:
            yield
        finally:
            self._raising = raising
