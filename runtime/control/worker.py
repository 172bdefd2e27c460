"""Run a policy asynchronously, at most one request in flight, in a thread or a separate process.

The control loop submits an observation whenever the worker is idle and polls for the chunk every
tick; it never waits. The process mode exists because a policy whose inference holds the GIL (a
Python decode loop, tokenisation, grammar bookkeeping) would otherwise steal the executor's time
slices: benchmarks/executor_jitter.py measures both modes and README.md records the decision.

Errors never vanish: an exception inside `predict` or a worker process that dies is reported by
`error`, and the loop's watchdog stops the arm on it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np
from molmoact_edge.runtime.control.factory import build_policy
from molmoact_edge.runtime.control.policy import ActionChunk, Observation, PolicySpec

log = logging.getLogger(__name__)

MODES = ("thread", "process")


@dataclass(frozen=True)
class WorkerConfig:
    mode: str = "process"
    start_timeout_s: float = 60.0  # a process must import numpy and build its policy
    # Process mode only: lower the inference process's scheduling priority so that, on a machine
    # with fewer cores than busy threads, the kernel hands the executor its slice first.
    nice: int = 10

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"WorkerConfig.mode must be one of {MODES}, got {self.mode!r}")
        if not (0 <= self.nice <= 19):
            raise ValueError(f"WorkerConfig.nice must be in [0, 19], got {self.nice}")


class _PipeSender:
    """The child's end of the response pipe, with the queue-like `put` that `_serve` uses."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def put(self, item) -> None:
        self.conn.send(item)


def _serve(spec: PolicySpec, requests, responses, stop: Callable[[], bool], clock=time.monotonic,
           notify: Callable[[], None] = lambda: None) -> None:
    """The worker body, shared by both modes: build the policy, answer requests until told to stop."""
    put = responses.put

    class _Notifying:
        @staticmethod
        def put(item) -> None:
            put(item)
            notify()

    responses = _Notifying
    try:
        policy = build_policy(spec)
    except BaseException as e:
        responses.put(("error", f"building the policy failed: {type(e).__name__}: {e}", clock()))
        return
    responses.put(("ready", None, clock()))
    try:
        while not stop():
            try:
                obs = requests.get(timeout=0.05)
            except queue.Empty:
                continue
            if obs is None:
                break
            started = clock()
            try:
                actions = np.asarray(policy.predict(obs), dtype=np.float64)
            except BaseException:
                responses.put(("error", "policy.predict raised:\n" + traceback.format_exc(limit=6), clock()))
                return
            info = dict(getattr(policy, "step_info", None) or {})  # e.g. MolmoAct's decode counts, for the run log
            responses.put(("chunk", (actions, obs.timestamp, obs.index, obs.pose, policy.convention, started, info),
                           clock()))
    finally:
        policy.close()


PARENT_CHECK_S = 0.2  # how often the worker process looks for its parent
CLOSE_TIMEOUT_S = 3.5  # the most `InferenceWorker.close` takes, even with a hung policy


def _exit_when_orphaned(parent_pid: int) -> None:
    """Exit the worker process as soon as its parent is gone (SIGKILL, a crash): nobody would read
    its answers, and it would keep a core and the multiprocessing resource tracker alive forever.
    A thread, so that it fires even while predict() is busy or hung."""
    import os

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_S)
            if os.getppid() != parent_pid:  # re-parented: the parent died
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _process_main(spec, requests, conn, nice: int = 0, parent_pid: int | None = None) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when the worker stops (it stops
    # the arm first), and the worker follows a dead parent by itself.
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_pid is not None:
        _exit_when_orphaned(parent_pid)
    if nice:
        os.nice(nice)
    try:
        _serve(spec, requests, _PipeSender(conn), stop=lambda: False)
    except (BrokenPipeError, EOFError):
        pass  # the parent closed its end (it stopped the run): nobody is waiting for this answer


class InferenceWorker:
    def __init__(self, spec: PolicySpec, config: WorkerConfig = WorkerConfig(), clock=time.monotonic) -> None:
        self.spec = spec
        self.config = config
        self._clock = clock
        self._busy_since: float | None = None
        self._error: str | None = None
        self._error_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = None
        self._rx: threading.Thread | None = None
        self._ready: ActionChunk | None = None
        self.requests_sent = 0
        # Set whenever a response arrives or the worker dies, so that the control loop can react
        # between ticks instead of at the next one.
        self.news = threading.Event()

    # -- lifecycle
    def start(self) -> InferenceWorker:
        try:
            return self._start()
        except BaseException:
            # Ctrl-C or SIGTERM while the worker starts: `with` calls no __exit__ when __enter__ raises,
            # and a process left to the interpreter's exit is joined there without a timeout.
            self.close()
            raise

    def _start(self) -> InferenceWorker:
        if self.config.mode == "thread":
            self._requests: queue.Queue = queue.Queue(maxsize=1)
            self._responses: queue.Queue = queue.Queue()
            self._thread = threading.Thread(
                target=_serve, args=(self.spec, self._requests, self._responses, self._stop.is_set, self._clock,
                                     self.news.set),
                name="inference", daemon=True,
            )
            self._thread.start()
        else:
            # spawn, not fork: franky and librealsense run C++ threads that fork would copy mid-state.
            ctx = mp.get_context("spawn")
            self._requests = ctx.Queue(maxsize=1)
            self._responses = queue.Queue()
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_process_main,
                               args=(self.spec, self._requests, writer, self.config.nice, os.getpid()),
                               name="inference", daemon=True)
            proc.start()
            self._proc = proc  # only once started: close() joins it
            writer.close()
            self._rx = threading.Thread(target=self._receive, args=(reader, self._proc.sentinel),
                                        name="inference-rx", daemon=True)
            self._rx.start()
        kind, payload, t = self._get(self.config.start_timeout_s)
        self.news.clear()  # the "ready" message is no news for the control loop
        if kind != "ready":
            raise RuntimeError(payload if kind == "error" else f"inference worker did not start within {self.config.start_timeout_s:.0f} s")
        return self

    def _receive(self, reader, sentinel) -> None:
        """Process mode: move responses from the pipe into the local queue; notice the process dying."""
        from multiprocessing.connection import wait

        try:
            while not self._stop.is_set():
                ready = wait([reader, sentinel], timeout=0.2)
                if reader in ready:
                    try:
                        self._responses.put(reader.recv())
                    except (EOFError, OSError):
                        self.news.set()
                        return
                    self.news.set()
                elif sentinel in ready:
                    self.news.set()  # died without a word: `error` reports the exit code
                    return
        finally:
            reader.close()

    def close(self) -> None:
        """Stop and join; a worker stuck inside predict is abandoned (thread) or terminated (process)."""
        self._stop.set()
        if self._thread is not None:
            try:
                self._requests.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(timeout=1.0)
            if self._thread.is_alive():
                log.warning("inference thread is still inside predict(); abandoning it (daemon)")
            self._thread = None
        if self._proc is not None:
            try:
                self._requests.put_nowait(None)
            except Exception:
                pass
            # At most CLOSE_TIMEOUT_S in all: a polite second, then SIGTERM, then SIGKILL.
            self._proc.join(timeout=1.0)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=1.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=1.0)
            self._requests.cancel_join_thread()
            self._requests.close()
            if self._rx is not None:
                self._rx.join(timeout=0.5)  # it polls its stop flag every 0.2 s
                self._rx = None
            self._proc = None

    def __enter__(self) -> InferenceWorker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests
    @property
    def busy(self) -> bool:
        return self._busy_since is not None

    @property
    def busy_since(self) -> float | None:
        return self._busy_since

    @property
    def error(self) -> str | None:
        if self._error is None:
            self._drain()  # an error message may be waiting; read it before judging liveness
            if self._error is None and self._proc is not None and not self._proc.is_alive():
                if self._rx is not None:
                    self._rx.join(timeout=0.5)  # let the receiver hand over the process's last words
                self._drain()
                if self._error is None:
                    self._set_error(f"inference process died (exit code {self._proc.exitcode})", self._clock())
            elif self._error is None and self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
                self._drain()
                if self._error is None:
                    self._set_error("inference thread exited", self._clock())
        return self._error

    @property
    def error_at(self) -> float | None:
        return self._error_at

    def _set_error(self, message: str, at: float) -> None:
        if self._error is None:
            self._error, self._error_at = message, at
            log.error("inference worker: %s", message.splitlines()[0])

    def submit(self, obs: Observation) -> bool:
        """Queue one observation; False (and nothing queued) while a request is in flight or after an error."""
        if self.busy or self._error is not None:
            return False
        self._busy_since = self._clock()
        self._requests.put(obs)
        self.requests_sent += 1
        return True

    def poll(self) -> ActionChunk | None:
        """The finished chunk, if one arrived since the last poll; never blocks."""
        self._drain()
        chunk, self._ready = self._ready, None
        return chunk

    def _get(self, timeout: float):
        try:
            return self._responses.get(timeout=timeout)
        except queue.Empty:
            return ("timeout", None, self._clock())

    def _drain(self) -> None:
        """Move every waiting response into `_ready` (newest chunk) or `_error`."""
        while True:
            try:
                kind, payload, t = self._responses.get_nowait()
            except queue.Empty:
                return
            if kind == "error":
                self._busy_since = None
                self._set_error(payload, t)
            elif kind == "chunk":
                actions, obs_t, obs_i, anchor, convention, started, info = payload
                self._busy_since = None
                try:
                    self._ready = ActionChunk(actions, obs_t, obs_i, anchor, convention, finished_at=t,
                                              info={"inference_s": t - started, **info})
                except ValueError as e:
                    self._set_error(f"policy returned a malformed chunk: {e}", t)
