"""TensorRT backend: the Backend protocol over the bundle's engines (``--backend tensorrt``).

NEVER RUN HERE (README "What has never run"): no machine of this project has TensorRT. The
TensorRT-specific part is what touches ``tensorrt``: deserialise the plans, select a profile, set
shapes and tensor addresses, enqueue. The rest is plain code over cuda_mem.py and the CPU-tested
logic of trt_engines.py (which engine may run here: stale and foreign ones are refused) and
trt_profiles.py (which profile serves q tokens).

Memory: one device allocation for the KV cache in the bundle's position-major layout
``[max_seq_len, layers, 2, kv_heads, head_dim]``, bound whole as ``kv_cache`` (the static-cache
graph masks unfilled rows); the new rows come out into a staging buffer and are copied into their
slots on the device (a replayed graph cannot write to a per-token address). Decode (q = 1): the
embedding row is gathered on the device from the table held there, the position is an 8-byte
upload, and the step is replayed from a CUDA graph; only the requested logits rows come back.
Prefill adds image features on the host (once per step) and uploads the embeddings.
"""

from __future__ import annotations

import numpy as np
from molmoact_edge.runtime.engine.bundle import Bundle, load_embeddings
from molmoact_edge.runtime.engine.config import ModelConfig
from molmoact_edge.runtime.engine.cuda_mem import CapturedGraph, DeviceBuffer, Stream
from molmoact_edge.runtime.engine.trt_engines import Device, EngineError, select_engines
from molmoact_edge.runtime.engine.trt_profiles import LLM_GRAPH, Profile, llm_profiles, profile_for


class TrtBackend:
    name = "tensorrt"

    def __init__(self, bundle: Bundle, config: ModelConfig, cuda_graph: bool = True):
        from molmoact_edge.runtime.engine.trt_build import current_device, import_tensorrt

        trt = import_tensorrt()
        self.device: Device = current_device(trt)
        chosen = select_engines(bundle.manifest, self.device, ("vision", LLM_GRAPH), bundle.path)
        logger = trt.Logger(trt.Logger.WARNING)
        rt = trt.Runtime(logger)
        self.engines = {g: rt.deserialize_cuda_engine(bundle.file(e["file"]).read_bytes()) for g, e in chosen.items()}
        if any(e is None for e in self.engines.values()):
            raise EngineError(f"TensorRT could not deserialise the engines of {bundle.path}; rebuild them with "
                              f"`molmoact-edge build --bundle {bundle.path}`")
        llm = chosen[LLM_GRAPH]
        self.max_seq_len, self.max_verify = int(llm["max_seq_len"]), int(llm["max_verify"])
        self.profiles: list[Profile] = llm_profiles(self.max_seq_len, self.max_verify)
        m = bundle.manifest
        self.spec = m.graphs[LLM_GRAPH]
        self.patch_id = config.image_patch_id
        self.dtype = np.dtype(m.kv_cache.dtype)
        self.hidden, self.vocab = m.model.hidden_size, m.model.vocab_size
        self.kv_row = int(np.prod(m.kv_cache.shape[1:])) * self.dtype.itemsize
        self.table = load_embeddings(bundle)  # host copy: prefill adds image features on the host
        self.row_bytes = self.hidden * self.table.dtype.itemsize
        self.stream = Stream()
        n = self.max_seq_len
        self.buf = {"table": DeviceBuffer(self.table.nbytes), "kv_cache": DeviceBuffer(n * self.kv_row),
                    "new_kv": DeviceBuffer(n * self.kv_row), "inputs_embeds": DeviceBuffer(n * self.row_bytes),
                    "position_ids": DeviceBuffer(n * 8), "logits_index": DeviceBuffer(n * 8),
                    "logits": DeviceBuffer(n * self.vocab * 4)}
        self.stream.h2d(self.buf["table"].ptr, self.table)
        self.stream.sync()
        self.contexts = []
        for i in range(len(self.profiles)):
            ctx = self.engines[LLM_GRAPH].create_execution_context()
            ctx.set_optimization_profile_async(i, self.stream.handle)
            for name, b in self.buf.items():
                if name != "table":
                    ctx.set_tensor_address(name, b.ptr)
            self.contexts.append(ctx)
        self.use_graph, self.graph = cuda_graph, None

    def vision(self, crops: np.ndarray, pooled_patches_idx: np.ndarray) -> np.ndarray:
        engine = self.engines["vision"]
        ctx = engine.create_execution_context()
        crops = np.ascontiguousarray(crops, dtype=np.float32)
        idx = np.ascontiguousarray(pooled_patches_idx, dtype=np.int64)
        out = np.empty((len(idx), self.hidden), dtype=np.float32)
        bufs = [DeviceBuffer(crops.nbytes), DeviceBuffer(idx.nbytes), DeviceBuffer(out.nbytes)]
        try:
            for (name, arr), b in zip((("crops", crops), ("pooled_patches_idx", idx)), bufs):
                ctx.set_input_shape(name, arr.shape)
                ctx.set_tensor_address(name, b.ptr)
                self.stream.h2d(b.ptr, arr)
            ctx.set_tensor_address("image_features", bufs[2].ptr)
            if not ctx.execute_async_v3(self.stream.handle):
                raise EngineError("TensorRT failed to run the vision engine")
            self.stream.d2h(out, bufs[2].ptr)
            self.stream.sync()
        finally:
            for b in bufs:
                b.free()
        return out[(pooled_patches_idx >= 0).any(axis=-1)]

    def reset(self, max_seq_len: int) -> None:
        if max_seq_len > self.max_seq_len:
            raise EngineError(f"this step needs {max_seq_len} KV rows but the engine was built for {self.max_seq_len}; "
                              "rebuild with `molmoact-edge build --max-seq-len N` or lower --max-new-tokens")
        # nothing to clear: the graph masks every row at or past the position

    def _run(self, p: int, q: int, rows: int) -> None:
        ctx = self.contexts[p]
        ctx.set_input_shape("inputs_embeds", (1, q, self.hidden))
        ctx.set_input_shape("position_ids", (q,))
        ctx.set_input_shape("kv_cache", (self.max_seq_len, *self.spec.tensor("kv_cache").shape[1:]))
        ctx.set_input_shape("logits_index", (rows,))
        if not ctx.execute_async_v3(self.stream.handle):
            raise EngineError(f"TensorRT failed to run the LLM engine (profile {self.profiles[p].name})")

    def forward(self, token_ids: np.ndarray, start_pos: int, image_features: np.ndarray | None = None,
                logits_rows: np.ndarray | None = None) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64)
        q = len(ids)
        if start_pos + q > self.max_seq_len:
            raise ValueError(f"positions up to {start_pos + q} exceed the engine's KV cache ({self.max_seq_len})")
        if ids.min() < 0 or ids.max() >= self.table.shape[0]:
            raise ValueError(f"token id out of range [0, {self.table.shape[0]})")
        rows = np.asarray([q - 1] if logits_rows is None else logits_rows, dtype=np.int64)
        p = profile_for(self.profiles, q)
        s, b = self.stream, self.buf
        if image_features is None:
            s.gather_rows(b["inputs_embeds"].ptr, b["table"].ptr, self.row_bytes, ids)
        else:
            embeds = np.asarray(self.table[ids], dtype=self.dtype)
            is_patch = ids == self.patch_id
            if int(is_patch.sum()) != len(image_features):
                raise ValueError(f"{int(is_patch.sum())} <im_patch> tokens but {len(image_features)} image features")
            embeds[is_patch] += image_features.astype(self.dtype)
            s.h2d(b["inputs_embeds"].ptr, embeds)
        positions = np.arange(start_pos, start_pos + q, dtype=np.int64)
        s.h2d(b["position_ids"].ptr, positions)
        s.h2d(b["logits_index"].ptr, rows)
        if q == 1 and len(rows) == 1 and self.use_graph:
            if self.graph is None:
                self._run(p, 1, 1)  # once eagerly: TensorRT allocates lazily on the first enqueue
                self.graph = CapturedGraph(s, lambda _s: self._run(p, 1, 1))
            self.graph.launch(s)
        else:
            self._run(p, q, len(rows))
        s.d2d(b["kv_cache"].at(start_pos * self.kv_row), b["new_kv"].ptr, q * self.kv_row)
        logits = np.empty((len(rows), self.vocab), dtype=np.float32)
        s.d2h(logits, b["logits"].ptr)
        s.sync()  # also keeps the uploaded host arrays alive until their copies ran
        return logits

    def close(self) -> None:
        if self.graph is not None:
            self.graph.destroy()
            self.graph = None
        for buf in self.buf.values():
            buf.free()
        self.contexts.clear()
        self.stream.destroy()
