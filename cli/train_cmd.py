"""`molmoact-edge train-demo`: train the demo policy on expert data from the rendered tabletop.

    molmoact-edge train-demo --out DIR [--seeds 200] [--steps 3000]

Writes DIR/data (rendered samples in MolmoAct's answer format, training seeds 0..N-1, all < 1000),
DIR/checkpoint (official MolmoAct layout, loadable and exportable like a released checkpoint) and
DIR/demo-policy.npz (the compact form that `molmoact-edge demo-policy --weights` expands). Runs on
the CPU with torch; nice it on a shared machine (`nice -n 10 molmoact-edge train-demo ...`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from molmoact_edge.argtypes import non_negative_int, positive_int
from molmoact_edge.errors import UsageError

TRACE_WEIGHT = 1.0  # TrainConfig's defaults (not imported from there: that module needs torch)
GROUNDING_WEIGHT = 0.0
ACTION_WEIGHT = 1.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for the data, the checkpoint and the compact weights")
    p.add_argument("--seeds", type=positive_int, default=200, help="training scenes: seeds 0..N-1 (N <= 1000)")
    p.add_argument("--path-samples", type=positive_int, default=6, help="frames per scene on the straight line from the start pose to the goal")
    p.add_argument("--random-samples", type=non_negative_int, default=4, help="frames per scene from random arm positions")
    p.add_argument("--hover-samples", type=non_negative_int, default=0,
                   help="frames per scene from random arm positions at the goal's height, where the expert moves across")
    p.add_argument("--descent-samples", type=non_negative_int, default=0,
                   help="frames per scene on the expert's way down from the start pose (the last near the goal's height)")
    p.add_argument("--near-goal-samples", type=non_negative_int, default=0,
                   help="frames per scene within 5 cm of the goal at its height, where the expert's steps shrink")
    p.add_argument("--single-object-scenes", type=non_negative_int, default=0,
                   help="also this many scenes with one object (seeds --seeds.., all below 1000): where it lies is "
                        "then all the image tells, the first step of finding the named one among three")
    p.add_argument("--steps", type=positive_int, default=3000, help="optimiser steps (one image each, under every instruction it poses)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--trace-weight", type=float, default=TRACE_WEIGHT, help="loss weight of each trace digit")
    p.add_argument("--action-weight", type=float, default=ACTION_WEIGHT, help="loss weight of each token of the action lists")
    p.add_argument("--grounding-weight", type=float, default=GROUNDING_WEIGHT,
                   help="weight of the training-only loss that asks the instruction's colour word where its object "
                        "lies in the image (0: off)")
    p.add_argument("--fixed-connector", action="store_true",
                   help="a connector that passes the fixed ViT's features through linearly, never trained (features "
                        "cached per image); with --resume: keep the checkpoint's connector as it is")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--seed", type=int, default=0, help="weight initialisation and sample order")
    p.add_argument("--save-every", type=int, default=0, help="also write the checkpoint every this many steps")
    p.add_argument("--probe-scenes", type=non_negative_int, default=10,
                   help="held-out scenes (seeds 1000..) whose frames measure, at every save, whether the model reads "
                        "the instruction and the image (Trainer.probe); 0: none")
    p.add_argument("--rollouts-from", type=Path, default=None, metavar="BUNDLE",
                   help="DAgger: before training, roll this bundle out on training scenes and add the poses it "
                        "visits, labelled by the expert, to --out/data (export/demo_rollout.py)")
    p.add_argument("--rollout-scenes", type=positive_int, default=30, help="three-object scenes to roll out on")
    p.add_argument("--rollout-first-seed", type=non_negative_int, default=0,
                   help="their seeds: this one and the next --rollout-scenes - 1 (below 1000)")
    p.add_argument("--rollout-steps", type=positive_int, default=45, help="answers per rollout at most")
    p.add_argument("--resume", action="store_true",
                   help="continue from the weights in --out/checkpoint (a fresh learning-rate schedule of --steps)")


def run(args: argparse.Namespace) -> int:
    if args.seeds > 1000:
        raise UsageError(f"--seeds {args.seeds}: training seeds must stay below 1000 (evaluation uses 1000 and up)")
    if args.seeds + args.single_object_scenes > 1000:
        raise UsageError(f"--seeds {args.seeds} + --single-object-scenes {args.single_object_scenes}: training seeds "
                         "must stay below 1000 (evaluation uses 1000 and up)")
    rollout_seeds = range(args.rollout_first_seed, args.rollout_first_seed + args.rollout_scenes)
    if args.rollouts_from is not None:  # checked before the minutes of rendering and training below
        if rollout_seeds[-1] >= 1000:
            raise UsageError(f"--rollout-first-seed {args.rollout_first_seed} + --rollout-scenes {args.rollout_scenes}: "
                             "rollout seeds must stay below 1000 (evaluation uses 1000 and up)")
        if not (args.rollouts_from / "manifest.json").exists():
            raise UsageError(f"--rollouts-from {args.rollouts_from}: not a bundle (no manifest.json); export one with "
                             "`molmoact-edge demo-policy` and `molmoact-edge export`")
    from molmoact_edge.hardware.render_camera import SceneRenderer  # noqa: F401  (first: headless GL for MuJoCo)
    from molmoact_edge.export.demo_data import DataConfig, generate
    from molmoact_edge.export.train_demo import (
        DEMO_SIZE,
        TrainConfig,
        Trainer,
        init_checkpoint,
        save_compact,
        size_dict,
        write_weights,
    )
    from molmoact_edge.export.demo_data import NORM_STATS

    try:
        tconf = TrainConfig(steps=args.steps, lr=args.lr, threads=args.threads, seed=args.seed, trace_weight=args.trace_weight,
                            action_weight=args.action_weight,
                            grounding_weight=args.grounding_weight, freeze_connector=args.fixed_connector,
                            save_every=max(0, args.save_every), standardize_vit=not args.resume)
    except ValueError as e:
        raise UsageError(str(e)) from e
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    out = args.out
    data, ckpt = out / "data", out / "checkpoint"
    if args.resume:
        if not (ckpt / "model.safetensors").exists():
            raise UsageError(f"--resume: {ckpt} holds no checkpoint to continue from; drop --resume to start one")
        ckpt_init = ckpt
    else:
        ckpt_init = init_checkpoint(ckpt, args.seed, linear_connector=args.fixed_connector)
    from molmoact_edge.runtime.engine.tokenizer import Tokenizer

    render = not (data / "samples.jsonl").exists()
    tokenizer = Tokenizer.from_checkpoint(ckpt_init) if render or args.rollouts_from is not None else None
    if render:
        single = tuple(range(args.seeds, args.seeds + args.single_object_scenes))
        say(f"rendering expert samples for seeds 0..{args.seeds - 1}"
            + (f" and single-object seeds {single[0]}..{single[-1]}" if single else "") + f" into {data}")
        generate(data, DataConfig(seeds=tuple(range(args.seeds)), path_samples=args.path_samples,
                                  random_samples=args.random_samples, hover_samples=args.hover_samples,
                                  descent_samples=args.descent_samples, near_goal_samples=args.near_goal_samples,
                                  single_object_seeds=single),
                 tokenizer, say)
    if args.rollouts_from is not None:
        from molmoact_edge.export.demo_rollout import add_rollouts

        say(f"rolling {args.rollouts_from} out on training scenes {rollout_seeds[0]}..{rollout_seeds[-1]}")
        got = add_rollouts(data, args.rollouts_from, rollout_seeds, tokenizer, args.rollout_steps, args.threads, say)
        say(f"rollouts: {got['reached']} of {got['scenes']} reached the goal; added {got['images']} frames "
            f"({got['samples']} samples)")
    trainer = Trainer(ckpt, data, tconf)
    probe_samples = []
    if args.probe_scenes > 0:
        from molmoact_edge.export.demo_data import read_samples, write_probe_set

        probe = out / "probe"
        if not (probe / "samples.jsonl").exists():
            write_probe_set(probe, range(1000, 1000 + args.probe_scenes), trainer.tok)
        probe_samples = [dict(s, image=str(probe / s["image"])) for s in read_samples(probe)]
    say(f"training {len(trainer.samples)} samples, {tconf.steps} steps, loss over {len(trainer.support)} "
        "support tokens")

    def save(step: int, summary: dict | None = None):
        if probe_samples:
            loss = trainer.probe(probe_samples)
            say(f"step {step}: held-out trace-digit loss {loss['as_is']:.3f}; with another object's instruction "
                f"{loss['other_instruction']:.3f}, with another image {loss['other_image']:.3f}"
                + (f"; grounding read-out error {loss['grounding']:.4f}" if loss["grounding"] is not None else ""))
            if summary is not None:
                summary["probe"] = loss
        sd = trainer.state_dict()
        write_weights(ckpt, sd)
        meta = {"size": size_dict(DEMO_SIZE), "norm_stats": NORM_STATS, "train": summary or {"steps_done": step},
                "seeds": [0, args.seeds - 1]}
        say(f"step {step}: wrote {ckpt}")
        return save_compact(sd, trainer.support.numpy(), set(trainer.rows.tolist()), out / "demo-policy.npz", meta)

    summary = trainer.train(say, on_save=save)
    npz = save(tconf.steps, summary)
    summary.update(checkpoint=str(ckpt), compact=str(npz), compact_bytes=npz.stat().st_size)
    print(json.dumps(summary))
    return 0
