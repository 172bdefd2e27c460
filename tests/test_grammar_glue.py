"""The grammar's official-glue mode: every glue gap forced to the fixture's official wording.

The golden answer is the fixture's `action_parsing.json` text 0 (written by the official code's
authors' wording, not by us); the variants are built from it by changing only the glue."""

from __future__ import annotations

import json

import numpy as np
import pytest
from grammar_answers import Answer, action_table

from molmoact_edge.runtime.engine.config import ConfigError, ModelConfig
from molmoact_edge.runtime.engine.grammar import OFFICIAL_GLUE, GrammarError, GrammarSpec, OutputGrammar


@pytest.fixture(scope="module")
def golden(fixture_a):
    return json.loads((fixture_a / "cases" / "action_parsing.json").read_text())["texts"][0]


def grammars(tokenizer, depth_codes, max_actions=1):
    return {mode: OutputGrammar.from_tokenizer(tokenizer, 7, depth_codes=depth_codes, max_actions=max_actions,
                                               glue=mode) for mode in ("free", "official")}


def forced_share(grammar, ids) -> tuple[int, bool]:
    """Tokens the grammar decides alone (forced spans) while reading ``ids``, and whether it reads them all."""
    s, i, forced = grammar.start(), 0, 0
    while i < len(ids):
        span = s.forced_span()
        if span:
            if ids[i:i + len(span)] != span:
                return forced, False
            for t in span:
                s.advance(t)
            forced, i = forced + len(span), i + len(span)
        elif s.is_allowed(ids[i]):
            s.advance(ids[i])
            i += 1
        else:
            return forced, False
    return forced, s.is_complete


def test_the_official_answer_is_accepted_and_its_glue_is_forced(golden, tokenizer_a):
    ids = tokenizer_a.encode(golden) + [tokenizer_a.special.eos]
    g = grammars(tokenizer_a, depth_codes=golden.count("<DEPTH_") - 2)  # the text has 20 codes
    free, ok_free = forced_share(g["free"], ids)
    forced, ok = forced_share(g["official"], ids)
    assert ok_free and ok
    glue = sum(len(v) for v in g["official"].forced_glue.values())
    print(f"forced tokens on the fixture's official answer: free glue {free}/{len(ids)}, official glue "
          f"{forced}/{len(ids)}")
    assert glue > 40 and forced >= free + glue


def test_official_answers_with_many_lists_are_accepted(tokenizer_a):
    table = action_table(tokenizer_a)
    g = grammars(tokenizer_a, depth_codes=100, max_actions=8)["official"]
    for n_lists in (1, 3, 8):
        ans = Answer(tuple(range(100)), ((140, 225), (115, 180)), ((0, 255, 17, 128, 82, 81, 3),) * n_lists, False,
                     (OFFICIAL_GLUE[0], OFFICIAL_GLUE[1].rstrip(), OFFICIAL_GLUE[2].rstrip(), OFFICIAL_GLUE[3]))
        assert g.start().accepts(ans.token_ids(tokenizer_a, table), complete=True), n_lists


def test_a_token_budget_counts_the_forced_glue(tokenizer_a):
    g = grammars(tokenizer_a, depth_codes=100, max_actions=8)
    glue = sum(len(v) for v in g["official"].forced_glue.values())
    shortest = g["official"].start().min_to_finish()
    assert shortest == g["free"].start().min_to_finish() + glue
    with pytest.raises(GrammarError, match="cannot hold"):
        g["official"].start(max_tokens=shortest - 1)
    rng = np.random.default_rng(0)
    for budget in (shortest, shortest + 7, 300):
        for _ in range(5):  # random walks through the allowed sets finish within the budget
            s = g["official"].start(max_tokens=budget)
            while not s.is_complete:
                s.advance(int(rng.choice(s.allowed_ids())))
            assert s.n_tokens <= budget


@pytest.mark.parametrize("where,replacement", [
    (0, "The depth map of the image is "),  # another wording
    (0, ""),  # no glue at all
    (1, ". Trajectory: "),
    (2, ". Based on these information, the action is "),
    (3, ". Done."),
])
def test_any_other_glue_is_refused_where_it_differs(tokenizer_a, where, replacement):
    table = action_table(tokenizer_a)
    g = grammars(tokenizer_a, depth_codes=100, max_actions=2)
    glue = [OFFICIAL_GLUE[0], OFFICIAL_GLUE[1].rstrip(), OFFICIAL_GLUE[2].rstrip(), OFFICIAL_GLUE[3]]
    glue[where] = replacement.rstrip() if where in (1, 2) else replacement
    ans = Answer(tuple(range(100)), ((1, 2),), ((5,) * 7,), False, tuple(glue))
    ids = ans.token_ids(tokenizer_a, table)
    assert g["free"].start().accepts(ids, complete=True)  # well-formed: only the wording differs
    assert not g["official"].start().accepts(ids)


def test_the_official_brackets_only(tokenizer_a):
    """A nested action chunk, a trace closed by "]]" without the period, and "]," after the last
    allowed list are all free-glue forms the official wording never uses."""
    table = action_table(tokenizer_a)
    g = grammars(tokenizer_a, depth_codes=100, max_actions=2)
    glue = (OFFICIAL_GLUE[0], OFFICIAL_GLUE[1].rstrip(), OFFICIAL_GLUE[2].rstrip(), OFFICIAL_GLUE[3])
    nested = Answer(tuple(range(100)), ((1, 2),), ((5,) * 7,), True, glue).token_ids(tokenizer_a, table)
    assert g["free"].start().accepts(nested, complete=True) and not g["official"].start().accepts(nested)
    flat = Answer(tuple(range(100)), ((1, 2),), ((5,) * 7,) * 2, False, glue)
    text = flat.text(table)
    trace_apart = text.replace("]]. Based", "]] . Based")
    ids = tokenizer_a.encode(trace_apart) + [tokenizer_a.special.eos]
    assert g["free"].start().accepts(ids, complete=True) and not g["official"].start().accepts(ids)
    one_too_many = tokenizer_a.encode(text[:-1] + ",.") + [tokenizer_a.special.eos]
    assert g["free"].start().accepts(one_too_many, complete=True)  # free: "]," then glue ",."
    assert not g["official"].start().accepts(one_too_many)


def test_the_mode_comes_from_the_checkpoint_config(checkpoint_a, tokenizer_a):
    data = json.loads((checkpoint_a / "config.json").read_text())
    assert ModelConfig.from_dict(data).answer_glue == "free"  # absent: free, as every released checkpoint
    g = OutputGrammar.from_config(ModelConfig.from_dict({**data, "answer_glue": "official"}), tokenizer_a)
    assert g.glue_forced and g.start().forced_span()[:3] == tokenizer_a.encode(OFFICIAL_GLUE[0])[:3]
    with pytest.raises(ConfigError, match="answer_glue"):
        ModelConfig.from_dict({**data, "answer_glue": "strict"})
    with pytest.raises(GrammarError, match="glue"):
        GrammarSpec(action_dim=7, glue="strict")
