"""The quantisation study: what a quantised bundle does to MolmoAct's answer, against a reference
bundle, on held-out inputs (the evaluation split of a calibration set).

Per evaluation sample the reference answers once, free-running with the output grammar on. Each
candidate is then measured two ways:

- teacher-forced: the reference's answer is fed to both bundles and the next-token distributions
  are compared at every answer position (top-1 agreement, raw and within the grammar's allowed
  set, and KL(reference || candidate)), split by output segment;
- free-running: the candidate answers on its own (grammar on) and its answer is compared with the
  reference's: first differing token, depth codes, trace in pixels and de-normalised actions.

Segments come from the runtime's own grammar automaton (``runtime/engine/grammar.py``): a token is
labelled by the grammar phase it is consumed in (glue text and the brackets that open a part are
``glue``; ``<DEPTH_k>`` and ``<DEPTH_END>`` are ``depth``; numbers, separators and the closing
bracket of the trace are ``trace``; action strings and their separators are ``actions``).

Only bundles are read (any scheme ``quantize`` writes, present or future); nothing here imports
torch. The per-layer sensitivity (torch) is in :mod:`molmoact_edge.quantization.sensitivity`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from molmoact_edge.runtime.engine import grammar as G
from molmoact_edge.runtime.engine.bundle import MANIFEST
from molmoact_edge.runtime.engine.pipeline import Pipeline, open_bundle

SEGMENTS = ("depth", "trace", "actions", "glue")
_SEGMENT_OF_PHASE = {G.GLUE_DEPTH: "glue", G.GLUE_TRACE: "glue", G.GLUE_ACTION: "glue", G.GLUE_END: "glue",
                     G.DEPTH: "depth", G.TRACE: "trace", G.ACTION: "actions"}
KL_CHUNK = 32  # logits rows per float64 softmax (152k-wide rows: ~40 MB per chunk)


@dataclass
class Answer:
    """One free-running answer, read."""

    ids: list[int]
    text: str
    depth: list[int] | None
    trace: list | None
    actions: np.ndarray  # [n, action_dim], de-normalised where the reading allows
    image_size: tuple[int, int]  # (width, height) of the first image: the trace's pixel frame
    stopped: str
    prompt_tokens: int
    unnorm_key: str | None  # as resolved (the only key when none was given)


@dataclass
class SampleData:
    id: str
    instruction: str
    images: list[np.ndarray]


@dataclass
class CandidateResult:
    """Everything measured for one candidate (per sample lists are in sample order)."""

    label: str
    path: str
    scheme: str
    positions_kl: list[np.ndarray] = field(default_factory=list)  # per sample, [answer length]
    positions_agree: list[np.ndarray] = field(default_factory=list)
    positions_agree_allowed: list[np.ndarray] = field(default_factory=list)
    positions_segment: list[list[str]] = field(default_factory=list)
    first_divergence: list[int] = field(default_factory=list)
    answer_len: list[int] = field(default_factory=list)
    depth_agreement: list[float] = field(default_factory=list)
    trace_px: list[float] = field(default_factory=list)
    action_mm: list[float] = field(default_factory=list)
    action_deg: list[float] = field(default_factory=list)
    gripper_flips: list[int] = field(default_factory=list)
    actions_compared: list[int] = field(default_factory=list)
    decode_ms: float = 0.0
    decode_calls: int = 0
    peak_rss: int | None = None
    peak_scope: str | None = None
    rss_added: int | None = None


def segment_labels(grammar, ids: list[int], max_tokens: int | None) -> list[str]:
    """Per answer token, its segment. The answer must be one the grammar accepts (the reference
    answered with the grammar on)."""
    state = grammar.start(max_tokens=max_tokens)
    labels = []
    for t in ids:
        labels.append(_SEGMENT_OF_PHASE[state.phase])
        state.advance(int(t))
    return labels


def allowed_agreement(grammar, ids: list[int], max_tokens: int, ref_logits: np.ndarray,
                      cand_logits: np.ndarray) -> np.ndarray:
    """Per answer position: whether both pick the same token among those the grammar allows there
    (what the constrained decoder actually decides; forced positions agree trivially)."""
    state = grammar.start(max_tokens=max_tokens)
    out = np.empty(len(ids), dtype=bool)
    for i, t in enumerate(ids):
        mask = state.allowed_mask()[:ref_logits.shape[1]]  # added tokens past the lm_head are never picked
        a, b = ref_logits[i, :len(mask)], cand_logits[i, :len(mask)]
        out[i] = np.where(mask, a, -np.inf).argmax() == np.where(mask, b, -np.inf).argmax()
        state.advance(int(t))
    return out


def teacher_forced_logits(backend, inputs, answer: list[int]) -> np.ndarray:
    """Logits predicting each answer token, the answer's own tokens fed back: [len(answer), vocab]."""
    prompt = np.asarray(inputs.input_ids, dtype=np.int64)
    seq = np.concatenate([prompt, np.asarray(answer[:-1], dtype=np.int64)])
    backend.reset(len(seq) + 1)
    feats = backend.vision(inputs.vision.crops, inputs.vision.pooled_patches_idx)
    return backend.forward(seq, 0, feats, np.arange(len(prompt) - 1, len(seq)))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_rows(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(reference || candidate) in nats per row, in float64 chunks (0 when the rows are equal)."""
    out = np.empty(len(ref_logits))
    for s in range(0, len(ref_logits), KL_CHUNK):
        lp, lq = _log_softmax(ref_logits[s:s + KL_CHUNK]), _log_softmax(cand_logits[s:s + KL_CHUNK])
        out[s:s + KL_CHUNK] = np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)
    return out


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token; the common length when one is a prefix of the other."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def depth_agreement(ref: list[int] | None, cand: list[int] | None) -> float:
    """Fraction of the reference's depth codes the candidate reproduces at the same index."""
    if not ref:
        return 1.0 if not cand else 0.0
    cand = cand or []
    return sum(1 for i, c in enumerate(ref) if i < len(cand) and cand[i] == c) / len(ref)


def trace_error_px(ref: list | None, cand: list | None, width: int, height: int) -> float:
    """Mean distance in pixels of the first image between trace points of the same index; the
    shorter trace is extended by repeating its last point (a missing point counts as staying put).
    A missing trace on one side counts as the image diagonal (the largest possible error)."""
    from molmoact_edge.runtime.engine.parser import trace_to_pixels

    if not ref and not cand:
        return 0.0
    if not ref or not cand:
        return float(math.hypot(width - 1, height - 1))
    a, b = trace_to_pixels(ref, width, height), trace_to_pixels(cand, width, height)
    n = max(len(a), len(b))
    a = np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)])
    b = np.concatenate([b, np.repeat(b[-1:], n - len(b), axis=0)])
    return float(np.linalg.norm(a - b, axis=1).mean())


def action_errors(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float, int, int]:
    """(translation mm, rotation deg, gripper flips, lists compared) over the action lists both
    answers have, for 7-D [x, y, z, roll, pitch, yaw, gripper] actions in metres and radians (the
    Open-X convention, runtime/control/convention.py): Euclidean norms of the per-list difference,
    averaged; a flip is a gripper value on the other side of 0 (the middle of its [-1, 1] range,
    never de-normalised)."""
    n = min(len(ref), len(cand))
    if n == 0:
        return float("nan"), float("nan"), 0, 0
    a, b = np.asarray(ref[:n], dtype=np.float64), np.asarray(cand[:n], dtype=np.float64)
    mm = float(np.linalg.norm(a[:, :3] - b[:, :3], axis=1).mean() * 1000.0)
    deg = float(np.degrees(np.linalg.norm(a[:, 3:6] - b[:, 3:6], axis=1)).mean()) if a.shape[1] >= 6 else 0.0
    flips = int(((a[:, -1] > 0) != (b[:, -1] > 0)).sum())
    return mm, deg, flips, n


def answer(pipe: Pipeline, sample: SampleData, unnorm_key: str | None, max_new_tokens: int) -> Answer:
    res = pipe.act(sample.images, sample.instruction, max_new_tokens=max_new_tokens, grammar=True,
                   unnorm_key=unnorm_key)
    h, w = sample.images[0].shape[:2]
    return Answer(list(res.token_ids), res.text, res.depth, res.trace, res.actions, (w, h), res.stopped,
                  res.generation.prompt_tokens, res.unnorm_key)


# -- cost of a bundle -------------------------------------------------------------------------
def bundle_disk_bytes(bundle: Path) -> int:
    m = json.loads((bundle / MANIFEST).read_text())
    return sum((bundle / rel).stat().st_size for rel in m["files"]) + (bundle / MANIFEST).stat().st_size


def bytes_per_token(bundle: Path, past: float) -> dict[str, float]:
    """Bytes one decoded token reads: every constant of the LLM graph (transformer layers, lm_head,
    norms), one embedding row and the KV cache at ``past`` positions (its mean over the answers).
    The parts follow initializer names (onnx_passes.component_of): only quantised graphs name their
    layer weights, so an unquantised export counts its transformer layers under "other"."""
    import onnx
    from molmoact_edge.quantization.onnx_passes import initializer_bytes

    m = json.loads((bundle / MANIFEST).read_text())
    llm = onnx.load(str(bundle / m["graphs"]["llm"]["file"]), load_external_data=False)
    weights = initializer_bytes(llm)
    emb = m["embeddings"]
    row = int(emb["shape"][-1]) * np.dtype(emb["dtype"]).itemsize
    kv = m["kv_cache"]
    kv_row = int(np.prod(kv["shape"][1:])) * np.dtype(kv["dtype"]).itemsize
    out = {k: float(v) for k, v in weights.items()}
    out.update(embedding_row=float(row), kv_cache=float(kv_row * past))
    out["total"] = float(sum(weights.values()) + row + kv_row * past)
    return out


def scheme_of(bundle: Path) -> str:
    m = json.loads((bundle / MANIFEST).read_text())
    q = m.get("quantization")
    if not q:
        return m.get("dtype", "float")
    return f"{q.get('scheme')}" + (f"@{q['target']}" if q.get("target", "onnxruntime") != "onnxruntime" else "") + \
        (f"+{len(q['keep_float'])} float" if q.get("keep_float") else "")


# -- memory (Linux): the process's peak resident set while one candidate runs ----------------------
def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -- the study --------------------------------------------------------------------------------
def load_samples(data: str | Path | None, split: str = "evaluation", limit: int | None = None):
    from molmoact_edge.quantization.calibration import load_calibration_set

    cs = load_calibration_set(data)
    chosen = cs.split(split)[:limit]
    return cs, [SampleData(s.id, s.instruction, s.load_images(cs.views)) for s in chosen]


def _label(bundle: Path, taken: set[str]) -> str:
    base = bundle.name or str(bundle)
    label, k = base, 2
    while label in taken:
        label, k = f"{base}#{k}", k + 1
    taken.add(label)
    return label


def compare(reference: Path, candidates: list[Path], samples: list[SampleData], unnorm_key: str | None = None,
            max_new_tokens: int = 256, threads: int | None = None,
            progress: Callable[[str], None] = print) -> tuple[list[Answer], list[CandidateResult]]:
    """Run the reference once per sample, then each candidate in turn (one open at a time)."""
    opts = {"threads": threads} if threads else {}
    ref_pipe = open_bundle(reference, **opts)
    try:
        grammar = ref_pipe.grammar(unnorm_key)
        t0 = time.perf_counter()
        ref_answers = [answer(ref_pipe, s, unnorm_key, max_new_tokens) for s in samples]
        progress(f"reference {reference}: {len(samples)} answers, "
                 f"{sum(len(a.ids) for a in ref_answers)} tokens ({time.perf_counter() - t0:.1f} s)")
        labelled = [segment_labels(grammar, a.ids, max_new_tokens) for a in ref_answers]
        taken: set[str] = set()
        results = []
        for ci, cand in enumerate(candidates):
            t0 = time.perf_counter()
            res = CandidateResult(_label(Path(cand), taken), str(cand), scheme_of(Path(cand)))
            peak_ok = _reset_peak()
            before = _status_kb("VmRSS")
            pipe = open_bundle(cand, **opts)
            try:
                res.rss_added = (_status_kb("VmRSS") or 0) - (before or 0) if before is not None else None
                for s, ra, labels in zip(samples, ref_answers, labelled):
                    inputs = ref_pipe.spec.inputs(s.images, s.instruction)
                    lr = teacher_forced_logits(ref_pipe.backend, inputs, ra.ids)
                    lc = teacher_forced_logits(pipe.backend, inputs, ra.ids)
                    res.positions_kl.append(kl_rows(lr, lc))
                    res.positions_agree.append(lr.argmax(-1) == lc.argmax(-1))
                    res.positions_agree_allowed.append(allowed_agreement(grammar, ra.ids, max_new_tokens, lr, lc))
                    res.positions_segment.append(labels)
                    del lr, lc
                    pipe.backend.reset_stats()
                    ca = answer(pipe, s, unnorm_key, max_new_tokens)
                    st = pipe.backend.stats
                    res.decode_ms += st["decode_run_ms"] + st["decode_host_ms"]
                    res.decode_calls += st["decode_calls"]
                    res.first_divergence.append(first_divergence(ra.ids, ca.ids))
                    res.answer_len.append(len(ra.ids))
                    res.depth_agreement.append(depth_agreement(ra.depth, ca.depth))
                    res.trace_px.append(trace_error_px(ra.trace, ca.trace, *ra.image_size))
                    mm, deg, flips, n = action_errors(ra.actions, ca.actions)
                    res.action_mm.append(mm)
                    res.action_deg.append(deg)
                    res.gripper_flips.append(flips)
                    res.actions_compared.append(n)
                res.peak_rss = _status_kb("VmHWM")
                res.peak_scope = "while this candidate ran" if peak_ok else "process lifetime (no clear_refs)"
            finally:
                pipe.close()
            results.append(res)
            s = summarize(res)
            progress(f"candidate {ci + 1}/{len(candidates)} {res.label} ({res.scheme}): top-1 "
                     f"{s['top1_agreement']:.3f}, KL {s['kl']:.3g}, first divergence {s['first_divergence']:.0f}, "
                     f"depth {s['depth_agreement']:.3f}, trace {s['trace_px_error']:.1f} px, "
                     f"{s['action_error_mm']:.1f} mm / {s['action_error_deg']:.2f} deg, "
                     f"{s['ms_per_token']:.2f} ms/token ({time.perf_counter() - t0:.1f} s)")
        return ref_answers, results
    finally:
        ref_pipe.close()


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else float("nan")


def summarize(res: CandidateResult) -> dict:
    """The candidate's headline numbers (means over samples and answer positions)."""
    kl = np.concatenate(res.positions_kl) if res.positions_kl else np.zeros(0)
    agree = np.concatenate(res.positions_agree) if res.positions_agree else np.zeros(0, bool)
    agree_allowed = np.concatenate(res.positions_agree_allowed) if res.positions_agree_allowed else np.zeros(0, bool)
    seg = np.array([x for labels in res.positions_segment for x in labels])
    segments = {}
    for name in SEGMENTS:
        sel = seg == name
        segments[name] = {"tokens": int(sel.sum()),
                          "top1_agreement": float(agree[sel].mean()) if sel.any() else None,
                          "top1_agreement_allowed": float(agree_allowed[sel].mean()) if sel.any() else None,
                          "kl": float(kl[sel].mean()) if sel.any() else None}
    return {
        "top1_agreement": float(agree.mean()) if agree.size else float("nan"),
        "top1_agreement_allowed": float(agree_allowed.mean()) if agree_allowed.size else float("nan"),
        "kl": float(kl.mean()) if kl.size else float("nan"),
        "kl_max": float(kl.max()) if kl.size else float("nan"),
        "segments": segments,
        "first_divergence": float(np.median(res.first_divergence)) if res.first_divergence else float("nan"),
        "identical_answers": float(np.mean([d == n for d, n in zip(res.first_divergence, res.answer_len)]))
        if res.answer_len else float("nan"),
        "depth_agreement": _mean(res.depth_agreement),
        "trace_px_error": _mean(res.trace_px),
        "action_error_mm": _mean(res.action_mm),
        "action_error_deg": _mean(res.action_deg),
        "gripper_flips": int(sum(res.gripper_flips)),
        "actions_compared": int(sum(res.actions_compared)),
        "ms_per_token": res.decode_ms / res.decode_calls if res.decode_calls else float("nan"),
        "decode_calls": res.decode_calls,
        "peak_rss_bytes": res.peak_rss,
        "peak_rss_scope": res.peak_scope,
        "rss_added_bytes": res.rss_added,
    }
