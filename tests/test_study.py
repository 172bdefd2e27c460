"""The quantisation study (`molmoact-edge study`) on fixture A: the JSON read back and checked field
by field for every candidate (the reference against itself must give agreement 1, KL 0 and no error;
a quantised bundle must not), the per-layer sensitivity recomputed independently for one layer, the
proposed --keep-float recipe applied by quantize, and the metric helpers on known geometry."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("torch", reason="the torch side: pip install '.[export]' (absent on a robot install)")
pytest.importorskip("matplotlib", reason="the study's plots: pip install 'molmoact-edge[study]'")
import onnx
import torch

from molmoact_edge.main import main
from molmoact_edge.quantization import study
from molmoact_edge.quantization.quantize import quantize_bundle
from molmoact_edge.quantization.recipes import recipe_for

QUIET = {"progress": lambda s: None}
# 1 sample and a short answer keep the CI run small; 150 tokens still fit the grammar's 100 depth codes,
# a trace and an action list
SMALL = ["--samples", "1", "--max-new-tokens", "150"]
FIELDS = ("top1_agreement", "kl", "first_divergence", "depth_agreement", "trace_px_error", "action_error_mm",
          "action_error_deg", "gripper_flips", "bytes", "ms_per_token")


@pytest.fixture(scope="module")
def int8_bundle(bundle_a, checkpoint_a, tmp_path_factory):
    return quantize_bundle(checkpoint_a, tmp_path_factory.mktemp("study") / "int8-wo", recipe_for("int8-wo"),
                           base_bundle=bundle_a, **QUIET)


@pytest.fixture(scope="module")
def study_run(bundle_a, int8_bundle, checkpoint_a, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "report"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["study", "--reference", str(bundle_a), "--candidates", str(bundle_a), str(int8_bundle),
                   "--out", str(out), "--checkpoint", str(checkpoint_a), *SMALL])
    assert rc == 0, err.getvalue()
    return out, json.loads((out / "report.json").read_text()), err.getvalue()


def test_study_writes_report_json_and_plots(study_run, bundle_a, int8_bundle):
    out, rep, log = study_run
    ref_label, q_label = bundle_a.name, int8_bundle.name
    assert set(rep["candidates"]) == {ref_label, q_label}
    assert "candidate 1/2" in log and "candidate 2/2" in log  # progress lines per candidate
    n_ref = rep["reference"]["answer_tokens"][0]
    assert rep["data"]["split"] == "evaluation" and rep["data"]["samples"] == 1
    for label, c in rep["candidates"].items():
        for f in FIELDS:
            assert c[f] is not None and math.isfinite(c[f]), (label, f, c[f])
        assert 0 <= c["top1_agreement"] <= 1 and 0 <= c["top1_agreement_allowed"] <= 1
        assert c["kl"] >= 0 and 0 <= c["depth_agreement"] <= 1
        assert 0 <= c["first_divergence"] <= n_ref
        assert c["trace_px_error"] >= 0 and c["action_error_mm"] >= 0 and c["action_error_deg"] >= 0
        assert 0 <= c["gripper_flips"] <= c["actions_compared"] and c["actions_compared"] >= 1
        assert c["bytes"] > 0 and c["bytes_per_token"] > 0 and c["ms_per_token"] > 0
        assert c["peak_rss_bytes"] > 0
        # segments come from the runtime grammar: 100 depth codes + <DEPTH_END>, and they cover the answer
        assert c["segments"]["depth"]["tokens"] == 101
        assert sum(s["tokens"] for s in c["segments"].values()) == n_ref
        assert c["task_success"] is None  # no trained policy: no number, and the report says why
    same, q = rep["candidates"][ref_label], rep["candidates"][q_label]
    assert same["top1_agreement"] == 1 and same["top1_agreement_allowed"] == 1 and same["kl"] == 0
    assert same["first_divergence"] == n_ref and same["identical_answers"] == 1 and same["depth_agreement"] == 1
    assert same["trace_px_error"] == 0 and same["action_error_mm"] == 0 and same["action_error_deg"] == 0
    assert same["gripper_flips"] == 0
    # the quantised bundle really differs, and is smaller on disk and per token
    assert q["kl"] > 0 and q["kl_max"] > 0
    assert q["bytes"] < same["bytes"] and q["bytes_per_token"] < same["bytes_per_token"]
    assert rep["task_success_note"] and "issue 16" in rep["task_success_note"]
    for png in rep["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(rep["plots"]) == {"error_vs_position.png", "action_error_cdf.png", "layer_sensitivity.png"}
    md = (out / "report.md").read_text()
    assert q_label in md and "Per-layer sensitivity" in md and rep["sensitivity"]["proposed"]["command"] in md


def test_sensitivity_matches_an_independent_one_layer_quantisation(study_run, bundle_a, checkpoint_a):
    """lm_head alone in INT4 (fake-quantised here from the recipe's rounding rule, not by the module
    swap the study uses): KL over the reference answer equals the study's number."""
    from molmoact_edge.export.checkpoint import load_model
    from molmoact_edge.export.torch_backend import TorchBackend
    from molmoact_edge.quantization.fake_quant import fake_quant_weight
    from molmoact_edge.runtime.engine.pipeline import ModelSpec

    _, rep, _ = study_run
    sens = rep["sensitivity"]
    rows = {r["layer"]: r for r in sens["layers"]}
    assert len(rows) == 9 and all(r["kl"] > 0 for r in rows.values())  # INT4 moves every layer
    assert [r["kl"] for r in sens["layers"]] == sorted((r["kl"] for r in sens["layers"]), reverse=True)
    p = sens["proposed"]
    # the most sensitive layers in rank order that fit the parameter budget, at most keep_top of them
    total, expect, used = sum(r["params"] for r in sens["layers"]), [], 0
    for r in sens["layers"]:
        if len(expect) < p["keep_top"] and used + r["params"] <= p["keep_budget"] * total:
            expect, used = expect + [r["layer"]], used + r["params"]
    assert p["keep_float"] == expect and expect and f"--keep-float {','.join(expect)}" in p["command"]
    assert p["kl"] < sens["whole_recipe"]["kl"]

    _, samples = study.load_samples(None, "evaluation", 1)
    ids = rep["reference"]["answer_ids"][0]
    spec = ModelSpec.load(checkpoint_a)
    inputs = spec.inputs(samples[0].images, samples[0].instruction)
    model = load_model(checkpoint_a, torch.float32)
    base = study.teacher_forced_logits(TorchBackend(model), inputs, ids)
    r = recipe_for("int4-rtn")
    with torch.no_grad():
        w = model.lm_head.weight
        w.copy_(fake_quant_weight(w, r.bits, r.group_for(w.shape[1])))
    quant = study.teacher_forced_logits(TorchBackend(model), inputs, ids)
    lp, lq = torch.log_softmax(torch.from_numpy(base).double(), -1), torch.log_softmax(torch.from_numpy(quant).double(), -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert rows["lm_head"]["kl"] == pytest.approx(kl, rel=1e-6)


def test_quantize_keeps_the_proposed_layers_in_float(bundle_a, checkpoint_a, tmp_path):
    """--keep-float: the named layer keeps its float weight (the checkpoint's, bit for bit), every other
    layer is quantised, and the manifest says which layers were kept."""
    from onnx import numpy_helper

    from molmoact_edge.export.checkpoint import load_model
    from molmoact_edge.runtime.engine.pipeline import open_bundle

    keep = "transformer.blocks.1.mlp.ff_out"
    out = quantize_bundle(checkpoint_a, tmp_path / "mixed", recipe_for("int4-rtn"), base_bundle=bundle_a,
                          keep_float=[keep], **QUIET)
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["keep_float"] == [keep] and f"{keep}: fp32" in q["kept_in_higher_precision"]
    g = onnx.load(str(out / "llm.onnx")).graph
    nodes = {n.name: n for n in g.node if n.name.startswith("linear/")}
    assert nodes[f"linear/{keep}"].op_type == "MatMul"
    assert sorted(n.removesuffix("_Q4") for n, node in nodes.items() if node.op_type == "MatMulNBits") == \
        sorted(f"linear/{layer}" for layer in q["linear_layers"] if layer != keep)
    w = {t.name: t for t in g.initializer}[nodes[f"linear/{keep}"].input[1]]
    ref = load_model(checkpoint_a, torch.float32).model.transformer.blocks[1].mlp.ff_out.weight.detach().numpy()
    np.testing.assert_array_equal(numpy_helper.to_array(w), ref.T)
    with open_bundle(out) as pipe:  # the mixed bundle runs
        assert len(pipe.step([np.zeros((64, 64, 3), np.uint8)], "pick up the cup", max_new_tokens=3).result.token_ids) == 3
    with pytest.raises(ValueError, match="not linear layers of this model.*accepted"):
        quantize_bundle(checkpoint_a, tmp_path / "bad", recipe_for("int4-rtn"), base_bundle=bundle_a,
                        keep_float=["transformer.blocks.9.mlp.ff_out"], **QUIET)


def test_study_refuses_a_folder_that_is_not_a_bundle(bundle_a, tmp_path, capsys):
    assert main(["study", "--reference", str(bundle_a), "--candidates", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "is not a bundle" in capsys.readouterr().err


def test_metric_helpers_on_known_geometry():
    assert study.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert study.first_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert study.first_divergence([1, 2], [1, 2, 3]) == 2
    assert study.depth_agreement([1, 2, 3, 4], [1, 0, 3]) == 0.5
    # 255 trace units span the image: x 0 -> 255 on a 101-px-wide image is 100 px
    assert study.trace_error_px([[0, 0]], [[255, 0]], 101, 51) == pytest.approx(100)
    # the shorter trace stays at its last point: errors 0 and 50 px
    assert study.trace_error_px([[0, 0], [0, 255]], [[0, 0]], 101, 51) == pytest.approx(25)
    ref = np.array([[0.01, 0, 0, 0, 0, 0, 1.0], [0, 0, 0, 0, 0, 0, -1.0]])
    cand = np.array([[0.01, 0.003, 0.004, 0, 0, math.radians(2), 1.0], [0, 0, 0, 0, 0, 0, 0.5]])
    mm, deg, flips, n = study.action_errors(ref, cand)
    assert (mm, deg, flips, n) == (pytest.approx(2.5), pytest.approx(1.0), 1, 2)
    a = np.array([[0.0, 1.0, 2.0]])
    assert study.kl_rows(a, a)[0] == 0
    p, q = np.exp(a) / np.exp(a).sum(), np.exp(a[:, ::-1]) / np.exp(a[:, ::-1]).sum()
    assert study.kl_rows(a, a[:, ::-1])[0] == pytest.approx(float((p * np.log(p / q)).sum()))


def test_segments_follow_the_runtime_grammar(checkpoint_a, tokenizer_a, config_a):
    """A hand-written answer, tokenised by the real tokenizer: the depth tokens are exactly the codes
    and <DEPTH_END>, the trace tokens spell the points, the action tokens the action strings."""
    from molmoact_edge.runtime.engine.grammar import OutputGrammar

    g = OutputGrammar.from_config(config_a, tokenizer_a)
    vocab = tokenizer_a.rust.get_vocab(with_added_tokens=False)
    base = tokenizer_a.special.base_vocab_size
    by_id = {i: s for s, i in vocab.items()}
    strings = [by_id[base - 1 - r] for r in (3, 40, 100, 7, 0, 200, 128)]  # action strings as the model spells them
    depth = "".join(f"<DEPTH_{c}>" for c in range(100))
    text = (f"The depth map is <DEPTH_START>{depth}<DEPTH_END>. The trace is [[12, 200], [30, 41]]. The action is "
            f"[{', '.join(strings)}].")
    ids = tokenizer_a.encode(text) + [tokenizer_a.special.eos]
    labels = study.segment_labels(g, ids, max_tokens=None)

    def spelled(seg):
        return tokenizer_a.decode([t for t, s in zip(ids, labels) if s == seg], skip_special_tokens=False)

    assert spelled("depth") == depth + "<DEPTH_END>"
    assert "12, 200], [30, 41]" in spelled("trace") and "The" not in spelled("trace")
    assert all(s in spelled("actions") for s in strings) and "action is" not in spelled("actions")
    # the tokens that open a part (<DEPTH_START>, "[[", "[") are glue: the grammar leaves glue on them
    assert spelled("glue") == "The depth map is <DEPTH_START>. The trace is [[ The action is [<|endoftext|>"


def test_task_success_runs_each_candidate_closed_loop(bundle_a, tmp_path, capsys):
    """--task-episodes: every candidate drives the rendered tabletop through the real loop on the same
    seeds, and the report carries the result (fixture A is random: the episode only has to run and be
    counted; the trained policy's numbers are in the README)."""
    from control_helpers import sim_available

    if not sim_available():
        pytest.skip("needs franky-sim: pip install '.[sim]'")
    out = tmp_path / "report"
    rc = main(["study", "--reference", str(bundle_a), "--candidates", str(bundle_a), "--out", str(out), *SMALL,
               "--task-episodes", "1", "--task-seed", "1003", "--task-limit", "2"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    t = rep["candidates"][bundle_a.name]["task_success"]
    assert t["seeds"] == [1003] and t["episodes"] == 1 and t["stopped"] is None
    assert t["successes"] in (0, 1) and t["success_rate"] == t["successes"]
    assert t["min_distance_m"][0] is not None and t["min_distance_m"][0] > 0  # the episode measured the arm
    assert rep["task_success_note"] is None and "| success | seeds |" in (out / "report.md").read_text()
    assert main(["study", "--reference", str(bundle_a), "--candidates", str(bundle_a), "--out", str(out),
                 "--task-episodes", "1", "--task-seed", "5"]) == 2  # training seeds
