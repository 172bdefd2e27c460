"""How much decode work the output grammar saves, and what it costs per step.

    python -m molmoact_edge.benchmarks.grammar_steps CHECKPOINT_DIR [--answers 50]

Answers are written in the official wording (fixture text 0: one action list; a nested chunk of 8)
with random depth codes, trace points and action bins, tokenised by the checkpoint's tokenizer.
"Forced" tokens are the ones ``GrammarState.forced_span`` hands out: the decode loop appends them
in one multi-token forward instead of one step each.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
from molmoact_edge.runtime.engine.config import ModelConfig
from molmoact_edge.runtime.engine.constrain import greedy_pick, mask_logits
from molmoact_edge.runtime.engine.grammar import OutputGrammar
from molmoact_edge.runtime.engine.tokenizer import Tokenizer

GLUE = ("The depth map of the first image is ", ". The trajectory of the end effector in the first image is",
        ". Based on these information, along with other images from different camera views as additional "
        "information, the action that the robot should take is", ".")


def official_answer(rng, table, n_actions: int, depth_codes: int = 100) -> str:
    depth = "".join(f"<DEPTH_{c}>" for c in rng.integers(0, 128, depth_codes))
    pts = rng.integers(0, 256, (int(rng.integers(1, 6)), 2))
    trace = "[" + ", ".join(f"[{x}, {y}]" for x, y in pts) + "]"
    lists = ", ".join("[" + ", ".join(table[b] for b in rng.integers(0, 256, 7)) + "]" for _ in range(n_actions))
    if n_actions > 1:
        lists = "[" + lists + "]"
    return f"{GLUE[0]}<DEPTH_START>{depth}<DEPTH_END>{GLUE[1]} {trace}{GLUE[2]} {lists}{GLUE[3]}"


def forced_share(grammar: OutputGrammar, ids: list[int]) -> tuple[int, Counter]:
    state, i, by_phase = grammar.start(), 0, Counter()
    while i < len(ids):
        span = state.forced_span()
        if span:
            assert ids[i:i + len(span)] == span, "the grammar forced a token the answer does not have"
            for t in span:
                by_phase[state.phase_name] += 1
                state.advance(t)
            i += len(span)
        else:
            state.advance(ids[i])
            i += 1
    assert state.is_complete
    return sum(by_phase.values()), by_phase


def per_call_us(fn, n: int = 2000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--answers", type=int, default=50)
    args = ap.parse_args(argv)
    tok = Tokenizer.from_checkpoint(args.checkpoint)
    config = ModelConfig.load(args.checkpoint)
    builds = []
    for _ in range(3):
        t0 = time.perf_counter()
        grammar = OutputGrammar.from_config(config, tok, max_actions=8)
        builds.append(time.perf_counter() - t0)
    print(f"automaton build: {np.median(builds) * 1e3:.0f} ms (median of 3)")

    base = tok.special.base_vocab_size
    table = [tok.id_to_token(base - 1 - r) for r in range(config.n_action_bins)]
    rng = np.random.default_rng(0)
    for n_actions in (1, 8):
        totals, forced, phases = [], [], Counter()
        for _ in range(args.answers):
            ids = tok.encode(official_answer(rng, table, n_actions)) + [tok.special.eos]
            f, by = forced_share(grammar, ids)
            totals.append(len(ids))
            forced.append(f)
            phases += by
        share = sum(forced) / sum(totals)
        print(f"{n_actions} action(s): {np.mean(totals):.1f} tokens, {np.mean(forced):.1f} forced "
              f"({share:.1%}); forced by part: "
              + ", ".join(f"{k} {v / args.answers:.1f}" for k, v in phases.items()))

    ids = tok.encode(official_answer(rng, table, 8)) + [tok.special.eos]
    logits = rng.standard_normal(config.llm.vocab_size).astype(np.float32)
    glue = grammar.start()
    glue.advance(ids[0])
    inside = grammar.start()
    for t in ids[:len(ids) - 20]:
        inside.advance(t)
    for name, st in (("glue state", glue), ("action-list state", inside)):
        print(f"{name}: allowed_mask {per_call_us(st.allowed_mask):.1f} us, forced_span "
              f"{per_call_us(st.forced_span):.1f} us, greedy_pick {per_call_us(lambda: greedy_pick(logits, st)):.1f} us,"
              f" mask_logits {per_call_us(lambda: mask_logits(logits, st), 500):.1f} us")
    t0 = time.perf_counter()
    state = grammar.start()
    for t in ids:
        state.advance(t)
    print(f"advance: {(time.perf_counter() - t0) / len(ids) * 1e6:.1f} us per token over a {len(ids)}-token answer")


if __name__ == "__main__":
    main()
