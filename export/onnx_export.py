"""Export a checkpoint to a bundle: ONNX graphs (vision, LLM with KV cache), the input embedding
table for a host-side lookup, the tokenizer and configs, and a manifest that describes and hashes
all of it (see runtime/engine/bundle.py for what the loader checks).

The graphs are exported with the torch.onnx dynamo exporter at opset 18: the portable baseline
(TensorRT 10.3 on JetPack 6 cannot parse opset-23 ``Attention``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from molmoact_edge.export.checkpoint import WeightFiles, load_model
from molmoact_edge.export.graphs import LlmGraph, StaticLlmGraph, VisionGraph
from molmoact_edge.export.interrupts import InterruptGuard
from molmoact_edge.export.model import MolmoAct
from molmoact_edge.runtime.engine.bundle import sha256_file
from molmoact_edge.runtime.engine.manifest import (
    LLM_GRAPHS,
    MANIFEST,
    EmbeddingsSpec,
    GraphSpec,
    KvCacheSpec,
    Manifest,
    ModelDims,
    TensorSpec,
)

COPIED_FILES = ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer.json",
                "tokenizer_config.json", "generation_config.json")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Graphs over this size keep their weights in a side file (protobuf cannot hold more than 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


class Progress:
    """Numbered stage lines with elapsed time on stderr: a 7B export takes minutes."""

    def __init__(self, total: int, out: Callable[[str], None] | None = None):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()
        self.out = out or (lambda s: print(s, file=sys.stderr, flush=True))

    def __call__(self, what: str) -> None:
        self.n += 1
        self.out(f"[{self.n}/{self.total}] {what} (t = {time.perf_counter() - self.t0:.1f} s)")


def _onnx_io(model_path: Path):
    import onnx
    from onnx import helper

    proto = onnx.load(str(model_path), load_external_data=False)

    def specs(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append(TensorSpec(v.name, np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name, tuple(dims)))
        return tuple(out)

    return specs(proto.graph.input), specs(proto.graph.output)


def _save(program, path: Path, n_bytes: int) -> None:
    program.save(str(path), external_data=n_bytes > EXTERNAL_DATA_BYTES)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_vision(model: MolmoAct, path: Path, opset: int) -> None:
    cfg = model.config
    crops = torch.randn(2, cfg.vit.image_num_pos, cfg.vit.patch_pixels)
    n_tok = 6
    idx = torch.randint(0, 2 * cfg.vit.image_num_pos, (n_tok, 4))
    idx[0, 3] = -1
    dims = {"crops": {0: torch.export.Dim("crops", min=1, max=64)},
            "pooled_patches_idx": {0: torch.export.Dim("tokens", min=1, max=16384)}}
    program = torch.onnx.export(VisionGraph(model).eval(), (crops, idx), dynamo=True,
                                opset_version=opset, input_names=["crops", "pooled_patches_idx"],
                                output_names=["image_features"], dynamic_shapes=dims, verbose=False)
    _save(program, path, _param_bytes(model.model.vision_backbone))


def export_llm(model: MolmoAct, path: Path, dtype: torch.dtype, opset: int) -> None:
    _export_llm_graph(LlmGraph(model), model, path, dtype, opset, cache_input="past_kv",
                      cache_dim=("past", 0), example_past=5, example_cache=5)


def export_llm_static(model: MolmoAct, path: Path, dtype: torch.dtype, opset: int) -> None:
    """The static-cache LLM graph (graphs.StaticLlmGraph): the cache input is the whole buffer, whose
    length (``max_seq_len``) is chosen once per session or engine, never per token."""
    _export_llm_graph(StaticLlmGraph(model), model, path, dtype, opset, cache_input="kv_cache",
                      cache_dim=("max_seq_len", 2), example_past=5, example_cache=11)


def _export_llm_graph(graph: torch.nn.Module, model: MolmoAct, path: Path, dtype: torch.dtype, opset: int,
                      cache_input: str, cache_dim: tuple[str, int], example_past: int, example_cache: int) -> None:
    """One LLM graph: 3 example query tokens at positions from `example_past`, a cache of
    `example_cache` rows; the query, the cache (`cache_dim`: name and minimum) and the logits rows
    are dynamic up to max_position_embeddings."""
    c = model.config.llm
    q = 3
    example = (torch.randn(1, q, c.hidden_size, dtype=dtype), torch.arange(example_past, example_past + q),
               torch.randn(example_cache, c.num_hidden_layers, 2, c.num_key_value_heads, c.head_dim, dtype=dtype),
               torch.tensor([q - 1]))
    n = c.max_position_embeddings
    tokens = torch.export.Dim("q", min=1, max=n)
    dims = {"inputs_embeds": {1: tokens}, "position_ids": {0: tokens},
            cache_input: {0: torch.export.Dim(cache_dim[0], min=cache_dim[1], max=n)},
            "logits_index": {0: torch.export.Dim("rows", min=1, max=n)}}
    program = torch.onnx.export(graph.eval(), example, dynamo=True, opset_version=opset,
                                input_names=["inputs_embeds", "position_ids", cache_input, "logits_index"],
                                output_names=["logits", "new_kv"], dynamic_shapes=dims, verbose=False)
    _save(program, path, _param_bytes(model) - _param_bytes(model.model.vision_backbone))


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs that torchvision's ops are not registered and that it renamed dynamic axes;
    neither concerns these graphs, and a wall of them hides the progress lines."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            yield
    finally:
        log.setLevel(level)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import onnx

    v = {"molmoact_edge": version("molmoact-edge"), "torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxscript

        v["onnxscript"] = onnxscript.__version__
    except (ImportError, AttributeError):
        pass
    return v


def export_bundle(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", opset: int = 18,
                  force: bool = False, progress: Callable[[str], None] | None = None,
                  static_kv: bool = False) -> Path:
    """Write a bundle directory; returns its path. Refuses to overwrite an existing bundle unless
    ``force``; the bundle appears atomically (written beside it, then renamed). ``static_kv`` adds
    ``llm_static.onnx`` (the GPU graph: whole cache in, position masked in the graph); it is opt-in
    because it holds a second copy of the LLM weights."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown bundle dtype {dtype!r}; accepted: {sorted(DTYPES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
    with InterruptGuard() as ctrl_c:
        return _export_bundle(checkpoint, out, dtype, opset, Progress(8 if static_kv else 7, progress), static_kv,
                              ctrl_c)


def _export_bundle(checkpoint: Path, out: Path, dtype: str, opset: int, progress: Progress, static_kv: bool,
                   ctrl_c: InterruptGuard) -> Path:
    def step(what: str) -> None:
        # torch's exporter can swallow a Ctrl-C (export/interrupts.py): every stage starts by asking.
        ctrl_c.check()
        progress(what)

    tdtype = DTYPES[dtype]
    step(f"loading {checkpoint} as {dtype}")
    model = load_model(checkpoint, tdtype)
    cfg = model.config
    out.parent.mkdir(parents=True, exist_ok=True)
    with ctrl_c.deferred():  # no Ctrl-C between creating the folder and the `try` that removes it
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
            step("exporting vision.onnx (ViT + pooling + projector)")
            export_vision(model, tmp / "vision.onnx", opset)
            step("exporting llm.onnx (prefill/decode/verify, KV in and out)")
            export_llm(model, tmp / "llm.onnx", tdtype, opset)
            if static_kv:
                step("exporting llm_static.onnx (whole KV cache + position in, for GPU engines)")
                export_llm_static(model, tmp / "llm_static.onnx", tdtype, opset)
        step("writing the input embedding table")
        wte = model.model.transformer.wte
        table = torch.cat([wte.embedding, wte.new_embedding]).detach()
        np.save(tmp / "embeddings.npy", table.numpy())
        for name in COPIED_FILES:
            if (checkpoint / name).exists():
                shutil.copyfile(checkpoint / name, tmp / name)
        raw_cfg = json.loads((checkpoint / "config.json").read_text())
        (tmp / "norm_stats.json").write_text(json.dumps(raw_cfg.get("norm_stats", {}), indent=2))
        step("hashing the source checkpoint")
        weight_files = sorted(set(WeightFiles.find(checkpoint).key_to_file.values()))
        source = {p.name: sha256_file(p) for p in weight_files + [checkpoint / "config.json"]}
        step("hashing bundle files and writing manifest.json")
        graphs = {}
        llm = cfg.llm
        for name in ("vision", "llm") + (("llm_static",) if static_kv else ()):
            inputs, outputs = _onnx_io(tmp / f"{name}.onnx")
            graphs[name] = GraphSpec(f"{name}.onnx", inputs, outputs)
        if static_kv:  # each LLM graph serves every q; the runtime picks by where it runs
            for name, kv_input in LLM_GRAPHS.items():
                graphs[name] = dataclasses.replace(graphs[name], kv_input=kv_input,
                                                   serves_q=(1, llm.max_position_embeddings))
        table_dtype = np.dtype(table.numpy().dtype).name
        manifest = Manifest(
            dtype=dtype,
            opset=opset,
            model=ModelDims(hidden_size=llm.hidden_size, layers=llm.num_hidden_layers, kv_heads=llm.num_key_value_heads,
                            head_dim=llm.head_dim, vocab_size=llm.vocab_size, input_vocab_size=llm.input_vocab_size,
                            image_patch_id=cfg.image_patch_id, max_position_embeddings=llm.max_position_embeddings),
            graphs=graphs,
            kv_cache=KvCacheSpec(dtype=table_dtype, shape=("positions", llm.num_hidden_layers, 2,
                                                           llm.num_key_value_heads, llm.head_dim)),
            embeddings=EmbeddingsSpec(file="embeddings.npy", dtype=table_dtype, shape=tuple(table.shape)),
            source_checkpoint={"path": str(checkpoint.resolve()), "sha256": source},
            tools=_versions(),
            # Every file of the bundle, recursively (graphs with external data write side files).
            files={p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        )
        text = json.dumps(manifest.to_json(), indent=2)
        Manifest.from_json(json.loads(text))  # the reader's own checks, before the bundle appears
        (tmp / MANIFEST).write_text(text)
        pin = hashlib.sha256(text.encode()).hexdigest()
        step(f"moving the bundle into place at {out} (manifest sha256 {pin}: pin it with --bundle-sha256)")
        # A Ctrl-C during the move is recorded, not raised: the bundle appears whole and the export
        # completes (a --force replacement never leaves the old bundle half deleted).
        with ctrl_c.deferred():
            if out.exists():
                shutil.rmtree(out)
            tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
            tmp.rename(out)
    except BaseException as e:
        with ctrl_c.deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        if ctrl_c.seen and not isinstance(e, KeyboardInterrupt):
            # The exporter turned the Ctrl-C into an error of its own (export/interrupts.py).
            raise KeyboardInterrupt from e
        raise
    return out
