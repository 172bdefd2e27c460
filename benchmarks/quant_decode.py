"""Decode cost of quantised bundles: ms/token and bytes/token of fp32 and every quantisation scheme on
onnxruntime CPU, interleaved in one run, per component, and projected to the 7B shape on an AGX Orin;
with ``--agreement FIXTURE``, each scheme's greedy ids against the fp32 bundle's on the fixture's cases.

What is timed (each bundle in turn, round-robin, so that machine load hits all of them alike):
- ``decode``: the whole LLM graph for one token at a fixed past length (the runtime's step);
- ``lm_head``: the bundle's own lm_head node alone (cut out of its LLM graph with its weights);
- ``layers+rest`` = decode - lm_head: transformer layers, attention over the cache, norms.

Bytes per token are the weights each decoded token must read: transformer layers and lm_head from
the manifest (measured on the written graphs), one embedding row, and the KV cache read at that
past length. The 7B projection applies each component's measured bytes per parameter to
MolmoAct-7B's shapes (Qwen2-7B: hidden 3584, 28 layers, MLP 18944, 4 KV heads, vocab 152064) and
divides by the Orin's bandwidth: the floor of a bandwidth-bound decode, not a measurement.

    python -m molmoact_edge.benchmarks.quant_decode --out benchmarks/quant_decode.json
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

SCHEMES = ("fp32", "fp16", "int8-wo", "int4-rtn", "fp8", "w8a8-sq", "int4-awq")
# Timed by default: the forms with native onnxruntime CPU kernels. fp16 has none on x86 and fp8's Q/DQ graph is
# a simulation on CPU; with all seven bundles loaded at once the run took 10 GB and was OOM-killed on a 23 GB
# machine shared with other jobs. --schemes adds them back; --agreement always covers all seven.
TIMED = ("fp32", "int8-wo", "int4-rtn", "w8a8-sq", "int4-awq")
ORIN_GBPS = 204.8
Q7B = {"hidden": 3584, "layers": 28, "mlp": 18944, "kv_heads": 4, "head_dim": 128, "vocab": 152064}


def params_7b() -> dict[str, int]:
    h, i, kv = Q7B["hidden"], Q7B["mlp"], Q7B["kv_heads"] * Q7B["head_dim"]
    per_layer = h * (h + 2 * kv) + h * h + h * 2 * i + i * h
    return {"transformer_layers": per_layer * Q7B["layers"], "lm_head": Q7B["vocab"] * h}


def _lm_head_graph(llm_path: Path, hidden: int):
    """The lm_head node of a bundle's LLM graph as a graph of its own (same op, same weights)."""
    import onnx
    from onnx import helper

    m = onnx.load(str(llm_path))
    node = next(n for n in m.graph.node if n.name.startswith("linear/lm_head") or
                (n.op_type == "Gemm" and "lm_head.weight" in n.input))
    inits = [t for t in m.graph.initializer if t.name in set(node.input[1:])]
    new = helper.make_node(node.op_type, ["x", *node.input[1:]], ["y"], domain=node.domain,
                           **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    x_type = m.graph.input[0].type.tensor_type.elem_type  # fp16 bundles take fp16 activations
    g = helper.make_graph([new], "lm_head", [helper.make_tensor_value_info("x", x_type, [1, hidden])],
                          [helper.make_tensor_value_info("y", x_type, None)], inits)
    return helper.make_model(g, opset_imports=list(m.opset_import), ir_version=m.ir_version)


class Runner:
    def __init__(self, bundle: Path, past: int, threads: int):
        import onnxruntime as ort

        from molmoact_edge.runtime.engine.bundle import load_manifest
        from molmoact_edge.runtime.engine.config import ModelConfig
        from molmoact_edge.runtime.engine.ort_backend import OrtBackend

        self.bundle = load_manifest(bundle)
        self.manifest = self.bundle.manifest
        self.cfg = ModelConfig.load(bundle)
        self.backend = OrtBackend(self.bundle, self.cfg, threads=threads)
        self.past = past
        self.backend.reset(past + 2)
        rng = np.random.default_rng(0)
        self.backend.kv[:past] = rng.standard_normal(self.backend.kv[:past].shape).astype(self.backend.kv.dtype) * 0.5
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        h = self.cfg.llm.hidden_size
        self.head = ort.InferenceSession(_lm_head_graph(bundle / self.manifest.graphs["llm"].file, h).SerializeToString(),
                                         opts, providers=["CPUExecutionProvider"])
        self.x = rng.standard_normal((1, h)).astype(np.float16 if self.manifest.dtype == "fp16" else np.float32)
        self.times = {"decode": [], "lm_head": []}

    def once(self) -> None:
        t0 = time.perf_counter()
        self.backend.forward(np.array([1000]), self.past)
        t1 = time.perf_counter()
        self.head.run(None, {"x": self.x})
        t2 = time.perf_counter()
        self.times["decode"].append((t1 - t0) * 1e3)
        self.times["lm_head"].append((t2 - t1) * 1e3)


def run(size: str = "bench", past: int = 512, rounds: int = 30, threads: int = 2, work: Path | None = None,
        say=print, schemes: tuple[str, ...] = TIMED) -> dict:
    import torch  # noqa: F401  (export side)

    from molmoact_edge.export.onnx_export import export_bundle
    from molmoact_edge.export.tiny import write_checkpoint
    from molmoact_edge.quantization.quantize import quantize_bundle
    from molmoact_edge.quantization.recipes import recipe_for

    work = Path(work or tempfile.mkdtemp(prefix="quant_bench."))
    ckpt = work / "checkpoint"
    if not (ckpt / "config.json").exists():
        say(f"writing a random {size!r} checkpoint")
        write_checkpoint(ckpt, size, seed=0)
    bundles = {"fp32": work / "fp32"}
    if not (bundles["fp32"] / "manifest.json").exists():
        say("exporting the fp32 bundle")
        export_bundle(ckpt, bundles["fp32"], progress=lambda s: say("  " + s))
    for s in schemes:
        if s == "fp32":
            continue
        bundles[s] = work / s
        if not (bundles[s] / "manifest.json").exists():
            say(f"quantising {s}")
            quantize_bundle(ckpt, bundles[s], recipe_for(s), base_bundle=bundles["fp32"], progress=lambda x: say("  " + x))
    runners = {s: Runner(b, past, threads) for s, b in bundles.items()}
    for r in runners.values():  # warm-up
        r.once()
        r.times = {"decode": [], "lm_head": []}
    say(f"timing {rounds} interleaved rounds at past={past}, {threads} threads")
    for i in range(rounds):
        for r in runners.values():
            r.once()
    quantised = next(b for s, b in bundles.items() if s != "fp32")  # every recipe records the fp32 bytes
    fp32_bytes = json.loads((quantised / "manifest.json").read_text())["quantization"]["fp32_bytes"]
    p7 = params_7b()
    rows = {}
    for s, r in runners.items():
        q = r.manifest.quantization
        b = q["bytes"] if q else {k: fp32_bytes[k] for k in ("transformer_layers", "lm_head")}
        llm = r.cfg.llm
        kv_bytes = past * llm.num_hidden_layers * 2 * llm.num_key_value_heads * llm.head_dim * r.backend.kv.itemsize
        dec, head = float(np.median(r.times["decode"])), float(np.median(r.times["lm_head"]))
        per_param = {k: b[k] / (fp32_bytes[k] / 4) for k in ("transformer_layers", "lm_head")}
        proj = {k: per_param[k] * p7[k] for k in p7}
        rows[s] = {
            "decode_ms": dec, "lm_head_ms": head, "layers_rest_ms": dec - head,
            "bytes": {"transformer_layers": b["transformer_layers"], "lm_head": b["lm_head"],
                      "embedding_row": llm.hidden_size * 4, "kv_cache": kv_bytes},
            "bytes_per_param": per_param,
            "achieved_gbps": (b["transformer_layers"] + b["lm_head"] + kv_bytes) / dec / 1e6,
            "orin_7b": {"transformer_layers_gb": proj["transformer_layers"] / 1e9, "lm_head_gb": proj["lm_head"] / 1e9,
                        "floor_ms_per_token": sum(proj.values()) / (ORIN_GBPS * 1e9) * 1e3},
        }
    base = rows["fp32"]
    for s, row in rows.items():
        row["ratio_to_fp32"] = {k: row[k] / base[k] for k in ("decode_ms", "lm_head_ms", "layers_rest_ms")}
        row["ratio_to_fp32"]["bytes"] = ((row["bytes"]["transformer_layers"] + row["bytes"]["lm_head"]) /
                                         (base["bytes"]["transformer_layers"] + base["bytes"]["lm_head"]))
    return {"model": size, "past": past, "rounds": rounds, "threads": threads, "machine": platform.processor() or
            platform.machine(), "orin_gbps": ORIN_GBPS, "params_7b": p7, "schemes": rows}


def table(res: dict) -> str:
    lines = ["| scheme | decode ms/tok | lm_head ms | layers+rest ms | layer bytes/tok | lm_head bytes/tok | "
             "ratio (ms, bytes) | 7B Orin floor ms/tok (layers + head GB) |", "|---" * 8 + "|"]
    for s, r in res["schemes"].items():
        b, o, x = r["bytes"], r["orin_7b"], r["ratio_to_fp32"]
        lines.append(f"| {s} | {r['decode_ms']:.2f} | {r['lm_head_ms']:.2f} | {r['layers_rest_ms']:.2f} | "
                     f"{b['transformer_layers'] / 1e6:.1f} MB | {b['lm_head'] / 1e6:.1f} MB | "
                     f"{x['decode_ms']:.2f}x, {x['bytes']:.2f}x | {o['floor_ms_per_token']:.1f} "
                     f"({o['transformer_layers_gb']:.2f} + {o['lm_head_gb']:.2f}) |")
    return "\n".join(lines)


def _greedy(backend, case, n: int) -> list[int]:
    ids = case["input_ids"][0]
    backend.reset(len(ids) + n + 1)
    logits = backend.forward(ids, 0, backend.vision(case["images"][0], case["pooled_patches_idx"][0]))
    out = []
    for i in range(n):
        out.append(int(logits[-1].argmax()))
        logits = backend.forward(np.array([out[-1]]), len(ids) + i)
    return out


def agreement(fixture: Path, work: Path, tokens: int = 24, say=print) -> dict:
    """Per scheme and fixture case: how many of the first ``tokens`` greedy ids (plain greedy, onnxruntime)
    equal the fp32 bundle's, and the index of the first that differs (``tokens`` if none)."""
    from molmoact_edge.export.onnx_export import export_bundle
    from molmoact_edge.quantization.quantize import quantize_bundle
    from molmoact_edge.quantization.recipes import recipe_for
    from molmoact_edge.runtime.engine.bundle import load_manifest
    from molmoact_edge.runtime.engine.config import ModelConfig
    from molmoact_edge.runtime.engine.ort_backend import OrtBackend

    ckpt = fixture / "checkpoint"
    cfg = ModelConfig.load(ckpt)
    cases = {p.stem: np.load(p) for p in sorted((fixture / "cases").glob("*.npz"))}
    base = work / "agree-fp32"
    if not (base / "manifest.json").exists():
        export_bundle(ckpt, base, progress=lambda s: None)
    ids = {}
    for s in SCHEMES:
        b = base if s == "fp32" else work / f"agree-{s}"
        if not (b / "manifest.json").exists():
            say(f"quantising {fixture.name} as {s}")
            quantize_bundle(ckpt, b, recipe_for(s), base_bundle=base, progress=lambda x: None)
        backend = OrtBackend(load_manifest(b), cfg)
        ids[s] = {name: _greedy(backend, c, tokens) for name, c in cases.items()}
        backend.close()
    out = {}
    for s in SCHEMES[1:]:
        out[s] = {name: {"same": sum(a == b for a, b in zip(ids[s][name], ids["fp32"][name])),
                         "first_difference": next((i for i, (a, b) in enumerate(zip(ids[s][name], ids["fp32"][name]))
                                                   if a != b), tokens)} for name in cases}
    return {"fixture": fixture.name, "tokens": tokens, "schemes": out}


def agreement_table(res: dict) -> str:
    cases = list(next(iter(res["schemes"].values())))
    lines = [f"| scheme | {' | '.join(cases)} | cases identical |", "|---" * (len(cases) + 2) + "|"]
    for s, per in res["schemes"].items():
        cells = [f"{v['same']}/{res['tokens']} (first diff {v['first_difference']})" for v in per.values()]
        whole = sum(v["first_difference"] == res["tokens"] for v in per.values())
        lines.append(f"| {s} | {' | '.join(cells)} | {whole}/{len(per)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="bench", help="random checkpoint preset of export/tiny.py (default: bench)")
    p.add_argument("--past", type=int, default=512, help="KV positions already filled when a token is decoded")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="folder for the checkpoint and bundles (reused if present)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--agreement", type=Path, default=None, metavar="FIXTURE",
                   help="also compare each scheme's first 24 greedy ids with fp32's on this fixture's cases")
    p.add_argument("--schemes", default=",".join(TIMED), help=f"schemes to time, comma-separated (all: {','.join(SCHEMES)})")
    a = p.parse_args(argv)
    schemes = tuple(dict.fromkeys(["fp32", *a.schemes.split(",")]))
    unknown = sorted(set(schemes) - set(SCHEMES))
    if unknown:
        p.error(f"unknown schemes {unknown}; accepted: {list(SCHEMES)}")
    res = run(a.size, a.past, a.rounds, a.threads, a.work, schemes=schemes)
    print(table(res))
    if a.agreement:
        res["agreement"] = agreement(a.agreement, Path(a.work or tempfile.mkdtemp(prefix="quant_agree.")))
        print(agreement_table(res["agreement"]))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
