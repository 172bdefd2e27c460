"""onnxruntime backend: the bundle's graphs with a preallocated, in-place KV cache.

The KV cache is one host buffer ``[max_positions, layers, 2, kv_heads, head_dim]``. Because it is
position-major, the filled prefix (the graph's ``past_kv`` input) and the rows of the new tokens
(its ``new_kv`` output) are contiguous slices of that buffer, bound with IO binding by pointer: the
graph reads the past where it lies and writes the new keys/values straight into their slots.
Nothing grows, and nothing is concatenated or copied on the host per token. The input embedding
lookup is a host-side gather from the table (in memory when the bundle's hashes were verified, so
that the bytes used are the bytes hashed; memory-mapped otherwise).

``kv_input="full"`` runs the bundle's static-cache graph (``llm_static``, export --static-kv)
instead: the whole buffer is bound as ``kv_cache`` (by pointer, no copy) and the graph masks the
unfilled rows from the position. Its shapes do not change per token, which is what a GPU needs; on
the CPU it attends over every row of the buffer, so the CPU path keeps the default "prefix" graph
(benchmarks/static_kv.py measures both).
"""

from __future__ import annotations

import os
import time

import numpy as np
from molmoact_edge.runtime.engine.bundle import Bundle, BundleError, check_signature, load_embeddings
from molmoact_edge.runtime.engine.config import ConfigError, ModelConfig
from molmoact_edge.runtime.engine.deps import BackendUnavailable, import_backend
from molmoact_edge.runtime.engine.manifest import LLM_GRAPHS

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(bfloat16)": "bfloat16", "tensor(int32)": "int32"}


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every platform reports it
        return None


def _check_kv_size(positions: int, max_positions: int, row: tuple, dtype: np.dtype) -> None:
    """Refuse a KV cache the model has no positions for, or that this machine could never hold,
    before allocating it (a corrupt config would otherwise end in a terabyte allocation)."""
    if not isinstance(positions, (int, np.integer)) or positions < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {positions!r}")
    if positions > max_positions:
        raise ConfigError(f"prompt + max_new_tokens need {positions} positions, more than the model's "
                          f"max_position_embeddings ({max_positions}, config.json llm_config); shorten the "
                          "instruction or lower --max-new-tokens")
    need = int(positions) * int(np.prod(row, dtype=np.int64)) * dtype.itemsize
    have = _physical_memory()
    if have is not None and need > have:
        raise ConfigError(f"the KV cache for {positions} positions ({list(row)} {dtype} per position) would take "
                          f"{need / 2**30:.1f} GiB, more than this machine's {have / 2**30:.1f} GiB of memory; "
                          "lower --max-new-tokens, or check num_hidden_layers / num_key_value_heads / head_dim "
                          "in the bundle's config.json")


# --providers -> onnxruntime execution providers, in priority order (CPU last, for ops a GPU provider lacks)
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


def resolve_providers(kind: str, available: list[str]) -> list[str]:
    """The providers for ``--providers kind``, refusing one this onnxruntime build lacks (the CPU-only
    wheel has no CUDA or TensorRT provider: that is the onnxruntime-gpu wheel)."""
    if kind not in PROVIDERS:
        raise ValueError(f"unknown --providers {kind!r}; accepted: {sorted(PROVIDERS)}")
    wanted = PROVIDERS[kind]
    if wanted[0] not in available:
        raise BackendUnavailable(f"--providers {kind} needs onnxruntime's {wanted[0]}, which this onnxruntime does not "
                                 f"have (it has {available}): pip uninstall onnxruntime && pip install onnxruntime-gpu "
                                 "(on a Jetson: the onnxruntime-gpu wheel for your JetPack)")
    return wanted


def _io(items):
    return [(x.name, _ORT_TYPES.get(x.type, x.type), tuple(x.shape)) for x in items]


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, config: ModelConfig, providers: list[str] | str | None = None,
                 threads: int | None = None, kv_input: str | None = None):
        """``providers``: a --providers name ("cpu", "cuda", "tensorrt") or onnxruntime's provider list.
        On a GPU provider the KV cache lives in device memory (bound by address like the host one) and
        the static-cache graph is used when the bundle has it. NEVER RUN HERE on a GPU (no
        onnxruntime-gpu on our machines): README "What has never run"."""
        ort = import_backend("onnxruntime", "onnxruntime")  # onnxruntime-gpu provides it too
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if isinstance(providers, str):
            providers = resolve_providers(providers, ort.get_available_providers())
        providers = providers or ["CPUExecutionProvider"]
        self.on_gpu = providers[0] != "CPUExecutionProvider"
        if kv_input is None:
            kv_input = "full" if self.on_gpu and "llm_static" in bundle.manifest.graphs else "prefix"
        self._ort = ort
        self.embeddings = load_embeddings(bundle)  # first: its hash check is cheaper than loading the graphs
        self.sessions = {}
        if kv_input not in LLM_GRAPHS.values():
            raise ValueError(f"kv_input must be one of {sorted(LLM_GRAPHS.values())}, got {kv_input!r}")
        self.llm_graph = next(g for g, kv in LLM_GRAPHS.items() if kv == kv_input)
        if self.llm_graph not in bundle.manifest.graphs:
            raise BundleError(f"{bundle.path} has no {self.llm_graph!r} graph (the static-cache LLM graph); "
                              "re-export it with `molmoact-edge export --static-kv ...`")
        for name in ("vision", self.llm_graph):
            spec = bundle.manifest.graphs[name]
            try:
                sess = ort.InferenceSession(str(bundle.file(spec.file)), opts, providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types for unloadable graphs
                raise BundleError(f"{bundle.file(spec.file)} could not be loaded by onnxruntime ({e}); "
                                  "re-export the bundle") from e
            check_signature(name, spec, _io(sess.get_inputs()), _io(sess.get_outputs()), bundle.path)
            self.sessions["llm" if name == self.llm_graph else name] = sess
        self.kv_dtype = np.dtype(bundle.manifest.kv_cache.dtype)
        self.embed_dtype = np.dtype(bundle.manifest.graphs[self.llm_graph].tensor("inputs_embeds").dtype)
        self.patch_id = config.image_patch_id
        self.kv_row = tuple(bundle.manifest.kv_cache.shape[1:])
        self.max_positions = config.llm.max_position_embeddings
        self.kv: np.ndarray | None = None
        self.kv_device = None  # the cache as an onnxruntime OrtValue in GPU memory (GPU providers)
        self.reset_stats()

    def vision(self, crops: np.ndarray, pooled_patches_idx: np.ndarray) -> np.ndarray:
        feats = self.sessions["vision"].run(["image_features"], {
            "crops": np.ascontiguousarray(crops, dtype=np.float32),
            "pooled_patches_idx": np.ascontiguousarray(pooled_patches_idx, dtype=np.int64)})[0]
        # Groups with no valid patch get no token (as in the official connector); done here because
        # a data-dependent output shape is awkward for graph compilers.
        return feats[(pooled_patches_idx >= 0).any(axis=-1)]

    def reset(self, max_seq_len: int) -> None:
        if self.kv is None or self.kv.shape[0] < max_seq_len:
            _check_kv_size(max_seq_len, self.max_positions, self.kv_row, self.kv_dtype)
            self.kv = np.zeros((max_seq_len, *self.kv_row), dtype=self.kv_dtype)
            if self.on_gpu:  # one device allocation, zeroed from the host buffer once
                self.kv_device = self._ort.OrtValue.ortvalue_from_numpy(self.kv, "cuda", 0)

    def forward(self, token_ids: np.ndarray, start_pos: int, image_features: np.ndarray | None = None,
                logits_rows: np.ndarray | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        ids = np.asarray(token_ids, dtype=np.int64)
        q = len(ids)
        if self.kv is None or start_pos + q > self.kv.shape[0]:
            raise ValueError(f"positions up to {start_pos + q} exceed the KV cache "
                             f"({0 if self.kv is None else self.kv.shape[0]}); call reset(max_seq_len) first")
        if ids.min() < 0 or ids.max() >= self.embeddings.shape[0]:
            raise ValueError(f"token id out of range [0, {self.embeddings.shape[0]})")
        embeds = np.asarray(self.embeddings[ids], dtype=self.embed_dtype)
        if image_features is not None:
            is_patch = ids == self.patch_id
            if int(is_patch.sum()) != len(image_features):
                raise ValueError(f"{int(is_patch.sum())} <im_patch> tokens but {len(image_features)} image features")
            embeds[is_patch] += image_features.astype(self.embed_dtype)
        rows = np.asarray([q - 1] if logits_rows is None else logits_rows, dtype=np.int64)

        sess = self.sessions["llm"]
        binding = sess.io_binding()
        binding.bind_cpu_input("inputs_embeds", embeds[None])
        binding.bind_cpu_input("position_ids", np.arange(start_pos, start_pos + q, dtype=np.int64))
        binding.bind_cpu_input("logits_index", rows)
        # the static graph reads the whole buffer (the position masks it), the other the filled prefix
        past = self.kv if self.llm_graph == "llm_static" else self.kv[:start_pos]
        new = self.kv[start_pos:start_pos + q]
        where, base = ("cuda", self.kv_device.data_ptr()) if self.on_gpu else ("cpu", self.kv.ctypes.data)
        row = int(np.prod(self.kv_row)) * self.kv_dtype.itemsize
        binding.bind_input("kv_cache" if self.llm_graph == "llm_static" else "past_kv", where, 0, self.kv_dtype,
                           past.shape, base)
        # get_outputs() lists outputs in the order they were bound: logits first (copied to the host).
        binding.bind_output("logits", "cpu")
        binding.bind_output("new_kv", where, 0, self.kv_dtype, new.shape, base + start_pos * row)
        t1 = time.perf_counter()
        sess.run_with_iobinding(binding)
        t2 = time.perf_counter()
        logits = binding.get_outputs()[0].numpy()
        t3 = time.perf_counter()
        kind = "decode" if q == 1 else "multi"
        self.stats[f"{kind}_calls"] += 1
        self.stats[f"{kind}_host_ms"] += ((t1 - t0) + (t3 - t2)) * 1e3
        self.stats[f"{kind}_run_ms"] += (t2 - t1) * 1e3
        return logits

    def reset_stats(self) -> None:
        """Host time (embedding gather, binding, logits fetch) and graph time, split by one-token
        decode calls and multi-token (prefill / forced span) calls."""
        self.stats = {f"{k}_{m}": 0.0 if m != "calls" else 0 for k in ("decode", "multi")
                      for m in ("calls", "host_ms", "run_ms")}

    def close(self) -> None:
        self.sessions.clear()
        self.kv = self.kv_device = None
