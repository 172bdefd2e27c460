"""Speculative decoding with drafts (runtime/engine/drafts.py, the decode loop in generate.py), on
onnxruntime and the real tokenizer; no torch, so this runs on a robot install too.

Exactness is checked against plain greedy decoding on the same backend with good, partly wrong,
empty and random drafts, grammar on and off. Segment alignment is checked on answers written as
text and tokenised by the real tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import GoldenCase, case_id, golden_cases
from draft_helpers import assert_same_ids, run
from grammar_answers import Answer, action_table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from molmoact_edge.runtime.engine.drafts import (
    Drafter,
    NgramLookup,
    PreviousAnswer,
    SegmentCursor,
    SegmentTable,
)
from molmoact_edge.runtime.engine.generate import _draft
from molmoact_edge.runtime.engine.grammar import OutputGrammar
from molmoact_edge.runtime.engine.pipeline import open_bundle

CASES = golden_cases()
MAX_NEW = 600


@pytest.fixture(scope="module")
def table(tokenizer_a):
    return SegmentTable.from_tokenizer(tokenizer_a)


def _answer(points, lists, nested=False, glue=("The depth is ", ". The trace is", ". The action is", ".")):
    return Answer(tuple(range(100)), tuple(points), tuple(lists), nested, glue)


@pytest.mark.parametrize("nested", [False, True])
def test_segments_are_the_depth_block_each_trace_point_and_each_action(tokenizer_a, table, nested):
    ans = _answer([(1, 2), (30, 40), (255, 7)], [(0, 1, 2, 3, 4, 5, 6), (7, 7, 7, 7, 7, 7, 7)], nested)
    ids = ans.token_ids(tokenizer_a, action_table(tokenizer_a))
    starts = table.segments(ids)
    bracketed = sorted(k for k in starts if k[0] != "text")
    assert bracketed == [("action", 0), ("action", 1), ("depth", 0), ("trace", 0), ("trace", 1), ("trace", 2)]
    text = tokenizer_a.decode
    assert text(ids[starts[("depth", 0)]:starts[("depth", 0)] + 1]) == "<DEPTH_START>"
    # each action segment starts at its own opening bracket and spells its own list
    a1 = text(ids[starts[("action", 1)]:])
    assert a1.lstrip(" [").startswith(action_table(tokenizer_a)[7])
    assert "[" not in text(ids[starts[("trace", 1)] + 1:starts[("trace", 2)]])


def test_previous_answer_realigns_actions_after_a_longer_trace(tokenizer_a, table):
    """The previous answer has one trace point more: its actions are still drafted for ours."""
    acts = action_table(tokenizer_a)
    prev = _answer([(1, 2), (30, 40), (50, 60)], [(5,) * 7, (9,) * 7]).token_ids(tokenizer_a, acts)
    cur = _answer([(1, 2), (30, 40)], [(5,) * 7, (9,) * 7]).token_ids(tokenizer_a, acts)
    src = PreviousAnswer(table, prev)
    start = table.segments(cur)[("action", 0)]
    cursor = SegmentCursor(table)
    for t in cur[:start + 1]:  # ours has just opened its first action list
        cursor.advance(t)
    assert src.propose(cur[:start + 1], cursor, 8) == cur[start + 1:start + 9]
    # aligned by position alone the draft would be the previous answer's third trace point
    assert prev[start + 1:start + 9] != cur[start + 1:start + 9]


def test_a_segment_longer_than_its_previous_one_gets_no_draft(tokenizer_a, table):
    acts = action_table(tokenizer_a)
    prev = _answer([(1, 2)], [(5,) * 7], glue=("a ", "b", "c", ".")).token_ids(tokenizer_a, acts)
    cur = _answer([(1, 2)], [(5,) * 7], glue=("a much longer glue before the depth block ", "b", "c", "."))
    cur = cur.token_ids(tokenizer_a, acts)
    cursor = SegmentCursor(table)
    for t in cur[:6]:
        cursor.advance(t)
    assert cursor.key == ("text", None) and PreviousAnswer(table, prev).propose(cur[:6], cursor, 4) == []


def test_ngram_lookup_continues_a_repeat():
    src = NgramLookup(max_n=3, min_n=2)
    assert src.propose([1, 2, 3, 4, 5, 9, 2, 3], None, 3) == [4, 5, 9]
    assert src.propose([1, 2, 3], None, 3) == []


def test_forbidden_drafted_tokens_are_cut_and_forced_spans_appended(tokenizer_a, config_a, table):
    grammar = OutputGrammar.from_config(config_a, tokenizer_a, max_actions=2)
    acts = action_table(tokenizer_a)
    ans = _answer([(1, 2)], [(5,) * 7]).token_ids(tokenizer_a, acts)
    dstart = ans.index(tokenizer_a.special.depth_start)
    state, cursor = grammar.start(max_tokens=MAX_NEW), SegmentCursor(table)
    for t in ans[:dstart + 1]:
        state.advance(t)
        cursor.advance(t)
    # 99 good depth codes, then a glue token where the 100th code belongs: cut there
    bad = tokenizer_a.encode(" hello")[0]
    prev = ans[:dstart + 100] + [bad] + ans[dstart + 100:]
    drafter = Drafter(table, [PreviousAnswer(table, prev)], k=150, max_k=200)
    got = _draft(drafter, state, ans[:dstart + 1], cursor, MAX_NEW, tokenizer_a.special.eos)
    assert got == ans[dstart + 1:dstart + 100]
    # the same draft without the grammar is not cut
    drafter = Drafter(table, [PreviousAnswer(table, prev)], k=150, max_k=200)
    got = _draft(drafter, None, ans[:dstart + 1], cursor, MAX_NEW, tokenizer_a.special.eos)
    assert got[99] == bad
    # a draft ending on the 100th code is extended by the forced <DEPTH_END> (certain once accepted)
    drafter = Drafter(table, [PreviousAnswer(table, ans[:dstart + 101])], k=150, max_k=200)
    got = _draft(drafter, state, ans[:dstart + 1], cursor, MAX_NEW, tokenizer_a.special.eos)
    assert got == ans[dstart + 1:dstart + 102] and got[-1] == tokenizer_a.special.depth_end


def test_draft_length_adapts_to_acceptance(table):
    d = Drafter(table, [], k=8, min_k=2, max_k=32)
    d.update(8, 8)
    assert d.k == 16
    d.update(16, 16)
    d.update(32, 32)
    assert d.k == 32
    d.update(32, 3)
    assert d.k == 8
    d.update(8, 0)
    assert d.k == 2


def test_bad_draft_ids_are_refused(table):
    with pytest.raises(ValueError, match="outside this tokenizer's range"):
        PreviousAnswer(table, [1, 2, 10**9])


# -- exactness on onnxruntime ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ort_pipes(bundles):
    pipes = {}
    yield lambda fixture: pipes.setdefault(fixture, open_bundle(bundles[fixture]))
    for p in pipes.values():
        p.close()


def _setup(pipe, fixture, name, grammar_on):
    case = GoldenCase(fixture, name)
    inputs = pipe.spec.inputs(case.images(), case.instruction, case.template)
    grammar = pipe.grammar(None, 8) if grammar_on else None
    other = pipe.spec.inputs(case.images(), "wipe the table with the sponge", case.template)
    return inputs, grammar, other


def _budget(grammar_on: bool) -> int:
    # random weights never end on their own: without the grammar every answer runs to the budget,
    # so a smaller one keeps the test short; with it the answer ends (~400 tokens) inside 600
    return MAX_NEW if grammar_on else 240


@pytest.mark.parametrize("grammar_on", [True, False], ids=["grammar", "no-grammar"])
@pytest.mark.parametrize("item", CASES, ids=[case_id(c) for c in CASES])
def test_onnxruntime_drafted_ids_equal_greedy(ort_pipes, item, grammar_on):
    """Every golden case: drafted from its own answer and from another instruction's, the ids are
    those of plain greedy decoding; its own answer needs <= 0.15 sequential forwards a token."""
    fixture, name = item
    pipe = ort_pipes(fixture)
    inputs, grammar, other = _setup(pipe, fixture, name, grammar_on)
    budget = _budget(grammar_on)
    plain = run(pipe, inputs, budget, grammar)
    ids = plain.token_ids
    earlier = run(pipe, other, budget, grammar).token_ids  # another instruction's answer: partly right
    got = run(pipe, inputs, budget, grammar, draft=earlier)
    assert_same_ids(pipe, inputs, ids, got.token_ids, budget, grammar, f"{name} other instruction")
    assert got.forwards <= plain.forwards and got.drafts.accepted_tokens <= got.drafts.draft_tokens
    own = run(pipe, inputs, budget, grammar, draft=ids)
    assert_same_ids(pipe, inputs, ids, own.token_ids, budget, grammar, f"{name} own answer")
    assert own.forwards / len(own.token_ids) <= 0.15, (own.forwards, len(own.token_ids))
    assert own.drafts.accepted_tokens > 0.9 * len(ids)


@pytest.mark.parametrize("grammar_on", [True, False], ids=["grammar", "no-grammar"])
def test_onnxruntime_wrong_and_odd_drafts_keep_the_ids(ort_pipes, fixture_a, grammar_on):
    pipe = ort_pipes(fixture_a)
    inputs, grammar, _ = _setup(pipe, fixture_a, "single_256", grammar_on)
    budget = _budget(grammar_on)
    plain = run(pipe, inputs, budget, grammar)
    ids = plain.token_ids
    rng = np.random.default_rng(0)
    wrong = list(ids)
    for i in rng.choice(len(ids), size=len(ids) // 10, replace=False):
        wrong[i] = int(rng.integers(0, 152000))  # one token in ten replaced
    drafts = {"partly wrong": wrong, "empty": [], "truncated": ids[: len(ids) // 2], "shifted": [ids[0]] + ids}
    for what, draft in drafts.items():
        got = run(pipe, inputs, budget, grammar, draft=draft)
        assert_same_ids(pipe, inputs, ids, got.token_ids, budget, grammar, what)
        assert got.forwards <= plain.forwards
    assert run(pipe, inputs, budget, grammar, draft=[]).drafts.draft_tokens == 0
    got = run(pipe, inputs, budget, grammar, ngram=True)
    assert_same_ids(pipe, inputs, ids, got.token_ids, budget, grammar, "n-gram")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_random_drafts_never_change_the_ids(ort_pipes, fixture_a, data):
    pipe = ort_pipes(fixture_a)
    grammar_on = data.draw(st.booleans(), label="grammar")
    budget = _budget(grammar_on)
    cache = test_random_drafts_never_change_the_ids.__dict__.setdefault("cache", {})
    inputs, grammar, _ = _setup(pipe, fixture_a, "single_256", grammar_on)
    if grammar_on not in cache:
        cache[grammar_on] = run(pipe, inputs, budget, grammar).token_ids
    ids = cache[grammar_on]
    # random ids, random slices of the answer itself, and mixtures of both
    piece = st.one_of(st.lists(st.integers(0, 152069), max_size=40),
                      st.tuples(st.integers(0, len(ids)), st.integers(0, 80)).map(lambda a: ids[a[0]:a[0] + a[1]]))
    draft = [t for part in data.draw(st.lists(piece, max_size=12), label="draft") for t in part]
    k = data.draw(st.integers(1, 24), label="k")
    got = run(pipe, inputs, budget, grammar, draft=draft, ngram=data.draw(st.booleans(), label="ngram"),
              k=k, min_k=1, max_k=max(k, data.draw(st.integers(1, 64), label="max_k")))
    assert_same_ids(pipe, inputs, ids, got.token_ids, budget, grammar, "random draft")


# -- the command line --------------------------------------------------------------------------

@pytest.mark.parametrize("grammar_flag", [[], ["--no-grammar"]], ids=["grammar", "no-grammar"])
def test_generate_draft_from_previous_json(bundles, tmp_path, grammar_flag):
    """`generate --draft-from` on every fixture's bundle: the ids of the same command without a draft,
    with a draft from another input's answer or from its own; its own needs <= 0.15 forwards a token."""
    for fixture, bundle in bundles.items():
        case = GoldenCase(fixture, "single_256")
        base = [sys.executable, "-m", "molmoact_edge", "generate", "--bundle", str(bundle), "--image",
                str(case.image_paths[0]), "--max-new-tokens", str(_budget(not grammar_flag)), "--json",
                *grammar_flag]

        def gen(instruction, draft=None, base=base):
            cmd = base + ["--instruction", instruction] + ([] if draft is None else ["--draft-from", str(draft)])
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            return json.loads(proc.stdout)

        plain = gen(case.instruction)
        earlier = tmp_path / f"{fixture.name}-earlier.json"
        earlier.write_text(json.dumps(gen("wipe the table with the sponge")))
        own = tmp_path / f"{fixture.name}-own.json"
        own.write_text(json.dumps(plain))
        for draft in (earlier, own):
            d = gen(case.instruction, draft)
            assert d["token_ids"] == plain["token_ids"], draft
            assert d["new_tokens"] == plain["new_tokens"] and d["llm_forwards"] <= plain["llm_forwards"]
            segs = d["draft_segments"]
            assert sum(s["draft_tokens"] for s in segs.values()) == d["draft_tokens"] > 0
            assert sum(s["accepted_tokens"] for s in segs.values()) == d["accepted_tokens"]
        assert d["llm_forwards"] / d["new_tokens"] <= 0.15, d["llm_forwards"]
        assert plain["draft_tokens"] == plain["accepted_tokens"] == 0


def test_a_rejected_source_yields_its_turn_once(table):
    class Fixed:
        def __init__(self, ids):
            self.ids = ids

        def propose(self, answer, cursor, n):
            return self.ids[:n]

    first, second = Fixed([1, 2, 3]), Fixed([7, 8])
    d = Drafter(table, [first, second], k=4)
    assert d.propose([], None, 4) == [1, 2, 3]
    d.update(3, 0)  # nothing of it accepted: the next proposal comes from the other source
    assert d.propose([], None, 4) == [7, 8]
    d.update(2, 1)
    assert d.propose([], None, 4) == [1, 2, 3]
