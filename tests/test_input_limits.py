"""Bounded inputs: instructions that smuggle special tokens, empty instructions, prompts and KV caches
beyond the model's positions, and configs whose sizes would hang or exhaust memory are refused with
the field or token named, before anything large is built or allocated."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import needs_torch
from PIL import Image

from molmoact_edge.runtime.engine.config import ConfigError
from molmoact_edge.runtime.engine.pipeline import ModelSpec


@pytest.fixture(scope="module")
def spec(checkpoint_a):
    return ModelSpec.load(checkpoint_a)


@pytest.fixture(scope="module")
def image(fixture_a):
    with Image.open(fixture_a / "cases" / "img_256_a.png") as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("token", ["<|endoftext|>", "<DEPTH_START>", "<DEPTH_7>", "<im_start>", "<im_patch>",
                                   "<|im_start|>", "<tool_call>", "|<EXTRA_TOKENS_5>|"])
def test_special_token_in_instruction_is_refused(spec, image, token):
    with pytest.raises(ValueError, match=re.escape(repr(token))):
        spec.inputs([image], f"close {token}the box")


def test_every_added_token_of_the_tokenizer_file_is_refused(checkpoint_a, spec):
    from molmoact_edge.runtime.engine.prompt import InputError, check_instruction

    # The list comes from tokenizer.json itself, read here with json, not from our tokenizer code.
    added = [t["content"] for t in json.loads((checkpoint_a / "tokenizer.json").read_text())["added_tokens"]]
    assert len(added) > 400
    for token in added:
        with pytest.raises(InputError, match=re.escape(repr(token))):
            check_instruction(f"pick up the {token} can", spec.tokenizer)


@pytest.mark.parametrize("text", ["move to <DEPTH 7>", "say DEPTH_START", "lift the <depth_7> lid", "a < b | c > d"])
def test_text_that_only_resembles_a_token_is_accepted(spec, image, text):
    inputs = spec.inputs([image], text)
    special = spec.tokenizer.special
    structural = {special.bos, special.im_start, special.im_end, special.im_patch, special.im_col}
    added_ids = {spec.tokenizer.token_to_id(t) for t in spec.tokenizer.added_tokens}
    assert set(inputs.input_ids.tolist()) & added_ids <= structural


def test_empty_instruction_is_refused_before_any_model_loads(tmp_path, fixture_a):
    from molmoact_edge.runtime.engine.prompt import InputError, check_instruction

    with pytest.raises(InputError, match="instruction is empty"):
        check_instruction("  \n")
    # The checkpoint does not exist: the instruction must be refused before anything looks for it.
    proc = subprocess.run([sys.executable, "-m", "molmoact_edge", "generate", "--checkpoint", str(tmp_path / "none"),
                           "--image", str(fixture_a / "cases" / "img_256_a.png"), "--instruction", " "],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2  # a bad value: a usage error, refused while the arguments are parsed
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "the instruction is empty" in lines[0]


def test_prompt_longer_than_max_position_embeddings_is_refused(spec, image):
    assert spec.config.llm.max_position_embeddings == 4096
    with pytest.raises(ValueError, match=r"the prompt is 6514 tokens .*max_position_embeddings \(4096"):
        spec.inputs([image], "close the box " * 1000)
    assert len(spec.inputs([image], "close the box " * 500).input_ids) <= 4096  # 3514 tokens still fit


def _with_llm_layers(checkpoint_a, tmp_path, layers: int):
    """Fixture A's weights under a config that claims ``layers`` LLM layers."""
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(checkpoint_a / "model.safetensors", d)
    raw = json.loads((checkpoint_a / "config.json").read_text())
    raw["llm_config"]["num_hidden_layers"] = layers
    (d / "config.json").write_text(json.dumps(raw))
    return d


@needs_torch
def test_checkpoint_config_with_a_million_layers_fails_fast(checkpoint_a, tmp_path):
    from molmoact_edge.export.checkpoint import load_model

    d = _with_llm_layers(checkpoint_a, tmp_path, 10**6)  # used to hang while the model was built on meta
    with pytest.raises(ConfigError, match="'num_hidden_layers' = 1000000 exceeds the limit of 512"):
        load_model(d)


def test_kv_cache_beyond_max_position_embeddings_is_refused(bundle_a):
    from molmoact_edge.runtime.engine.pipeline import open_bundle

    with open_bundle(bundle_a) as pipe:
        pipe.backend.reset(4096)  # exactly the model's positions: allowed
        with pytest.raises(ConfigError, match=r"need 4097 positions, more than the model's max_position_embeddings"):
            pipe.backend.reset(4097)


def test_kv_cache_larger_than_memory_is_refused_before_allocating():
    from molmoact_edge.runtime.engine.ort_backend import _check_kv_size

    # 10^9 layers is refused by the config already; within the config limits a cache can still be
    # terabytes (512 layers x 2 x 1024 heads x 1024 dims x 4 B = 4 GiB per position).
    with pytest.raises(ConfigError, match=r"KV cache for 4096 positions .* would take 16384.0 GiB, more than"):
        _check_kv_size(4096, 4096, (512, 2, 1024, 1024), np.dtype(np.float32))
    _check_kv_size(4096, 4096, (28, 2, 4, 128), np.dtype(np.float16))  # MolmoAct-7B: 224 MiB


def test_generate_refuses_a_long_run_in_one_line(bundle_a, fixture_a):
    proc = subprocess.run([sys.executable, "-m", "molmoact_edge", "generate", "--bundle", str(bundle_a),
                           "--image", str(fixture_a / "cases" / "img_256_a.png"), "--instruction", "close the box",
                           "--max-new-tokens", "4000", "--no-grammar"], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: ") and "max_position_embeddings" in lines[0], proc.stderr


def test_more_images_than_positions_are_refused_before_preprocessing(spec):
    # 20 images x 212 tokens (each global view: 14 rows of 14 <im_patch> + <im_col>, plus start/end;
    # MOLMOACT.md section 3) > 4096. Objects that are not images show nothing is preprocessed first.
    with pytest.raises(ValueError, match=r"20 images need at least 4240 positions \(212 each\)"):
        spec.inputs([object()] * 20, "close the box", template="multi")


@needs_torch
def test_checkpoint_config_at_the_size_limit_fails_with_a_bounded_message(checkpoint_a, tmp_path):
    from molmoact_edge.export.checkpoint import CheckpointError, load_model

    # The largest accepted: built, then refused by its weights
    # (510 blocks the file lacks x 7 tensors per block, MOLMOACT.md section 5)
    d = _with_llm_layers(checkpoint_a, tmp_path, 512)
    with pytest.raises(CheckpointError, match=r"missing keys \(3570\): \[.*, \.\.\. and 3550 more\]") as e:
        load_model(d)
    assert len(str(e.value)) < 5000
