"""Speculative decoding on the torch reference, on fixture A and on a second random checkpoint of
other sizes (nothing in the drafts may depend on fixture A's widths or depths): the ids equal plain
greedy decoding on the same backend, grammar on and off, and a draft of the answer itself needs at
most 0.15 sequential forwards per emitted token."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="the torch reference: pip install '.[export]' (absent on a robot install)")
from conftest import GoldenCase
from draft_helpers import assert_same_ids, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from molmoact_edge.export.tiny import TinySize, write_checkpoint
from molmoact_edge.export.torch_backend import open_checkpoint

# other widths, depths, heads and seed than fixture A (LLM hidden 32, 2 layers, 4/2 heads)
OTHER = TinySize(vit_hidden=24, vit_heads=2, vit_mlp=40, vit_layers=9, adapter_heads=2, projector_hidden=40,
                 llm_hidden=48, llm_heads=6, llm_kv_heads=3, llm_mlp=72, llm_layers=3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # two threads on a shared, loaded CPU make each tiny forward ~10x slower; the numbers are the
    # same for plain and drafted runs either way
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("other") / "ckpt", OTHER, seed=11)


@pytest.fixture(scope="module")
def pipes(fixture_a, other_checkpoint):
    out = {"a": open_checkpoint(fixture_a / "checkpoint"), "other": open_checkpoint(other_checkpoint)}
    yield out
    for p in out.values():
        p.close()


@pytest.mark.parametrize("which", ["a", "other"])
@pytest.mark.parametrize("grammar_on", [True, False], ids=["grammar", "no-grammar"])
def test_torch_drafted_ids_equal_greedy(pipes, fixture_a, which, grammar_on):
    pipe = pipes[which]
    case = GoldenCase(fixture_a, "single_256")
    inputs = pipe.spec.inputs(case.images(), case.instruction, case.template)
    other = pipe.spec.inputs(case.images(), "wipe the table with the sponge", case.template)
    grammar = pipe.grammar(None, 8) if grammar_on else None
    budget = 600 if grammar_on else 240
    plain = run(pipe, inputs, budget, grammar)
    ids = plain.token_ids
    earlier = run(pipe, other, budget, grammar).token_ids
    wrong = [t if i % 7 else (t + 1) % 151000 for i, t in enumerate(ids)]
    for what, draft in {"own": ids, "other instruction": earlier, "partly wrong": wrong, "empty": []}.items():
        got = run(pipe, inputs, budget, grammar, draft=draft)
        assert_same_ids(pipe, inputs, ids, got.token_ids, budget, grammar, f"{which} {what}")
        assert got.forwards <= plain.forwards
        if what == "own":
            assert got.forwards / len(got.token_ids) <= 0.15, (got.forwards, len(got.token_ids))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(draft=st.lists(st.integers(0, 152069), max_size=120), grammar_on=st.booleans(), k=st.integers(1, 16))
def test_torch_random_drafts_never_change_the_ids(pipes, fixture_a, draft, grammar_on, k):
    pipe = pipes["a"]
    case = GoldenCase(fixture_a, "single_256")
    inputs = pipe.spec.inputs(case.images(), case.instruction, case.template)
    grammar = pipe.grammar(None, 8) if grammar_on else None
    cache = test_torch_random_drafts_never_change_the_ids.__dict__.setdefault("cache", {})
    if grammar_on not in cache:
        cache[grammar_on] = run(pipe, inputs, 400, grammar).token_ids
    ids = cache[grammar_on]
    draft = draft[:30] + ids[40:100] + draft[30:]  # random ids around a slice of the right answer
    got = run(pipe, inputs, 400, grammar, draft=draft, k=k, min_k=1, max_k=32)
    assert_same_ids(pipe, inputs, ids, got.token_ids, 400, grammar, "random draft")


def test_generate_draft_from_on_a_checkpoint_of_other_sizes(other_checkpoint, fixture_a, tmp_path):
    """The command a user runs: `generate --checkpoint` twice, the second drafted from the first."""
    case = GoldenCase(fixture_a, "single_256")
    base = [sys.executable, "-m", "molmoact_edge", "generate", "--checkpoint", str(other_checkpoint), "--image",
            str(case.image_paths[0]), "--instruction", case.instruction, "--max-new-tokens", "600", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread
    first = subprocess.run(base, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr
    (tmp_path / "prev.json").write_text(first.stdout)
    second = subprocess.run(base + ["--draft-from", str(tmp_path / "prev.json")], capture_output=True, text=True,
                            timeout=600, env=env)
    assert second.returncode == 0, second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert b["token_ids"] == a["token_ids"] and b["draft_tokens"] > 0
    assert b["llm_forwards"] / b["new_tokens"] <= 0.15
