"""The output grammar automaton over the fixture's real tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from grammar_answers import Answer, action_table, answers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molmoact_edge.runtime.engine.actions import ActionDecoder
from molmoact_edge.runtime.engine.config import ModelConfig
from molmoact_edge.runtime.engine.events import ActionComplete, DepthComplete, Finished, TraceComplete
from molmoact_edge.runtime.engine.grammar import GrammarError, GrammarSpec, OutputGrammar
from molmoact_edge.runtime.engine.parser import parse_actions, parse_step
from molmoact_edge.runtime.engine.tokenizer import Tokenizer

K = 8
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def decoder(checkpoint_a, tokenizer_a):
    return ActionDecoder.from_checkpoint(ModelConfig.load(checkpoint_a), tokenizer_a, "fractal20220817_data")


@pytest.fixture(scope="module")
def grammar(tokenizer_a, decoder):
    return OutputGrammar.from_tokenizer(tokenizer_a, 7, n_action_bins=256, depth_codes=100, max_actions=K,
                                        glue_budget=64, decoder=decoder)


@pytest.fixture(scope="module")
def table(tokenizer_a):
    return action_table(tokenizer_a)


def feed(state, ids, check_forced=True):
    """Advance token by token, checking each is allowed and every forced span matches the rest."""
    events = []
    for i, t in enumerate(ids):
        if check_forced:
            span = state.forced_span()
            assert list(ids[i:i + len(span)]) == span, f"forced span {span} disagrees at token {i}"
        assert state.allowed_mask()[t], f"token {i} ({t}) not allowed in {state.phase_name}"
        events += state.advance(t)
    return events


@SETTINGS
@given(ans=answers(action_dim=7, max_actions=K))
def test_well_formed_answers_are_accepted_and_read_back(grammar, tokenizer_a, decoder, table, ans):
    ids = ans.token_ids(tokenizer_a, table)
    state = grammar.start()
    events = feed(state, ids)
    assert state.is_complete
    kinds = [type(e) for e in events]
    assert kinds == [DepthComplete, TraceComplete] + [ActionComplete] * len(ans.lists) + [Finished]
    assert events[0].codes == ans.codes
    assert events[1].points == ans.points and not events[1].steered
    base = tokenizer_a.special.base_vocab_size
    acts = [e for e in events if isinstance(e, ActionComplete)]
    assert [list(e.ids) for e in acts] == [[base - 1 - r for r in ranks] for ranks in ans.lists]
    # values agree with the official-equivalent text parser on the decoded answer
    text = tokenizer_a.decode(ids, skip_special_tokens=True)
    np.testing.assert_array_equal(np.stack([e.values for e in acts]), parse_actions(text, decoder))
    step = parse_step(text, decoder)
    assert step.ok, step.parse_errors
    assert step.depth == list(ans.codes) and step.trace == [list(p) for p in ans.points]
    assert events[-1].n_actions == len(ans.lists)


def test_fixture_text_zero_shape_is_accepted(grammar, tokenizer_a, table):
    # the fixture's realistic answer, with a full 100-code depth block
    ans = Answer(tuple(range(100)), ((140, 225), (130, 212), (121, 198), (115, 180)),
                 ((255, 0, 140, 242, 42, 192, 255),), False,
                 ("The depth map of the first image is ", ". The trajectory of the end effector in the first image is",
                  ". Based on these information, along with other images from different camera views as additional "
                  "information, the action that the robot should take is", "."))
    assert grammar.start().accepts(ans.token_ids(tokenizer_a, table), complete=True)


def _reject_at(grammar, ids, index, state=None):
    state = state or grammar.start()
    feed(state, ids[:index], check_forced=False)
    assert not state.allowed_mask()[ids[index]]
    with pytest.raises(GrammarError, match=str(ids[index])):
        state.advance(ids[index])
    assert not grammar.start().accepts(ids[:index + 1])


def _first(ids, token_id, start=0):
    return ids.index(token_id, start)


@SETTINGS
@given(ans=answers(action_dim=7, max_actions=K), kind=st.sampled_from(
    ["depth_short", "depth_long", "trace_big", "trace_zero_lead", "trace_six", "action_word", "quoted",
     "too_many_lists", "short_list", "early_eos", "no_depth"]), data=st.data())
def test_malformed_answers_are_rejected_at_the_first_invalid_token(grammar, tokenizer_a, table, ans, kind, data):
    enc = tokenizer_a.encode
    eos = tokenizer_a.special.eos
    if kind == "depth_short":
        bad = Answer(ans.codes[:99], *_rest(ans, 1))
        ids = bad.token_ids(tokenizer_a, table)
        return _reject_at(grammar, ids, _first(ids, tokenizer_a.special.depth_end))
    if kind == "depth_long":
        bad = Answer(ans.codes + (5,), *_rest(ans, 1))
        ids = bad.token_ids(tokenizer_a, table)
        return _reject_at(grammar, ids, _first(ids, tokenizer_a.special.depth_end) - 1)
    glue0 = ans.glue[0] + "<DEPTH_START>" + "".join(f"<DEPTH_{c}>" for c in ans.codes) + "<DEPTH_END>" + ans.glue[1]
    if kind in ("trace_big", "trace_zero_lead", "trace_six"):
        if kind == "trace_big":
            v = data.draw(st.integers(256, 999))
            prefix, bad_digit = glue0 + f" [[{ans.points[0][0]}, ", str(v)
            text = prefix + bad_digit + "]]" + ans.glue[2]
            ids = enc(text)
            # any two digits make a valid value; the third one of 256..999 is the invalid token
            return _reject_at(grammar, ids, len(enc(prefix + bad_digit[:2])))
        if kind == "trace_zero_lead":
            prefix = glue0 + " [[0"
            ids = enc(prefix + "5, 1]]")
            return _reject_at(grammar, ids, len(enc(prefix)))
        pts = list(ans.points) + [(1, 2)] * (6 - len(ans.points))
        prefix = glue0 + " [" + ", ".join(f"[{x}, {y}]" for x, y in pts[:5])[:-1]
        ids = enc(prefix + "], [1, 2]]")
        return _reject_at(grammar, ids, len(enc(prefix)))
    trace = "[" + ", ".join(f"[{x}, {y}]" for x, y in ans.points) + "]"
    head = glue0 + " " + trace + ans.glue[2]
    first = ", ".join(table[r] for r in ans.lists[0])
    if kind == "action_word":
        word = data.draw(st.text(alphabet="abcxyz", min_size=2, max_size=6))
        pos = data.draw(st.integers(1, 6))
        items = [table[r] for r in ans.lists[0]]
        prefix = head + " [" + ", ".join(items[:pos]) + ","
        ids = enc(prefix + f" {word}, " + ", ".join(items[pos + 1:]) + "].") + [eos]
        return _reject_at(grammar, ids, len(enc(prefix)))
    if kind == "quoted":
        ids = enc(head + ' ["' + '", "'.join(table[r] for r in ans.lists[0]) + '"].') + [eos]
        return _reject_at(grammar, ids, len(enc(head)))
    if kind == "too_many_lists":
        lists = ", ".join(f"[{first}]" for _ in range(K + 1))
        prefix = head + " " + ("[" if ans.nested else "") + ", ".join(f"[{first}]" for _ in range(K))
        ids = enc(head + " " + (f"[{lists}]" if ans.nested else lists) + ".") + [eos]
        # nested: "]," after the K-th list is refused; flat: it closes the actions and the next
        # " [" is refused in the final glue
        n = len(enc(prefix))  # the prefix ends in "]", which is "]," in the answer: token n - 1
        return _reject_at(grammar, ids, n - 1 if ans.nested else n)
    if kind == "short_list":
        # six items; the sixth must end in a letter so that its comma would be its own token
        items = [table[r] for r in ans.lists[0]][:5] + [table[1]]  # rank 1 "âºŁ" ends in a letter
        prefix = head + " [" + ", ".join(items)
        ids = enc(prefix + "].") + [eos]
        return _reject_at(grammar, ids, len(enc(prefix)))
    if kind == "early_eos":
        ids = enc(head) + [eos]
        return _reject_at(grammar, ids, len(ids) - 1)
    # no_depth: the trace comes first; its opening bracket is not glue
    ids = enc(ans.glue[0] + " " + trace + ".") + [eos]
    return _reject_at(grammar, ids, len(enc(ans.glue[0])))


def _rest(ans, skip):
    return (ans.points, ans.lists, ans.nested, ans.glue)


@SETTINGS
@given(ans=answers(action_dim=7, max_actions=K), steer=st.lists(
    st.tuples(st.integers(0, 255), st.integers(0, 255)), min_size=1, max_size=5))
def test_steering_forces_the_given_trace(grammar, tokenizer_a, table, ans, steer):
    steered = Answer(ans.codes, tuple(steer), ans.lists, ans.nested, ans.glue)
    ids = steered.token_ids(tokenizer_a, table)
    state = grammar.start(trace=steer)
    events = feed(state, ids)
    trace_ev = [e for e in events if isinstance(e, TraceComplete)]
    assert trace_ev == [TraceComplete(tuple(steer), steered=True)]
    # everything between the opening "[[" and the closing "]]" is forced
    s = grammar.start(trace=steer)
    opener = next(i for i, t in enumerate(ids) if tokenizer_a.id_to_token(t) in ("Ġ[[", "[["))
    feed(s, ids[:opener + 1], check_forced=False)
    span = s.forced_span()
    close = next(i for i in range(opener + 1, len(ids)) if tokenizer_a.id_to_token(ids[i]).startswith("]]"))
    assert span == ids[opener + 1:close]
    # a different trace is refused at its first differing token
    if tuple(steer) != ans.points:
        other = Answer(ans.codes, ans.points, ans.lists, ans.nested, ans.glue).token_ids(tokenizer_a, table)
        diff = next(i for i, (a, b) in enumerate(zip(ids, other)) if a != b)
        assert not grammar.start(trace=steer).accepts(other[:diff + 1])


def test_glue_budget_forces_the_next_part(tokenizer_a, table):
    g = OutputGrammar.from_tokenizer(tokenizer_a, 7, glue_budget=3)
    s = g.start()
    for t in tokenizer_a.encode("The depth map")[:3]:
        s.advance(t)
    assert s.forced_span()[:1] == [tokenizer_a.special.depth_start]
    with pytest.raises(GrammarError, match="glue before depth"):
        s.advance(tokenizer_a.encode(" is")[0])


def test_forced_tokens_and_masks(grammar, tokenizer_a):
    s = grammar.start()
    m = s.allowed_mask()
    assert m.shape == (len(tokenizer_a),) and m.dtype == bool
    assert m[tokenizer_a.special.depth_start] and not m[tokenizer_a.special.eos] and not m[tokenizer_a.special.depth_end]
    assert not m[tokenizer_a.encode("[")[0]] and not m[tokenizer_a.special.im_patch]
    s.advance(tokenizer_a.special.depth_start)
    assert s.forced_span() == []
    for _ in range(100):
        s.advance(tokenizer_a.special.depth_codes[3])
    assert s.forced_span()[0] == tokenizer_a.special.depth_end
    assert not s.accepts([tokenizer_a.special.depth_codes[0]])


def test_one_dimensional_actions_and_options(tokenizer_a, table):
    g = OutputGrammar.from_tokenizer(tokenizer_a, 1, depth_codes=4, max_actions=2)
    ans = Answer((1, 2, 3, 4), ((0, 255),), ((81,), (82,)), False, ("", "", "", "."))
    ids = ans.token_ids(tokenizer_a, table)
    events = feed(g.start(), ids)
    assert [e.ids for e in events if isinstance(e, ActionComplete)] == [(151643 - 82,), (151643 - 83,)]
    assert events[-1] == Finished(2)
    with pytest.raises(GrammarError, match="max_actions"):
        GrammarSpec(action_dim=7, max_actions=0)
    with pytest.raises(GrammarError, match="steering trace"):
        g.start(trace=[(1, 256)])


def test_trace_values_stop_at_255(grammar, tokenizer_a):
    head = tokenizer_a.encode("<DEPTH_START>" + "<DEPTH_0>" * 100 + "<DEPTH_END> [[")
    for value, ok in (("255", True), ("256", False), ("250", True), ("260", False), ("0", True), ("00", False)):
        assert grammar.start().accepts(head + tokenizer_a.encode(value + ", 1]]")) is ok, value


def test_closing_tokens_carry_only_glue(grammar, tokenizer_a, table):
    """Every token allowed to close the trace or the actions is the bracket(s) + glue text."""
    ans = Answer(tuple(range(100)), ((1, 2),), ((3,) * 7,), False, ("", "", "", ""))
    for nested in (False, True):
        ids = Answer(ans.codes, ans.points, ans.lists, nested, ans.glue).token_ids(tokenizer_a, table)
        closes = [i for i, t in enumerate(ids) if tokenizer_a.id_to_token(t).startswith("]")]
        for i in closes:
            s = grammar.start()
            feed(s, ids[:i], check_forced=False)
            texts = [tokenizer_a.id_to_token(int(t)) for t in s.allowed_ids()]
            closers = [x for x in texts if x.startswith("]")]
            assert len(closers) > 10  # "]]", "]].", "]],", "]]\n", ...
            for text in closers:
                assert not any(c in text.lstrip("]") for c in "[]<>"), text
            assert all(x.isdigit() for x in texts if not x.startswith("]")), texts


def test_from_config_and_a_string_that_continues_into_another(checkpoint_a, tokenizer_a, table):
    config = ModelConfig.load(checkpoint_a)
    g = OutputGrammar.from_config(config, tokenizer_a, max_actions=2)
    assert g.spec.action_dim == 7 and g.decoder.unnorm_key == "fractal20220817_data"
    with pytest.raises(Exception, match="fractal20220817_data"):
        OutputGrammar.from_config(config, tokenizer_a, unnorm_key="bridge_orig")
    # rank 82 " ðĸ¥" is a token prefix of rank 81 " ðĸ¥¨": before "]" both must be readable
    for nested in (False, True):
        ans = Answer(tuple(range(100)), ((1, 2),), ((0, 0, 0, 0, 0, 0, 82), (0, 0, 0, 0, 0, 0, 81)), nested,
                     ("", "", "", "."))
        events = feed(g.start(), ans.token_ids(tokenizer_a, table))
        acts = [e for e in events if isinstance(e, ActionComplete)]
        assert [e.ids[-1] for e in acts] == [151642 - 82, 151642 - 81]
        assert acts[0].values is not None and acts[0].values.shape == (7,)
