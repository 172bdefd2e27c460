"""One full MolmoAct step on a mid-size random model, three ways, measured in one run:

* our decode loop over the onnxruntime bundle (the deployed path),
* the same loop over the torch reference,
* Hugging Face transformers' own ``Qwen2ForCausalLM.generate`` with the same LLM weights and the
  same prompt embeddings (the architecture the official path runs).

Reported: ms per stage (preprocess, vision, prefill, decode), ms per token, tokens/s, the ratios,
the onnxruntime backend's host overhead per token, the memory bandwidth the decode achieves
against the machine's measured copy bandwidth (the floor for a bandwidth-bound decode), and the
sequential LLM forwards per emitted token with and without grammar-forced spans.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from molmoact_edge.export.checkpoint import load_model
from molmoact_edge.export.model import MolmoAct
from molmoact_edge.export.onnx_export import export_bundle
from molmoact_edge.export.tiny import synthetic_scene, write_checkpoint
from molmoact_edge.export.torch_backend import TorchBackend
from molmoact_edge.runtime.engine.generate import generate
from molmoact_edge.runtime.engine.pipeline import ModelSpec, open_bundle

INSTRUCTION = "put the red block in the blue bowl"
NEVER = -1  # an EOS id that never matches: every engine emits exactly the requested tokens


def scene_256() -> np.ndarray:
    return synthetic_scene(256, 256)


def qwen2_config(model: MolmoAct, **extra):
    """transformers' Qwen2Config of our LLM (the same widths, norms and RoPE)."""
    from transformers import Qwen2Config

    c = model.config.llm
    cfg = Qwen2Config(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, vocab_size=c.vocab_size,
                      rms_norm_eps=c.layer_norm_eps, max_position_embeddings=c.max_position_embeddings,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                      rope_theta=c.rope_theta, **extra)
    # transformers 5 keeps RoPE settings in rope_parameters; make sure theta landed there.
    if getattr(cfg, "rope_parameters", None) is not None:
        cfg.rope_parameters["rope_theta"] = c.rope_theta
    return cfg


def copy_llm_weights(model: MolmoAct, hf) -> None:
    """Our LLM's weights into a Qwen2ForCausalLM (fused q|k|v and [up|gate] split into its layers)."""
    c = model.config.llm
    H, kv, inter = c.hidden_size, c.kv_dim, c.intermediate_size
    t = model.model.transformer
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(t.wte.embedding)
        for blk, layer in zip(t.blocks, hf.model.layers):
            w, b = blk.self_attn.att_proj.weight, blk.self_attn.att_proj.bias
            for proj, sl in ((layer.self_attn.q_proj, slice(0, H)), (layer.self_attn.k_proj, slice(H, H + kv)),
                             (layer.self_attn.v_proj, slice(H + kv, H + 2 * kv))):
                proj.weight.copy_(w[sl])
                proj.bias.copy_(b[sl])
            layer.self_attn.o_proj.weight.copy_(blk.self_attn.attn_out.weight)
            layer.mlp.up_proj.weight.copy_(blk.mlp.ff_proj.weight[:inter])
            layer.mlp.gate_proj.weight.copy_(blk.mlp.ff_proj.weight[inter:])
            layer.mlp.down_proj.weight.copy_(blk.mlp.ff_out.weight)
            layer.input_layernorm.weight.copy_(blk.attn_norm.weight)
            layer.post_attention_layernorm.weight.copy_(blk.ff_norm.weight)
        hf.model.norm.weight.copy_(t.ln_f.weight)
        hf.lm_head.weight.copy_(model.lm_head.weight)


def qwen2_from_reference(model: MolmoAct):
    """transformers' Qwen2ForCausalLM holding our LLM's weights."""
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM(qwen2_config(model)).to(model.lm_head.weight.dtype).eval()
    copy_llm_weights(model, hf)
    return hf


def prompt_embeddings(model: MolmoAct, inputs) -> torch.Tensor:
    with torch.inference_mode():
        feats = model.image_features(torch.from_numpy(inputs.vision.crops),
                                     torch.from_numpy(inputs.vision.pooled_patches_idx))
        return model.embed(torch.from_numpy(inputs.input_ids)[None], feats)


def hf_generate(hf, embeds: torch.Tensor, new_tokens: int) -> tuple[list[int], dict[str, float]]:
    """Greedy generation with transformers; prefill timed separately by a 1-token generate."""
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    common = dict(inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=1, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf.generate(**common, max_new_tokens=1, min_new_tokens=1)
        t1 = time.perf_counter()
        out = hf.generate(**common, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        t2 = time.perf_counter()
    prefill = (t1 - t0) * 1e3
    return out[0, -new_tokens:].tolist(), {"prefill": prefill, "decode": (t2 - t1) * 1e3 - prefill,
                                           "total": (t2 - t1) * 1e3}


def copy_bandwidth_gbs(n_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """Achievable memory bandwidth (read + write of a large array), the floor for a decode that
    streams its weights once per token."""
    src = np.ones(n_bytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best / 1e9


def decode_bytes_per_token(model: MolmoAct) -> int:
    """Weights a decode step must read: the LLM blocks, ln_f and lm_head (the embedding table is a
    host-side gather of one row)."""
    t = model.model.transformer
    params = [p for blk in t.blocks for p in blk.parameters()] + list(t.ln_f.parameters()) + [model.lm_head.weight]
    return sum(p.numel() * p.element_size() for p in params)


class PeakRSS:
    """Peak resident memory of this process while a block runs, sampled from /proc every few ms
    (Linux; elsewhere the peaks read None). The engines share one process, so a peak includes what
    the others keep loaded; ``rise`` is the part this block added over its starting RSS."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.start = self.peak = None
        self._stop = threading.Event()

    @staticmethod
    def now() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            v = self.now()
            if v is not None:
                self.peak = max(self.peak or 0, v)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.now()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        v = self.now()
        if v is not None:
            self.peak = max(self.peak or 0, v)

    @property
    def rise(self) -> int | None:
        return None if self.peak is None or self.start is None else self.peak - self.start


def _say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run(workdir: str | Path, new_tokens: int = 220, size: str = "bench", seed: int = 0,
        threads: int | None = None, with_hf: bool = True, repeats: int = 1,
        progress: Callable[[str], None] | None = _say) -> dict:
    """Measure every engine ``repeats`` times, interleaved (the order rotates each round, so that a
    burst of load from elsewhere on the machine does not land on one engine only); report medians,
    the spread and each engine's peak memory."""
    say = progress or (lambda s: None)
    workdir = Path(workdir)
    if threads:
        torch.set_num_threads(threads)
    ckpt = workdir / f"checkpoint-{size}"
    if not (ckpt / "model.safetensors").exists():
        say(f"writing the random '{size}' checkpoint to {ckpt}")
        write_checkpoint(ckpt, size, seed)
    bundle = workdir / f"bundle-{size}"
    if not (bundle / "manifest.json").exists():
        say(f"exporting it to {bundle} (once; reused by later runs)")
        export_bundle(ckpt, bundle, progress=lambda s: None)
    spec = ModelSpec.load(ckpt)
    t0 = time.perf_counter()
    inputs = spec.inputs([scene_256()], INSTRUCTION, "single")
    pre_ms = (time.perf_counter() - t0) * 1e3

    say("measuring copy bandwidth, loading the three engines")
    report: dict = {"model": size, "prompt_tokens": int(len(inputs.input_ids)), "new_tokens": new_tokens,
                    "repeats": repeats, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                    "machine": {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(),
                                "threads": torch.get_num_threads(),
                                "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
                                "copy_bandwidth_GBps": round(copy_bandwidth_gbs(), 2)},
                    "engines": {}}
    model = load_model(ckpt, torch.float32)
    report["decode_weight_bytes"] = decode_bytes_per_token(model)
    pipe = open_bundle(bundle, threads=threads)
    ort_b = pipe.backend
    ref = TorchBackend(model)
    engines: dict[str, Callable[[], dict]] = {}

    def ort_once() -> dict:
        generate(ort_b, inputs, NEVER, 4)  # warm-up: first-call allocations, thread pools
        ort_b.reset_stats()
        r = generate(ort_b, inputs, NEVER, new_tokens, preprocess_ms=pre_ms)
        st = ort_b.stats
        return {**r.timings_ms, "ids": r.token_ids, "forwards": r.forwards,
                "host_ms_per_forward": st["decode_host_ms"] / max(st["decode_calls"], 1),
                "graph_ms_per_forward": st["decode_run_ms"] / max(st["decode_calls"], 1)}

    def torch_once() -> dict:
        generate(ref, inputs, NEVER, 4)
        r = generate(ref, inputs, NEVER, new_tokens, preprocess_ms=pre_ms)
        return {**r.timings_ms, "ids": r.token_ids, "forwards": r.forwards}

    engines["onnxruntime (ours)"] = ort_once
    engines["torch reference (ours)"] = torch_once
    if with_hf:
        hf = qwen2_from_reference(model)
        embeds = prompt_embeddings(model, inputs)

        def hf_once() -> dict:
            hf_generate(hf, embeds, 2)  # warm-up
            ids, t = hf_generate(hf, embeds, new_tokens)
            return {"preprocess": pre_ms, "vision": float("nan"), **t, "ids": ids, "forwards": new_tokens - 1}

        engines["transformers Qwen2 generate"] = hf_once

    runs: dict[str, list[dict]] = {name: [] for name in engines}
    peaks: dict[str, list[PeakRSS]] = {name: [] for name in engines}
    names = list(engines)
    for k in range(repeats):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            say(f"round {k + 1}/{repeats}: {name}, {new_tokens} tokens")
            with PeakRSS() as mem:
                r = engines[name]()
            runs[name].append(r)
            peaks[name].append(mem)
    if with_hf:  # transformers gets our prompt embeddings: its vision stage is the torch reference's
        v = float(np.median([r["vision"] for r in runs["torch reference (ours)"]]))
        for r in runs["transformers Qwen2 generate"]:
            r["vision"] = v

    for name in names:
        per = [{k: v for k, v in r.items() if isinstance(v, float)} for r in runs[name]]
        for r in per:
            r["ms_per_token"] = r["decode"] / max(new_tokens - 1, 1)
        e = {k: float(np.median([r[k] for r in per])) for k in per[0]}
        mspt = [r["ms_per_token"] for r in per]
        e.update(ids=runs[name][-1]["ids"], forwards=runs[name][-1]["forwards"],
                 ms_per_token_min=min(mspt), ms_per_token_max=max(mspt), runs=per,
                 ids_stable=all(r["ids"] == runs[name][0]["ids"] for r in runs[name]))
        e["tokens_per_s"] = 1e3 / e["ms_per_token"]
        e["decode_GBps"] = report["decode_weight_bytes"] / (e["ms_per_token"] / 1e3) / 1e9
        pk = [m.peak for m in peaks[name] if m.peak is not None]
        rise = [m.rise for m in peaks[name] if m.rise is not None]
        e["peak_rss_bytes"] = max(pk) if pk else None
        e["peak_rss_rise_bytes"] = max(rise) if rise else None
        report["engines"][name] = e
    ours = report["engines"]["onnxruntime (ours)"]
    report["ort_host_overhead_ms_per_forward"] = round(ours["host_ms_per_forward"], 4)
    report["ort_graph_ms_per_forward"] = round(ours["graph_ms_per_forward"], 4)
    for e in report["engines"].values():
        e["decode_vs_ours"] = e["decode"] / ours["decode"]
        # spread of the ratio over the rounds (engines ran in the same round, so under the same load)
        e["decode_vs_ours_per_round"] = [r["decode"] / o["decode"] for r, o in zip(e["runs"], ours["runs"])]
    kv_bytes = ort_b.kv[: len(inputs.input_ids) + new_tokens].nbytes
    t0 = time.perf_counter()
    for _ in range(20):  # what a growing-concatenation cache would copy per token at the end
        np.concatenate([ort_b.kv[: len(inputs.input_ids) + new_tokens - 1], ort_b.kv[:1]])
    report["host_concat_cache_ms_per_token_at_end"] = round((time.perf_counter() - t0) / 20 * 1e3, 4)
    report["kv_cache_bytes_at_end"] = int(kv_bytes)
    report["ids_agree"] = {name: e["ids"] == ours["ids"] and e["ids_stable"] for name, e in report["engines"].items()}
    report["forwards_per_token"] = {"plain greedy": round(ours["forwards"] / new_tokens, 3)}
    say("grammar-constrained step (forced spans)")
    report["grammar"] = _grammar_share(spec, ort_b, inputs)
    report["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pipe.close()
    return report


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _grammar_share(spec: ModelSpec, backend, inputs) -> dict | str:
    """Forwards per emitted token when the output grammar appends forced spans in one forward."""
    try:
        from molmoact_edge.runtime.engine.grammar import OutputGrammar
    except ImportError:
        return "output grammar not available in this build"
    stats = next(iter(spec.config.norm_stats.values()))
    grammar = OutputGrammar.from_tokenizer(spec.tokenizer, action_dim=stats.action_dim,
                                           n_action_bins=spec.config.n_action_bins)
    r = generate(backend, inputs, spec.tokenizer.special.eos, 512, grammar_state=grammar.start())
    n = len(r.token_ids)
    return {"tokens": n, "forced_tokens": r.forced_tokens, "forwards": r.forwards, "stopped": r.stopped,
            "forwards_per_token": round(r.forwards / max(n, 1), 3), "decode_ms": r.timings_ms["decode"]}


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.2f}"


def markdown(report: dict) -> str:
    eng = report["engines"]
    m = report["machine"]
    lines = [f"model `{report['model']}` (random weights), prompt {report['prompt_tokens']} tokens (256x256 "
             f"single view), {report['new_tokens']} new tokens, {report['repeats']} interleaved round(s), "
             f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m['threads']} threads, load average "
             f"{m['load_avg_1min_at_start']} at the start, copy bandwidth {m['copy_bandwidth_GBps']} GB/s, "
             f"decode reads {report['decode_weight_bytes'] / 1e6:.0f} MB of weights per token "
             f"({report['date_utc']} UTC)",
             "",
             "| engine | vision ms | prefill ms | decode ms | ms/token (min-max) | tokens/s | GB/s | "
             "decode time vs ours (min-max) | peak RSS GB (rise) | same ids |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in eng.items():
        ratios = e["decode_vs_ours_per_round"]
        lines.append(f"| {name} | {e['vision']:.1f} | {e['prefill']:.1f} | "
                     f"{e['decode']:.0f} | {e['ms_per_token']:.2f} ({e['ms_per_token_min']:.2f}-"
                     f"{e['ms_per_token_max']:.2f}) | {e['tokens_per_s']:.1f} | "
                     f"{e['decode_GBps']:.2f} | {e['decode_vs_ours']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                     f"{_gb(e['peak_rss_bytes'])} (+{_gb(e['peak_rss_rise_bytes'])}) | {report['ids_agree'][name]} |")
    lines += ["", "medians over the rounds; peak RSS is the whole process while that engine ran (all engines stay "
              "loaded), the rise is what the engine's run added; process peak "
              f"{_gb(report['process_peak_rss_bytes'])} GB",
              f"onnxruntime host overhead per decode forward (embedding gather + IO binding + logits fetch): "
              f"{report['ort_host_overhead_ms_per_forward']} ms next to {report['ort_graph_ms_per_forward']} ms in the "
              f"graph; a growing host-side KV concatenation would "
              f"instead copy {report['kv_cache_bytes_at_end'] / 1e6:.1f} MB per token at the end "
              f"({report['host_concat_cache_ms_per_token_at_end']} ms)",
              f"sequential LLM forwards per emitted token: plain greedy {report['forwards_per_token']['plain greedy']}; "
              f"with grammar forced spans: {report['grammar'] if isinstance(report['grammar'], str) else report['grammar']['forwards_per_token']}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_cli(p.parse_args(argv))


COST = ("It prints a progress line per engine and round on stderr. On a quiet 2-core CPU the set-up and one "
        "round take about 2 minutes (the first run also writes and exports the model into --workdir; each "
        "further round adds under a minute), much longer on a loaded machine. It peaks at about 5.2 GB of RAM "
        "when it also exports the model, 3.9 GB otherwise: the torch model, transformers' copy of it and the "
        "onnxruntime session are loaded together.")


def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_arguments(p) -> None:
    p.description = (p.description or "") + ". " + COST
    p.add_argument("--workdir", type=Path, default=Path("bench-work"), help="checkpoint/bundle cache directory")
    p.add_argument("--new-tokens", type=positive_int, default=220, help="tokens each engine decodes")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="rounds; the engines run interleaved, in a rotating order, and the table shows medians "
                        "and the spread")
    p.add_argument("--size", default="bench", choices=["tiny", "bench"], help="random model preset")
    p.add_argument("--threads", type=positive_int, default=None, help="intra-op threads for torch and onnxruntime")
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers' generate")
    p.add_argument("--json", type=Path, default=None, help="also write the full report here")


def run_cli(args) -> int:
    report = run(args.workdir, args.new_tokens, args.size, threads=args.threads, with_hf=not args.skip_hf,
                 repeats=args.repeats)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
