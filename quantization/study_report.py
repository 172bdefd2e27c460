"""The study's outputs: ``report.json`` (one object), ``report.md`` (tables a person reads) and PNG
plots (matplotlib, headless): error vs token position, action-error CDF per scheme and, when it
ran, the per-layer sensitivity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from molmoact_edge.quantization.study import SEGMENTS, CandidateResult, summarize

FORMAT = "molmoact-edge-study"
FORMAT_VERSION = 1
SMOOTH = 9
TASK_SUCCESS_NOTE = ("task success is not measured: `molmoact-edge study --task-episodes N` runs each candidate "
                     "closed-loop on N seeded episodes of the demo task in the rendered tabletop (issue 16); it is "
                     "meaningful for bundles of the trained demo policy (`molmoact-edge demo-policy`, `export`, `quantize`)")


def _clean(x):
    """JSON has no NaN: a quantity that could not be measured is null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(x) or math.isinf(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def candidate_entry(res: CandidateResult, costs: dict, task_success: dict | None) -> dict:
    s = summarize(res)
    return {"path": res.path, "scheme": res.scheme, **s,
            "bytes": costs["bytes"], "bytes_per_token": costs["bytes_per_token"]["total"],
            "bytes_per_token_parts": costs["bytes_per_token"],
            "task_success": task_success,
            "per_sample": {"first_divergence": res.first_divergence, "answer_tokens": res.answer_len,
                           "depth_agreement": res.depth_agreement, "trace_px_error": res.trace_px,
                           "action_error_mm": res.action_mm, "action_error_deg": res.action_deg,
                           "gripper_flips": res.gripper_flips, "actions_compared": res.actions_compared}}


def write_json(out: Path, report: dict) -> Path:
    p = out / "report.json"
    p.write_text(json.dumps(_clean(report), indent=2, allow_nan=False) + "\n")
    return p


def _f(x, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def write_markdown(out: Path, report: dict) -> Path:
    c = report["candidates"]
    lines = [f"# Quantisation study", "",
             f"Reference: `{report['reference']['path']}` ({report['reference']['scheme']}). "
             f"Data: `{report['data']['path']}`, split `{report['data']['split']}`, {report['data']['samples']} samples "
             f"(set sha256 {report['data']['sha256'][:12]}). Unnorm key: `{report['settings']['unnorm_key']}`. "
             f"Grammar on, max {report['settings']['max_new_tokens']} new tokens, onnxruntime CPU "
             f"({report['settings']['threads'] or 'default'} threads).", "",
             "## Candidates against the reference", "",
             "| candidate | scheme | top-1 | top-1 (grammar) | KL | first div. (median) | identical | depth agr. | "
             "trace px | action mm | action deg | gripper flips | MB on disk | MB read/token | ms/token | peak RSS MB |",
             "|---" * 16 + "|"]
    for label, r in c.items():
        lines.append(f"| {label} | {r['scheme']} | {_f(r['top1_agreement'], '.3f')} | {_f(r['top1_agreement_allowed'], '.3f')} | "
                     f"{_f(r['kl'], '.3g')} | {_f(r['first_divergence'], '.0f')} | {_f(r['identical_answers'], '.2f')} | "
                     f"{_f(r['depth_agreement'], '.3f')} | {_f(r['trace_px_error'], '.2f')} | "
                     f"{_f(r['action_error_mm'], '.2f')} | {_f(r['action_error_deg'], '.2f')} | {r['gripper_flips']} | "
                     f"{r['bytes'] / 1e6:.2f} | {r['bytes_per_token'] / 1e6:.2f} | {_f(r['ms_per_token'], '.2f')} | "
                     f"{_f(None if r['peak_rss_bytes'] is None else r['peak_rss_bytes'] / 1e6, '.0f')} |")
    lines += ["", "## Teacher-forced agreement and KL per output segment", "",
              "| candidate | " + " | ".join(f"{s} top-1 / KL (tokens)" for s in SEGMENTS) + " |", "|---" * (len(SEGMENTS) + 1) + "|"]
    for label, r in c.items():
        cells = []
        for s in SEGMENTS:
            seg = r["segments"][s]
            cells.append(f"{_f(seg['top1_agreement'], '.3f')} / {_f(seg['kl'], '.3g')} ({seg['tokens']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    sens = report.get("sensitivity")
    if sens:
        p = sens["proposed"]
        lines += ["", f"## Per-layer sensitivity ({sens['scheme']}, torch simulation on `{sens['checkpoint']}`)", "",
                  f"One layer quantised at a time, teacher-forced over {sens['positions']} reference answer positions. "
                  f"Whole recipe: KL {sens['whole_recipe']['kl']:.3g}, top-1 {sens['whole_recipe']['top1_agreement']:.3f}.", "",
                  "| rank | layer | params | KL | top-1 |", "|---|---|---|---|---|"]
        for i, r in enumerate(sens["layers"]):
            lines.append(f"| {i + 1} | {r['layer']} | {r['params']} | {r['kl']:.3g} | {r['top1_agreement']:.3f} |")
        lines += ["", "| group (all blocks together) | layers | KL | top-1 |", "|---|---|---|---|"]
        for r in sens["groups"]:
            lines.append(f"| {r['group']} | {r['layers']} | {r['kl']:.3g} | {r['top1_agreement']:.3f} |")
        lines += ["", f"Proposed mixed precision (the most sensitive layers, at most {p['keep_top']}, within "
                      f"{p['keep_budget']:.0%} of the linear parameters): keep {p['keep_float']} in float "
                      f"({p['float_params_fraction']:.2%} of the linear parameters): simulated KL {p['kl']:.3g}, "
                      f"top-1 {p['top1_agreement']:.3f}.", "",
                  f"    {p['command']}"]
    lines += ["", "## Task success", ""]
    if report["task_success_note"]:
        lines.append(report["task_success_note"])
    else:
        lines += ["Closed-loop episodes of the demo task (`molmoact-edge eval`'s), the same seeds for every candidate.", "",
                  "| candidate | success | seeds | time to success (sim s, median) | step latency (ms, median) | "
                  "forwards / token |", "|---|---|---|---|---|---|"]
        for label, r in c.items():
            t = r["task_success"]
            fpt = (t.get("decode") or {}).get("forwards_per_token")
            lines.append(f"| {label} | {t['successes']}/{t['episodes']} | {t['seeds'][0]}-{t['seeds'][-1]} | "
                         f"{_f(t['time_to_success_s_median'], '.1f')} | {_f(t['step_latency_ms_median'], '.0f')} | "
                         f"{_f(fpt, '.2f')} |")
    lines += ["", "## How to read this", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in report["plots"])]
    p = out / "report.md"
    p.write_text("\n".join(lines) + "\n")
    return p


def write_plots(out: Path, results: list[CandidateResult], sensitivity: dict | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and robots have no display
    import matplotlib.pyplot as plt

    written = []
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for r in results:
        n = max((len(k) for k in r.positions_kl), default=0)
        if n == 0:
            continue
        kl = np.full((len(r.positions_kl), n), np.nan)
        dis = np.full_like(kl, np.nan)
        for i, (k, a) in enumerate(zip(r.positions_kl, r.positions_agree)):
            kl[i, :len(k)], dis[i, :len(a)] = k, ~a
        ax1.plot(np.arange(n), np.nanmean(kl, axis=0) + 1e-12, label=f"{r.label} ({r.scheme})", lw=1)
        rate = np.nan_to_num(np.nanmean(dis, axis=0))
        w = min(SMOOTH, n)  # a few samples make a jagged rate; a short moving average shows the trend
        ax2.plot(np.arange(n), np.convolve(rate, np.ones(w) / w, mode="same"), label=r.label, lw=1)
    ax1.set_yscale("log")
    ax1.set_ylabel("KL(ref || cand), nats\n(mean over samples)")
    ax2.set_ylabel(f"top-1 disagreement\n(fraction of samples,\n{SMOOTH}-token moving mean)")
    ax2.set_xlabel("answer token position (teacher-forced on the reference answer)")
    ax1.legend(fontsize=7)
    ax1.set_title("Error vs token position")
    fig.tight_layout()
    fig.savefig(out / "error_vs_position.png", dpi=110)
    plt.close(fig)
    written.append("error_vs_position.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, attr, unit in ((axes[0], "action_mm", "translation error, mm"), (axes[1], "action_deg", "rotation error, deg")):
        for r in results:
            v = np.sort([x for x in getattr(r, attr) if not math.isnan(x)])
            if len(v):
                ax.step(np.concatenate([[0], v]), np.linspace(0, 1, len(v) + 1), where="post", label=r.label)
        ax.set_xlabel(unit)
        ax.set_ylabel("fraction of samples <= x")
    axes[0].legend(fontsize=7)
    fig.suptitle("Action error CDF per scheme (free-running, de-normalised, against the reference)")
    fig.tight_layout()
    fig.savefig(out / "action_error_cdf.png", dpi=110)
    plt.close(fig)
    written.append("action_error_cdf.png")

    if sensitivity:
        rows = sensitivity["layers"]
        fig, ax = plt.subplots(figsize=(9, max(3, 0.28 * len(rows) + 1)))
        ax.barh([r["layer"] for r in rows][::-1], [r["kl"] + 1e-12 for r in rows][::-1],
                color=["tab:red" if r["layer"] in sensitivity["proposed"]["keep_float"] else "tab:blue" for r in rows][::-1])
        ax.set_xscale("log")
        ax.set_xlabel(f"teacher-forced KL with only this layer in {sensitivity['scheme']} (red: kept in float)")
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        fig.savefig(out / "layer_sensitivity.png", dpi=110)
        plt.close(fig)
        written.append("layer_sensitivity.png")
    return written
