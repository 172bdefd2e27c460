"""The demo policy's training path at a tiny size: data generation, teacher-forced training that
lowers the loss, the official-layout checkpoint the loader accepts, and the compact form that
`demo-policy` expands back into it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import import_or_skip

torch = import_or_skip("torch", "export")

from molmoact_edge.hardware.render_camera import SceneRenderer  # noqa: E402,F401  (first: MuJoCo's headless GL)
from molmoact_edge.export.demo_data import CHUNK, DataConfig, action_strings, generate, read_samples  # noqa: E402
from molmoact_edge.export.train_demo import (  # noqa: E402
    EMBED,
    HEAD,
    TrainConfig,
    Trainer,
    init_checkpoint,
    support_ids,
)
from molmoact_edge.runtime.engine.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from molmoact_edge.main import main

    out = tmp_path_factory.mktemp("train-demo")
    code = main(["train-demo", "--out", str(out), "--seeds", "1", "--path-samples", "1", "--random-samples", "0",
                 "--steps", "1", "--probe-scenes", "1"])
    assert code == 0
    return out


def test_train_demo_writes_a_loadable_checkpoint_and_its_compact_form(tiny_run, tmp_path):
    from molmoact_edge.export.checkpoint import load_model
    from molmoact_edge.main import main
    from molmoact_edge.runtime.control.convention import convention_for
    from molmoact_edge.runtime.engine.config import ModelConfig

    ckpt = tiny_run / "checkpoint"
    cfg = ModelConfig.load(ckpt)
    key = cfg.resolve_unnorm_key(None)  # one key: what `run --policy molmoact` picks without --unnorm-key
    assert key == "franka_tabletop_demo" and convention_for(key).delta_frame == "base"
    trained = load_model(ckpt).state_dict()
    npz = tiny_run / "demo-policy.npz"
    assert npz.stat().st_size < 8e6  # a few MB, not the 2 x 152k-row tables
    assert main(["demo-policy", "--weights", str(npz), "--out", str(tmp_path / "expanded")]) == 0
    expanded = load_model(tmp_path / "expanded").state_dict()
    support = support_ids(Tokenizer.from_checkpoint(ckpt))
    for k, v in trained.items():
        e = expanded[k]
        if k == HEAD:
            assert torch.allclose(e[support], v[support], atol=2e-3)
            off = np.setdiff1d(np.arange(v.shape[0]), support)
            assert not e[off].any() and not v[off].any()  # tokens the loss never saw score exactly 0
        elif k == EMBED:
            continue  # only the rows the prompts and answers use are kept
        else:
            assert torch.allclose(e, v, atol=2e-3, rtol=1e-3), k


@pytest.mark.slow
def test_teacher_forcing_lowers_the_loss(tiny_run):
    tr = Trainer(tiny_run / "checkpoint", tiny_run / "data", TrainConfig(steps=3, lr=3e-3, warmup=0, log_every=1))
    sample = tr.samples[0]
    with torch.no_grad():
        before = float(tr.loss(sample))
    tr.train(lambda *a: None)  # one sample: every step sees it
    with torch.no_grad():
        after = float(tr.loss(sample))
    assert after < before


def test_train_demo_refuses_evaluation_seeds(capsys):
    from molmoact_edge.main import main

    assert main(["train-demo", "--out", "/nonexistent", "--seeds", "1001"]) == 2
    assert "below 1000" in capsys.readouterr().err


def test_bad_rollout_flags_are_refused_before_any_work(tmp_path, capsys):
    from molmoact_edge.main import main

    out = tmp_path / "run"
    assert main(["train-demo", "--out", str(out), "--seeds", "1", "--rollouts-from", str(tmp_path)]) == 2
    assert "not a bundle" in capsys.readouterr().err
    assert main(["train-demo", "--out", str(out), "--seeds", "1", "--rollouts-from", str(tmp_path),
                 "--rollout-first-seed", "990", "--rollout-scenes", "20"]) == 2
    assert "below 1000" in capsys.readouterr().err
    assert not out.exists()  # no checkpoint initialised, nothing rendered


def test_resume_continues_from_the_written_weights(tiny_run, tmp_path, capsys):
    """--resume starts from --out/checkpoint's weights (a fresh start would re-draw them from the
    seed); without a checkpoint it is a usage error."""
    import shutil

    from safetensors.numpy import load_file

    from molmoact_edge.main import main

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    before = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert main(["train-demo", "--out", str(out), "--seeds", "1", "--steps", "1", "--lr", "1e-9", "--resume"]) == 0
    after = load_file(str(out / "checkpoint" / "model.safetensors"))
    key = "model.transformer.blocks.0.mlp.ff_proj.weight"  # the first training step moved it by ~1e-5
    assert np.allclose(before[key], after[key], rtol=0, atol=1e-7)  # continued (lr ~0), not re-initialised
    assert main(["train-demo", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_the_vit_feature_standardisation_is_folded_exactly(tiny_run):
    """The pooling attention's projections of the raw (frozen) ViT features equal the initial
    projections of the standardised features, so training starts from features of unit scale."""
    plain = Trainer(tiny_run / "checkpoint", tiny_run / "data", TrainConfig(steps=1, standardize_vit=False))
    folded = Trainer(tiny_run / "checkpoint", tiny_run / "data", TrainConfig(steps=1))
    feats = plain._cached(plain.samples[0])[3].to(torch.float32)
    feats = feats.reshape(-1, feats.shape[-1])
    mean, std = feats.mean(0), feats.std(0)  # the one sample is all the statistics see
    p0 = plain.model.model.vision_backbone.image_pooling_2d
    p1 = folded.model.model.vision_backbone.image_pooling_2d
    with torch.no_grad():
        for a, b in ((p0.wq, p1.wq), (p0.wk, p1.wk), (p0.wv, p1.wv)):
            assert torch.allclose(b(feats), a((feats - mean) / std), atol=1e-3)
            assert not torch.allclose(b(feats), a(feats), atol=1e-1)
    assert not any(p.requires_grad for p in folded.model.model.vision_backbone.image_vit.parameters())


def test_the_shared_prefix_group_loss_equals_the_per_sample_losses(tiny_run):
    """One image's samples (each object named in turn) share the prompt up to the instruction; the
    trainer runs that prefix once. Its loss and gradients must be those of the samples run apart."""
    tr = Trainer(tiny_run / "checkpoint", tiny_run / "data", TrainConfig(steps=1, standardize_vit=False,
                                                                         grounding_weight=1.0))
    with torch.no_grad():
        tr.grounding_head.normal_()  # zero at the start of training: give the grounding term a gradient
    group = tr.groups[0]
    assert len(group) == 3 and len({s["instruction"] for s in group}) == 3
    params = tr.parameters()
    grads = []
    for loss in (tr.group_loss(group), torch.stack([tr.loss(s) for s in group]).mean()):
        grads.append((float(loss), torch.autograd.grad(loss, params, allow_unused=True)))
    (a, ga), (b, gb) = grads
    assert a == pytest.approx(b, rel=1e-5)
    # float32 sums in another order: noise in proportion to the largest gradient
    scale = max(float(y.abs().max()) for y in gb if y is not None)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.allclose(x, y, rtol=1e-3, atol=1e-6 * scale)


def test_digits_in_an_answer_are_exactly_its_trace_numbers(tiny_run):
    """`trace_weight` weighs every digit token of an answer: that must select the trace's numbers and
    nothing else (no depth code or action value may be spelled with a digit token)."""
    tr = Trainer(tiny_run / "checkpoint", tiny_run / "data", TrainConfig(steps=1, standardize_vit=False))
    for s in tr.samples:
        answer = tr._cached(s)[1]
        digits = "".join(tr.tok.decode([int(t)]) for t in answer[torch.isin(answer, tr.digits)])
        trace = s["answer"].split(" The trajectory of the end effector in the first image is ")[1].split(". Based")[0]
        assert digits == "".join(ch for ch in trace if ch.isdigit()) and digits


def test_each_part_of_an_answer_gets_its_own_loss_weight(tiny_run):
    """The action weight must land on exactly the action lists (CHUNK x 7 action strings and their
    brackets, as the answer spells them), the trace weight on the trace digits, the depth weight on
    the 100 codes, and nothing else may be weighted."""
    tr = Trainer(tiny_run / "checkpoint", tiny_run / "data",
                 TrainConfig(steps=1, standardize_vit=False, depth_weight=0.5, trace_weight=3.0, action_weight=7.0))
    table = action_strings(tr.tok)
    for s in tr.samples:
        answer = tr._cached(s)[1]
        w = tr._token_weights(answer)
        lists = s["answer"].split("the action that the robot should take is ")[1]
        values = [v.strip(" [].") for v in lists.split(",")]
        assert len(values) == CHUNK * 7 and all(v in table for v in values)
        assert tr.tok.decode(answer[w == 7.0].tolist()) == " " + lists
        assert int((w == 0.5).sum()) == 100 and int((w == 3.0).sum()) == int(torch.isin(answer, tr.digits).sum())
        assert set(w.unique().tolist()) == {0.5, 1.0, 3.0, 7.0}


def test_the_demo_vit_is_the_fixed_design(tiny_run):
    """Every feature layer of the written checkpoint's ViT is the patch embedding: channels
    [0, POSITION_CHANNELS) depend on the patch position only, the others on its pixels only."""
    from molmoact_edge.export.checkpoint import load_model
    from molmoact_edge.export.train_demo import POSITION_CHANNELS

    vit = load_model(tiny_run / "checkpoint", torch.float32).model.vision_backbone.image_vit
    n, pixels = vit.positional_embedding.shape[0], vit.patch_embedding.in_features
    a, b = torch.randn(1, n, pixels), torch.randn(1, n, pixels)
    with torch.no_grad():
        fa, fb = vit(a), vit(b)
        for f in fa:
            assert torch.equal(f, fa[0])
        pos, content = slice(0, POSITION_CHANNELS), slice(POSITION_CHANNELS, None)
        assert torch.equal(fa[0][..., pos], fb[0][..., pos])  # the pixels do not reach the position channels
        assert not torch.allclose(fa[0][..., content], fb[0][..., content])
        rows = fa[0][0, :, pos]
        assert torch.unique(rows, dim=0).shape[0] == n  # every patch position has its own code
        same_pixels = vit(a[:, :1].expand(1, n, pixels).contiguous())[0][0, :, content]
        assert torch.allclose(same_pixels, same_pixels[:1].expand_as(same_pixels))  # no position in the content


def test_the_probe_swaps_the_instruction_and_the_image_of_held_out_frames(tiny_run):
    from molmoact_edge.export.demo_data import read_samples
    from molmoact_edge.hardware.scene import Scene

    probe = read_samples(tiny_run / "probe")
    assert {s["seed"] for s in probe} == {1000} and len(probe) == len(Scene.from_seed(1000).objects)
    tr = Trainer(tiny_run / "checkpoint", tiny_run / "data", TrainConfig(steps=1, standardize_vit=False))
    samples = [dict(s, image=str(tiny_run / "probe" / s["image"])) for s in probe] + tr.samples
    loss = tr.probe(samples)
    assert set(loss) == {"as_is", "other_instruction", "other_image", "grounding"}
    assert loss.pop("grounding") is None  # the grounding loss is off
    assert all(np.isfinite(v) and v > 0 for v in loss.values())
    # even random weights see their inputs: a swap that did nothing would leave the loss unchanged
    assert loss["other_instruction"] != loss["as_is"] and loss["other_image"] != loss["as_is"]
    # with it on, the read-out's error; at its zero start, the mean square of the [-1, 1] positions
    grounded = Trainer(tiny_run / "checkpoint", tiny_run / "data",
                       TrainConfig(steps=1, standardize_vit=False, grounding_weight=3.0)).probe(samples)
    want = np.mean([((x / 160 - 1) ** 2 + (y / 120 - 1) ** 2) / 2 for x, y in (s["object_px"] for s in samples)])
    assert grounded["grounding"] == pytest.approx(want, rel=1e-5)


def test_the_grounding_loss_asks_the_colour_word_where_the_named_object_lies(tiny_run):
    """The training-only read-out sits on the instruction's colour word (its first occurrence, after
    the image) and targets the named object's projected centre in [-1, 1] image coordinates."""
    tr = Trainer(tiny_run / "checkpoint", tiny_run / "data", TrainConfig(steps=1, standardize_vit=False,
                                                                         grounding_weight=2.0))
    for s in tr.samples:
        prompt = tr._cached(s)[0]
        p = tr._colour_position(prompt)
        colour = s["instruction"].split()[3]
        assert int(prompt[p]) == tr.tok.encode(f" {colour}")[0]
        assert p > int((prompt == tr.cfg.image_patch_id).nonzero().max())  # the instruction follows the image
        row = torch.zeros(tr.cfg.llm.hidden_size)  # zero read-out: the loss is the target's own square
        x, y = s["object_px"]
        want = 2.0 * ((x / 160 - 1) ** 2 + (y / 120 - 1) ** 2) / 2
        assert float(tr._grounding_loss(row, s)) == pytest.approx(want, rel=1e-5)
    assert float(Trainer(tiny_run / "checkpoint", tiny_run / "data",
                         TrainConfig(steps=1, standardize_vit=False, grounding_weight=0.0))._grounding_loss(row, s)) == 0
    with pytest.raises(ValueError, match="freeze_vit"):
        TrainConfig(freeze_vit=False, freeze_connector=True)


def test_a_frozen_connector_stays_at_its_initial_weights(tiny_run):
    tr = Trainer(tiny_run / "checkpoint", tiny_run / "data", TrainConfig(steps=2, lr=3e-3, warmup=0, standardize_vit=False,
                                                                         freeze_connector=True))
    vb = tr.model.model.vision_backbone
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.train(lambda *a: None)
    after = tr.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("model.vision_backbone."))
    assert not torch.equal(before["model.transformer.blocks.0.mlp.ff_proj.weight"],
                           after["model.transformer.blocks.0.mlp.ff_proj.weight"])  # the LLM did train
    assert not any(p.requires_grad for p in (*vb.image_pooling_2d.parameters(), *vb.image_projector.parameters()))


def test_the_fixed_connector_passes_the_vit_features_through_linearly(tmp_path):
    """Each image row is the mean of its 2x2 patches' first 63 ViT channels times one gain: linear,
    so where a patch lies (its sine/cosine channels) reaches the LLM unblurred."""
    from molmoact_edge.export.checkpoint import load_model

    model = load_model(init_checkpoint(tmp_path / "ckpt", linear_connector=True), torch.float32)
    vb = model.model.vision_backbone
    feats = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [1, 3, 5, 7]])
    with torch.no_grad():
        out = vb.pool(feats, idx)
    gain = float(torch.nn.functional.silu(torch.tensor(8.0))) / 8.0
    want = torch.stack([feats[i, :63].mean(0) for i in idx]) * gain
    assert torch.allclose(out[:, :63], want, atol=1e-5)
    assert not out[:, 63:].any()
    with torch.no_grad():  # and linear in the features: doubling them doubles the rows
        assert torch.allclose(vb.pool(2 * feats, idx), 2 * out, atol=1e-5)


def test_rollouts_from_a_bundle_add_expert_labelled_frames_of_the_poses_it_visits(tiny_run, tmp_path, fixture_a):
    """train-demo --rollouts-from (DAgger): the tiny run's own checkpoint, exported, rolled out on a
    training scene; each kept pose becomes a frame under two names (one file), every instruction of
    the scene posed, its answer the expert's from that pose."""
    import os
    import shutil

    from molmoact_edge.export.demo_data import NORM_STATS, STEP_M
    from molmoact_edge.export.onnx_export import export_bundle
    from molmoact_edge.main import main
    from molmoact_edge.runtime.control.expert import DEMO_UNNORM_KEY, expert_actions
    from molmoact_edge.runtime.engine.actions import ActionDecoder
    from molmoact_edge.runtime.engine.config import ActionStats
    from molmoact_edge.runtime.engine.parser import parse_step

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    bundle = export_bundle(out / "checkpoint", tmp_path / "bundle", progress=lambda s: None)
    before = len(read_samples(out / "data"))
    args = ["train-demo", "--out", str(out), "--seeds", "1", "--steps", "1", "--resume", "--probe-scenes", "0",
            "--rollouts-from", str(bundle), "--rollout-scenes", "1", "--rollout-first-seed", "5", "--rollout-steps", "3"]
    assert main(args) == 0
    added = read_samples(out / "data")[before:]
    images = sorted({s["image"] for s in added})
    assert images and all(s["seed"] == 5 for s in added) and len(added) == 3 * len(images)
    for a in (i for i in images if i.endswith("a.png")):
        b = a[:-5] + "b.png"
        assert b in images and os.path.samefile(out / "data" / a, out / "data" / b)
    tok = Tokenizer.from_checkpoint(fixture_a / "checkpoint")
    dec = ActionDecoder(base_vocab=tok.rust.get_vocab(with_added_tokens=False), base_vocab_size=tok.special.base_vocab_size,
                        stats=ActionStats.from_json(DEMO_UNNORM_KEY, NORM_STATS[DEMO_UNNORM_KEY]), unnorm_key=DEMO_UNNORM_KEY)
    for s in added:
        p = parse_step(s["answer"], dec, depth_codes=100, codebook_size=128)
        want = expert_actions(np.array(s["ee"]), np.array(s["goal"]), STEP_M, CHUNK)
        assert p.ok and np.abs(p.actions[:, :3] - want[:, :3]).max() <= 2 * STEP_M / 255
    assert main(args[:-8] + ["--rollouts-from", str(bundle), "--rollout-first-seed", "999", "--rollout-scenes", "2"]) == 2


def test_the_shipped_demo_policy_expands_exports_and_finds_the_named_object(tmp_path, capsys):
    """The weights in the package (session 8's run rf3: 17 of 20 held-out closed-loop episodes):
    `demo-policy` without --weights expands them into the official layout, the loader and export
    accept it, on held-out rendered frames its trace ends on the named object (the issue's trace
    criterion) and its first step from the start pose goes down, as the expert's does, and the torch
    reference and the bundle agree on every greedy id."""
    from molmoact_edge.export.checkpoint import load_model
    from molmoact_edge.export.demo_data import heldout_frames
    from molmoact_edge.main import main
    from molmoact_edge.runtime.engine.pipeline import open_bundle

    ckpt, bundle = tmp_path / "ckpt", tmp_path / "bundle"
    assert main(["demo-policy", "--out", str(ckpt)]) == 0
    load_model(ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(bundle)]) == 0
    capsys.readouterr()
    assert main(["eval", "--bundle", str(bundle), "--seed", "1000", "--episodes", "2", "--trace-frames", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames"] == 4 and report["trace_hit_rate"] == 1.0, report
    rgb, instruction, _, _ = next(heldout_frames([1002], 1))  # the start pose
    with open_bundle(bundle) as pipe:
        res = pipe.act([rgb], instruction, max_new_tokens=512, max_actions=CHUNK)
    assert res.parsed.ok and res.actions[0][2] < -0.005 and abs(res.actions[0][0]) < 0.002, res.actions

    # The parity machinery of a released checkpoint: the torch reference straight from the checkpoint
    # folder and the bundle on onnxruntime give the same greedy ids, through the same command.
    from PIL import Image

    Image.fromarray(rgb).save(tmp_path / "frame.png")
    ids = {}
    for source in (["--checkpoint", str(ckpt)], ["--bundle", str(bundle)]):
        assert main(["generate", *source, "--image", str(tmp_path / "frame.png"), "--instruction", instruction,
                     "--max-new-tokens", "512", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["parse_errors"] == [], out["parse_errors"]
        ids[source[0]] = out["token_ids"]
    assert ids["--checkpoint"] == ids["--bundle"] and len(ids["--bundle"]) > 200
