"""The text parser against the official parser's recorded outputs (fixture action_parsing.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from molmoact_edge.runtime.engine.actions import ActionDecoder
from molmoact_edge.runtime.engine.config import ConfigError, ModelConfig
from molmoact_edge.runtime.engine.parser import (
    depth_codes_from_string, extract_action_lists, extract_depth_strings, extract_traces, parse_actions,
    parse_step, trace_to_pixels)
from molmoact_edge.runtime.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def cases(fixture_a):
    return json.loads((fixture_a / "cases" / "action_parsing.json").read_text())


def _records(cases):
    return [(r, cases["texts"][r["text_index"]]) for r in cases["records"]]


def test_every_fixture_record_matches_the_official_parser(cases, config_a, tokenizer_a):
    assert cases["records"], "fixture has no records"
    for rec, text in _records(cases):
        dec = ActionDecoder.from_checkpoint(config_a, tokenizer_a, rec["unnorm_key"])
        assert extract_depth_strings(text) == rec["parse_depth"]
        assert extract_traces(text) == rec["parse_trace"]
        got = parse_actions(text, dec)
        want = np.asarray(rec["parse_action"], dtype=np.float64).reshape(-1, got.shape[1])
        assert got.shape == want.shape
        # Bit-identical: same float32/float64 mix as the official code.
        np.testing.assert_array_equal(got, want)


def test_generated_texts_of_the_fixture_parse_to_nothing(fixture_a, cases, config_a, tokenizer_a):
    dec = ActionDecoder.from_checkpoint(config_a, tokenizer_a)
    for case, want in cases["on_generated_texts"].items():
        text = str(np.load(fixture_a / "cases" / f"{case}.npz")["generated_text"])
        assert extract_depth_strings(text) == want["parse_depth"]
        assert extract_traces(text) == want["parse_trace"]
        assert parse_actions(text, dec).tolist() == want["parse_action"]


def test_action_strings_map_to_the_recorded_ids(cases, tokenizer_a):
    texts = cases["texts"]
    lists = extract_action_lists(texts[0], 7) + extract_action_lists(texts[1], 7)
    want = [cases["action_token_ids"][k] for k in ("text0", "text1_list0", "text1_list1")]
    vocab = tokenizer_a.rust.get_vocab(with_added_tokens=False)
    assert [[vocab[s] for s in items] for items in lists] == want


def test_unknown_unnorm_key_lists_the_available_ones(config_a, tokenizer_a):
    with pytest.raises(ConfigError, match="fractal20220817_data"):
        ActionDecoder.from_checkpoint(config_a, tokenizer_a, "bridge_orig")


def test_unknown_strings_are_bin_zero_like_the_official_parser(config_a, tokenizer_a):
    dec = ActionDecoder.from_checkpoint(config_a, tokenizer_a, denormalize=False)
    table = [tokenizer_a.id_to_token(i) for i in dec.action_ids()]
    text = f"[{table[5]}, nonsense, <DEPTH_3>, {table[255]}, {table[254]}, {table[0]}, é]"
    got = parse_actions(text, dec, action_dim=7)[0]
    c = dec.bin_centers
    # rank 255 shares the last centre (clip to n_bins - 2); unknown / added tokens fall to bin 0;
    # a plain byte token such as "é" has a low id and clips to the top bin
    np.testing.assert_array_equal(got, [c[5], c[0], c[0], c[254], c[254], c[0], c[254]])


def test_parse_step_reports_what_is_wrong(cases, config_a, tokenizer_a):
    dec = ActionDecoder.from_checkpoint(config_a, tokenizer_a)
    step = parse_step(cases["texts"][0], dec)
    # the fixture's text has 20 depth codes, not 100, and nothing else wrong
    assert step.depth[:3] == [47, 68, 25] and len(step.depth) == 20
    assert step.parse_errors == ["depth: 20 codes, expected 100"]
    assert step.trace == [[140, 225], [130, 212], [121, 198], [115, 180]]
    np.testing.assert_array_equal(step.actions, parse_actions(cases["texts"][0], dec))
    ok = parse_step(cases["texts"][0], dec, depth_codes=20)
    assert ok.ok

    step = parse_step(cases["texts"][2], dec)
    assert step.depth is None and step.actions.shape == (0, 7)
    assert any(e.startswith("depth: no") for e in step.parse_errors)
    assert any(e.startswith("actions: no list") for e in step.parse_errors)

    bad = "<DEPTH_START><DEPTH_1>x<DEPTH_END> [[1, 300], [2, 2.5]] [nope, é, a, b, c, d, e]"
    step = parse_step(bad, dec, depth_codes=1)
    assert step.depth is None
    assert any("other than" in e for e in step.parse_errors)
    assert any("[300, 2.5]" in e for e in step.parse_errors)
    assert any("'nope'" in e and "bin 0" in e for e in step.parse_errors)


def test_depth_codes_from_string():
    assert depth_codes_from_string("<DEPTH_START><DEPTH_0><DEPTH_127><DEPTH_END>") == [0, 127]
    assert depth_codes_from_string("<DEPTH_0> <DEPTH_1>") is None


def test_trace_to_pixels():
    px = trace_to_pixels([[0, 255], [255, 0], [51, 102]], width=640, height=480)
    np.testing.assert_allclose(px, [[0, 479], [639, 0], [51 / 255 * 639, 102 / 255 * 479]])
    with pytest.raises(ValueError):
        trace_to_pixels([[1, 2]], 0, 10)


def test_gripper_is_never_denormalised_even_if_the_mask_says_so(tokenizer_a):
    from molmoact_edge.runtime.engine.config import ActionStats

    stats = ActionStats(q01=np.array([-2.0, 0.0, 10.0]), q99=np.array([2.0, 1.0, 20.0]), mask=np.ones(3, bool))
    dec = ActionDecoder(base_vocab=tokenizer_a.rust.get_vocab(with_added_tokens=False),
                        base_vocab_size=tokenizer_a.special.base_vocab_size, stats=stats, unnorm_key="x")
    top = dec.bin_centers[-1]
    got = dec.decode_ids([dec.first_action_id] * 3)  # the highest bin in every dimension
    np.testing.assert_allclose(got, [0.5 * (top + 1) * 4 - 2, 0.5 * (top + 1), top])
    with pytest.raises(ValueError, match="unnorm key"):
        dec.denormalize(np.zeros(4))
