"""Constrained greedy decoding: the mask never changes a well-formed greedy answer and always
turns an arbitrary logits source into a parseable one."""

from __future__ import annotations

import numpy as np
import pytest
from grammar_answers import action_table, answers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molmoact_edge.runtime.engine.actions import ActionDecoder
from molmoact_edge.runtime.engine.config import ModelConfig
from molmoact_edge.runtime.engine.constrain import greedy_pick, mask_logits
from molmoact_edge.runtime.engine.grammar import GrammarError, OutputGrammar
from molmoact_edge.runtime.engine.parser import parse_step
from molmoact_edge.runtime.engine.tokenizer import Tokenizer

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])
OUTPUT_VOCAB = 152064  # llm.vocab_size of the fixture: ids above are input-only


@pytest.fixture(scope="module")
def decoder(config_a, tokenizer_a):
    return ActionDecoder.from_checkpoint(config_a, tokenizer_a)


@pytest.fixture(scope="module")
def grammar(tokenizer_a, decoder):
    return OutputGrammar.from_tokenizer(tokenizer_a, 7, max_actions=8, glue_budget=48, decoder=decoder)


# Gaussian noise rows drawn once: fresh 152k-entry draws per step would dominate the test time.
_BANK = np.random.default_rng(0).standard_normal((32, OUTPUT_VOCAB)).astype(np.float32)


def noise(rng):
    return _BANK[rng.integers(len(_BANK))] * np.float32(rng.uniform(0.5, 2.0)) + np.float32(rng.standard_normal())


class TargetLogits:
    """A stand-in model: while the prefix follows ``target`` its argmax spells the next target
    token (by ``margin`` over Gaussian noise on every other id); off the target, pure noise."""

    def __init__(self, target, seed, margin=0.5):
        self.target, self.margin = list(target), margin
        self.rng = np.random.default_rng(seed)

    def __call__(self, prefix):
        row = noise(self.rng)
        i = len(prefix)
        if prefix == self.target[:i] and i < len(self.target):
            row[self.target[i]] = row.max() + self.margin
        return row


def decode(source, eos, state=None, max_new=700, use_forced=True):
    out = []
    while len(out) < max_new:
        if state is not None and use_forced:
            span = state.forced_span()
            if span:  # appended without asking the model: the steps a decode loop can skip
                for t in span:
                    state.advance(t)
                out += span
                if state.is_complete:
                    break
                continue
        logits = source(out)
        t = greedy_pick(logits, state)
        if state is not None:
            assert t == int(np.argmax(mask_logits(logits, state)))
            state.advance(t)
        out.append(t)
        if t == eos or (state is not None and state.is_complete):
            break
    return out


@SETTINGS
@given(ans=answers(action_dim=7, max_actions=8), seed=st.integers(0, 2**32 - 1))
def test_masked_greedy_equals_plain_greedy_on_well_formed_output(grammar, tokenizer_a, ans, seed):
    target = ans.token_ids(tokenizer_a, action_table(tokenizer_a))
    eos = tokenizer_a.special.eos
    plain = decode(TargetLogits(target, seed), eos)
    assert plain == target  # the source's unconstrained greedy answer is the well-formed one
    for use_forced in (False, True):
        masked = decode(TargetLogits(target, seed), eos, grammar.start(), use_forced=use_forced)
        assert masked == plain


@pytest.mark.parametrize("seed", range(3))
def test_random_logits_always_give_a_parseable_answer(grammar, tokenizer_a, decoder, seed):
    rng = np.random.default_rng(seed)
    state = grammar.start()
    out = decode(lambda prefix: noise(rng), tokenizer_a.special.eos, state)
    assert state.is_complete and out[-1] == tokenizer_a.special.eos
    step = parse_step(tokenizer_a.decode(out), decoder)
    assert step.ok, step.parse_errors
    assert len(step.depth) == 100 and 1 <= len(step.trace) <= 5 and 1 <= len(step.actions) <= 8
    # unconstrained, the same noise never spells an answer
    rng = np.random.default_rng(seed)
    plain = decode(lambda prefix: noise(rng), tokenizer_a.special.eos, max_new=300)
    assert not parse_step(tokenizer_a.decode(plain), decoder).ok


def test_mask_logits_and_greedy_pick_edges(grammar, tokenizer_a):
    state = grammar.start()
    row = np.zeros(OUTPUT_VOCAB, dtype=np.float32)
    row[tokenizer_a.special.eos] = 5.0  # EOS is not allowed before the answer
    row[tokenizer_a.special.depth_start] = 1.0
    masked = mask_logits(row, state)
    assert masked.dtype == np.float32 and masked.shape == row.shape
    assert masked[tokenizer_a.special.eos] == -np.inf and masked[tokenizer_a.special.depth_start] == 1.0
    assert greedy_pick(row) == tokenizer_a.special.eos
    assert greedy_pick(row, state) == tokenizer_a.special.depth_start
    assert mask_logits(np.stack([row, row]), state).shape == (2, OUTPUT_VOCAB)
    # ties go to the lowest allowed id, as np.argmax does
    flat = np.zeros(OUTPUT_VOCAB, dtype=np.float32)
    assert greedy_pick(flat, state) == int(np.flatnonzero(state.allowed_mask())[0])
    with pytest.raises(ValueError, match="float"):
        mask_logits(np.zeros(10, dtype=np.int32), state)
    with pytest.raises(ValueError, match="entries"):
        mask_logits(np.zeros(len(tokenizer_a) + 1, dtype=np.float32), state)
    state.advance(tokenizer_a.special.depth_start)  # now only depth codes (ids > 151000): none in a 100-entry row
    with pytest.raises(GrammarError, match="no token"):
        greedy_pick(np.zeros(100, dtype=np.float32), state)
    with pytest.raises(GrammarError, match="no token"):
        mask_logits(np.zeros(100, dtype=np.float32), state)
