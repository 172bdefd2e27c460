"""One MolmoAct step on a GPU through the torch reference: vision, prefill, decode ms/token (eager
and replayed from a CUDA graph), the bandwidth it reaches against the floor, and transformers'
eager Qwen2 ``generate`` on the same weights.

The model is built at the 7B shape (MolmoAct-7B-D: SigLIP2-So400m ViT, Qwen2.5-7B LLM) with random
weights directly on the device, in bf16: no 15 GB checkpoint on disk, and the timing of a
bandwidth-bound decode does not depend on the weights' values. ``--size tiny`` runs the same code
on the CPU in seconds (CI runs it so).

Decode streams the LLM's weights (and the KV cache) once per token, so its floor is
bytes_per_token / memory bandwidth; the report gives both and the fraction reached.

    python -m molmoact_edge.benchmarks.gpu_step --device cuda --out gpu_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from molmoact_edge.benchmarks.decode_loop import (
    copy_bandwidth_gbs,
    copy_llm_weights,
    decode_bytes_per_token,
    qwen2_config,
)
from molmoact_edge.export.model import MolmoAct
from molmoact_edge.export.tiny import TinySize, config_dict
from molmoact_edge.export.torch_backend import StaticDecode
from molmoact_edge.runtime.engine.config import ModelConfig

SIZES = {
    "7b": TinySize(vit_hidden=1152, vit_heads=16, vit_mlp=4304, vit_layers=27, adapter_heads=16,
                   projector_hidden=18944, llm_hidden=3584, llm_heads=28, llm_kv_heads=4, llm_mlp=18944,
                   llm_layers=28),
    "tiny": TinySize(),
}
# Peak memory bandwidth by device name (vendor figures, GB/s); others: --bandwidth-gbs or measured copy.
BANDWIDTH_GBS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "A100-SXM4-80GB": 2039.0, "Orin": 204.8}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device, fn, repeats: int = 3) -> tuple[float, object]:
    """Median ms of ``fn()`` over ``repeats`` runs (after one warm-up), and its last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), out


@torch.no_grad()
def random_model(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> MolmoAct:
    """MolmoAct at ``size`` with random weights of sensible scale, created on ``device``."""
    cfg = ModelConfig.from_dict(config_dict(SIZES[size]))
    torch.manual_seed(seed)
    with torch.device(device):
        model = MolmoAct(cfg).to(dtype).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.fill_(0.02)
        elif "norm" in name or name.endswith("ln_f.weight"):
            p.fill_(1.0)
        elif "wte" in name or "positional_embedding" in name:
            p.normal_(0.0, 0.5)
        else:
            p.normal_(0.0, p.shape[-1] ** -0.5)
    return model


@torch.no_grad()
def qwen2_on_device(model: MolmoAct):
    """transformers' Qwen2ForCausalLM holding the same LLM weights, built on the model's device."""
    from transformers import Qwen2ForCausalLM

    w0 = model.lm_head.weight
    cfg = qwen2_config(model, attn_implementation="eager")
    default = torch.get_default_dtype()
    torch.set_default_dtype(w0.dtype)  # no fp32 copy of 7B parameters on the way
    try:
        with torch.device(w0.device):
            hf = Qwen2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    copy_llm_weights(model, hf)
    return hf


def _decode(model, static: StaticDecode | None, first: int, start: int, n: int) -> list[int]:
    """Greedy ids from ``first`` at ``start``: through ``static`` (captured or eager), or model.forward."""
    out, tok = [], first
    for i in range(n):
        out.append(tok)
        if static is not None:
            logits = static(tok, start + i)
        else:
            x = model.embed(torch.tensor([[tok]], device=model.lm_head.weight.device))
            logits = model(x, start + i)
        tok = int(logits[-1].argmax())
    return out


@torch.inference_mode()
def run(size: str = "7b", device: str = "cuda", dtype: str = "bf16", prompt: int = 806, new_tokens: int = 220,
        crops: int = 5, image_tokens: int = 725, with_hf: bool = True, bandwidth_gbs: float | None = None,
        say=print) -> dict:
    dev = torch.device(device)
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    t0 = time.perf_counter()
    model = random_model(size, dev, tdtype)
    _sync(dev)
    say(f"built the {size} model on {dev} in {time.perf_counter() - t0:.1f} s")
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(1)
    pix = torch.randn(crops, cfg.vit.image_num_pos, cfg.vit.patch_pixels, generator=g).to(dev)
    idx = torch.randint(0, crops * cfg.vit.image_num_pos, (image_tokens, 4), generator=g).to(dev)
    vision_ms, feats = _timed(dev, lambda: model.image_features(pix, idx))
    ids = torch.randint(0, 150000, (1, prompt), generator=g)
    ids[0, :image_tokens] = cfg.image_patch_id
    ids = ids.to(dev)
    embeds = model.embed(ids, feats)
    model.setup_cache(prompt + new_tokens + 1)
    prefill_ms, logits = _timed(dev, lambda: model(embeds, 0))
    first = int(logits[-1].argmax())
    say(f"vision {vision_ms:.1f} ms, prefill {prefill_ms:.1f} ms ({prompt} tokens)")

    rows = {}
    for name, static, capture in (("reference eager", None, False), ("static cache eager", True, False),
                                  ("static cache + CUDA graph", True, True)):
        if capture and dev.type != "cuda":
            continue
        step = StaticDecode(model) if static else None
        if capture:
            step.ids.fill_(first)
            step.pos.fill_(prompt)
            step.capture()
        _sync(dev)
        t = time.perf_counter()
        got = _decode(model, step, first, prompt, new_tokens)
        _sync(dev)
        rows[name] = {"ms_per_token": (time.perf_counter() - t) * 1e3 / new_tokens, "ids": got}
        say(f"{name}: {rows[name]['ms_per_token']:.2f} ms/token")
    ref_ids = rows["reference eager"]["ids"]
    if with_hf:
        hf = qwen2_on_device(model)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=dev)
        common = dict(inputs_embeds=embeds.to(tdtype), attention_mask=mask, do_sample=False, num_beams=1,
                      pad_token_id=0)
        stamps = []

        def stamp(input_ids, scores):  # called once per generated token, after that token's forward
            _sync(dev)
            stamps.append(time.perf_counter())
            return scores

        hf.generate(**common, max_new_tokens=2, min_new_tokens=2)  # warm-up
        _sync(dev)
        t = time.perf_counter()
        out = hf.generate(**common, max_new_tokens=new_tokens, min_new_tokens=new_tokens, logits_processor=[stamp])
        # prefill = up to the first token's logits; ms/token = the forwards after it
        rows["transformers Qwen2 eager generate"] = {
            "ms_per_token": (stamps[-1] - stamps[0]) * 1e3 / max(len(stamps) - 1, 1), "prefill_ms": (stamps[0] - t) * 1e3,
            "ids": out[0, -new_tokens:].tolist()}
        say(f"transformers eager: {rows['transformers Qwen2 eager generate']['ms_per_token']:.2f} ms/token")
        del hf
    weight_bytes = decode_bytes_per_token(model)
    kv_bytes = (prompt + new_tokens + 1) * cfg.llm.num_hidden_layers * 2 * cfg.llm.kv_dim * model.k_cache.element_size()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    if bandwidth_gbs is None:
        bandwidth_gbs = next((v for k, v in BANDWIDTH_GBS.items() if k in name), None)
        source = "vendor peak" if bandwidth_gbs else "measured host copy"
        bandwidth_gbs = bandwidth_gbs or copy_bandwidth_gbs()
    else:
        source = "given"
    floor_ms = (weight_bytes + kv_bytes) / (bandwidth_gbs * 1e9) * 1e3
    for r in rows.values():
        r["gb_per_s"] = (weight_bytes + kv_bytes) / (r["ms_per_token"] / 1e3) / 1e9
        r["of_floor"] = floor_ms / r["ms_per_token"]
        r["ids_match_reference"] = sum(1 for _ in zip(r.pop("ids"), ref_ids) if _[0] == _[1])
    return {"date": time.strftime("%Y-%m-%d"), "device": name, "size": size, "dtype": dtype, "prompt": prompt,
            "new_tokens": new_tokens, "crops": crops, "vision_ms": vision_ms, "prefill_ms": prefill_ms,
            "decode_bytes_per_token": weight_bytes + kv_bytes, "bandwidth_gbs": bandwidth_gbs,
            "bandwidth_source": source, "floor_ms_per_token": floor_ms, "decode": rows,
            "torch": torch.__version__}


def table(r: dict) -> str:
    lines = [f"{r['date']}, {r['device']}, {r['size']} {r['dtype']}, prompt {r['prompt']}, {r['new_tokens']} new tokens: "
             f"vision {r['vision_ms']:.1f} ms, prefill {r['prefill_ms']:.1f} ms, floor {r['floor_ms_per_token']:.2f} "
             f"ms/token ({r['decode_bytes_per_token'] / 1e9:.2f} GB at {r['bandwidth_gbs']:.0f} GB/s, "
             f"{r['bandwidth_source']})", "", "| decode | ms/token | GB/s | of floor | ids = reference |",
             "|---|---|---|---|---|"]
    for k, v in r["decode"].items():
        lines.append(f"| {k} | {v['ms_per_token']:.2f} | {v['gb_per_s']:.0f} | {v['of_floor']:.0%} | "
                     f"{v['ids_match_reference']}/{r['new_tokens']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--prompt", type=int, default=806, help="prompt tokens (806: one 640x480 view, 725 image tokens)")
    p.add_argument("--image-tokens", type=int, default=725)
    p.add_argument("--crops", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=220)
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers' generate")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth for the floor")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.image_tokens >= a.prompt:
        p.error("--image-tokens must be smaller than --prompt")
    r = run(a.size, a.device, a.dtype, a.prompt, a.new_tokens, a.crops, a.image_tokens, not a.skip_hf,
            a.bandwidth_gbs)
    if a.out:
        a.out.write_text(json.dumps(r, indent=2) + "\n")
    print(table(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
