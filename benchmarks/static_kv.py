"""CPU cost of the static-cache LLM graph: onnxruntime ms/token of ``llm`` (the filled prefix in,
``kv_input="prefix"``) vs ``llm_static`` (the whole buffer in, position masked in the graph,
``kv_input="full"``), interleaved round by round so that machine load hits both alike.

Each round: a prefill of ``--prompt`` random text ids (no image), then ``--tokens`` decode steps, in
a cache of ``--prompt + --max-new-tokens`` rows (what ``generate`` allocates). Only the decode
steps are timed. Both graphs bind the cache by pointer (no host copy); what differs is that the
static graph attends over every row of the buffer, filled or not.

    python -m molmoact_edge.benchmarks.static_kv --size bench --out static_kv.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def _bundle(size: str, work: Path) -> Path:
    from molmoact_edge.export.onnx_export import export_bundle
    from molmoact_edge.export.tiny import write_checkpoint

    ckpt = write_checkpoint(work / "ckpt", size, seed=0)
    return export_bundle(ckpt, work / "bundle", progress=lambda s: None, static_kv=True)


def _decode_ms(backend, ids: np.ndarray, tokens: int, max_seq_len: int) -> float:
    backend.reset(max_seq_len)
    logits = backend.forward(ids, 0)
    t0 = time.perf_counter()
    for i in range(tokens):
        logits = backend.forward(np.array([int(logits[-1].argmax())]), len(ids) + i)
    return (time.perf_counter() - t0) * 1e3 / tokens


def measure(bundle: Path, prompt: int = 220, tokens: int = 32, max_new_tokens: int = 256, rounds: int = 3,
            threads: int | None = None) -> dict:
    from molmoact_edge.runtime.engine.bundle import load_manifest
    from molmoact_edge.runtime.engine.config import ModelConfig
    from molmoact_edge.runtime.engine.ort_backend import OrtBackend

    b = load_manifest(bundle)
    cfg = ModelConfig.load(bundle)
    if tokens > max_new_tokens:
        raise ValueError(f"--tokens {tokens} exceeds --max-new-tokens {max_new_tokens}")
    backends = {kv: OrtBackend(b, cfg, threads=threads, kv_input=kv) for kv in ("prefix", "full")}
    ids = np.random.default_rng(0).integers(0, cfg.llm.vocab_size, prompt)
    ids[ids == cfg.image_patch_id] = 0
    per_round = {kv: [] for kv in backends}
    for _ in range(rounds):
        for kv, be in backends.items():
            per_round[kv].append(_decode_ms(be, ids, tokens, prompt + max_new_tokens))
    return {"bundle": str(bundle), "hidden": cfg.llm.hidden_size, "layers": cfg.llm.num_hidden_layers,
            "prompt": prompt, "decode_tokens": tokens, "max_seq_len": prompt + max_new_tokens, "rounds": rounds,
            "threads": threads, "machine": platform.processor() or platform.machine(),
            "ms_per_token": {kv: {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v)),
                                  "rounds": v} for kv, v in per_round.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="a bundle exported with --static-kv")
    src.add_argument("--size", choices=["tiny", "bench"], help="write a random checkpoint of this size and export it")
    p.add_argument("--prompt", type=int, default=220)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        bundle = a.bundle or _bundle(a.size, Path(work))
        r = measure(bundle, a.prompt, a.tokens, a.max_new_tokens, a.rounds, a.threads)
    text = json.dumps(r, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
