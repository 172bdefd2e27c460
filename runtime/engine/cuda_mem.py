"""Device memory, streams, copies and CUDA-graph capture over cuda-python (NVIDIA's maintained
binding of the CUDA runtime API; README "GPU: why cuda-python"). No torch, no cupy, no native code.

What the TensorRT backend needs from CUDA, kept out of the TensorRT adapter so that it can be
tested without TensorRT on any CUDA machine: one allocation per buffer (the KV cache is one), host
<-> device and device -> device copies on a stream, the embedding gather as device-to-device row
copies from a table held on the device, and stream capture of a decode step into a CUDA graph that
is replayed per token. NEVER RUN HERE (no GPU in this project's sessions so far; README "What has
never run").
"""

from __future__ import annotations

import numpy as np
from molmoact_edge.runtime.engine.deps import import_backend


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call and CUDA's error."""


_RT = None


def runtime():
    """The CUDA runtime module of cuda-python (``cuda.bindings.runtime`` from 12.6 on, ``cuda.cudart``
    before), imported on first use."""
    global _RT
    if _RT is None:
        try:
            _RT = import_backend("cuda.bindings.runtime", "cuda-python", extra="tensorrt")
        except ImportError:
            _RT = import_backend("cuda.cudart", "cuda-python", extra="tensorrt")
    return _RT


def call(name: str, *args):
    """``cudaX(*args)``: raises CudaError unless it succeeded; returns its value(s) after the error code."""
    rt = runtime()
    err, *out = getattr(rt, name)(*args)
    if err != rt.cudaError_t.cudaSuccess:
        raise CudaError(f"{name} failed: {err!r}")
    return out[0] if len(out) == 1 else (tuple(out) if out else None)


def device_properties(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor")."""
    props = call("cudaGetDeviceProperties", device)
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), f"{props.major}.{props.minor}"


class DeviceBuffer:
    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(call("cudaMalloc", max(self.nbytes, 1)))

    def at(self, offset: int) -> int:
        if not 0 <= offset <= self.nbytes:
            raise ValueError(f"offset {offset} outside a buffer of {self.nbytes} bytes")
        return self.ptr + offset

    def free(self) -> None:
        if self.ptr:
            call("cudaFree", self.ptr)
            self.ptr = 0


class Stream:
    def __init__(self):
        self.handle = call("cudaStreamCreate")

    def sync(self) -> None:
        call("cudaStreamSynchronize", self.handle)

    def h2d(self, dst: int, src: np.ndarray) -> None:
        """The caller keeps ``src`` alive until the stream has run the copy (sync)."""
        src = np.ascontiguousarray(src)
        call("cudaMemcpyAsync", dst, src.ctypes.data, src.nbytes, runtime().cudaMemcpyKind.cudaMemcpyHostToDevice,
             self.handle)

    def d2h(self, dst: np.ndarray, src: int) -> None:
        if not dst.flags.c_contiguous:
            raise ValueError("d2h needs a contiguous destination")
        call("cudaMemcpyAsync", dst.ctypes.data, src, dst.nbytes, runtime().cudaMemcpyKind.cudaMemcpyDeviceToHost,
             self.handle)

    def d2d(self, dst: int, src: int, nbytes: int) -> None:
        call("cudaMemcpyAsync", dst, src, nbytes, runtime().cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.handle)

    def gather_rows(self, dst: int, table: int, row_bytes: int, ids: np.ndarray) -> None:
        """dst[i] = table[ids[i]] for each id, on the device: one small copy per row (a decode step is
        one row), so the table never crosses the bus."""
        for i, t in enumerate(np.asarray(ids, dtype=np.int64)):
            self.d2d(dst + i * row_bytes, table + int(t) * row_bytes, row_bytes)

    def destroy(self) -> None:
        if self.handle is not None:
            call("cudaStreamDestroy", self.handle)
            self.handle = None


class CapturedGraph:
    """Whatever ``enqueue(stream)`` puts on the stream, captured once and replayed with :meth:`launch`.
    Replay reuses the captured pointers and shapes, so everything per-token lives in fixed buffers
    that the host rewrites before each launch."""

    def __init__(self, stream: Stream, enqueue):
        rt = runtime()
        call("cudaStreamBeginCapture", stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        try:
            enqueue(stream)
        finally:
            graph = call("cudaStreamEndCapture", stream.handle)
        self.graph = graph
        self.exec = call("cudaGraphInstantiate", graph, 0)

    def launch(self, stream: Stream) -> None:
        call("cudaGraphLaunch", self.exec, stream.handle)

    def destroy(self) -> None:
        call("cudaGraphExecDestroy", self.exec)
        call("cudaGraphDestroy", self.graph)
