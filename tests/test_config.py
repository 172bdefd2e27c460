"""Config parsing: every value comes from the checkpoint, and bad values name the field."""

import copy
import json

import pytest

from molmoact_edge.runtime.engine.config import ConfigError, ImageProcessorConfig, ModelConfig


@pytest.fixture(scope="module")
def raw(checkpoint_a):
    return json.loads((checkpoint_a / "config.json").read_text())


def test_fixture_values_are_read_not_assumed(raw):
    cfg = ModelConfig.from_dict(raw)
    assert cfg.llm.hidden_size == 32 and cfg.llm.num_hidden_layers == 2 and cfg.llm.head_dim == 8
    assert cfg.vit_layer_indices == (7, 1) and cfg.vit_blocks_needed == 8
    assert cfg.llm.input_vocab_size == 152064 + 128
    assert list(cfg.norm_stats) == ["fractal20220817_data"]
    assert cfg.norm_stats["fractal20220817_data"].action_dim == 7


@pytest.mark.parametrize("section,key,value,message", [
    ("llm_config", "num_attention_heads", 5, "num_attention_heads \\* head_dim must equal hidden_size"),
    ("llm_config", "num_key_value_heads", 3, "multiple of num_key_value_heads"),
    ("llm_config", "hidden_size", -32, "'hidden_size' must be a positive integer"),
    ("llm_config", "norm_after", True, "'norm_after' = True is not supported"),
    ("llm_config", "hidden_act", "relu", "'hidden_act' = 'relu'"),
    ("vit_config", "use_cls_token", True, "'use_cls_token' = True is not supported"),
    ("vit_config", "image_num_pos", 700, "image_num_pos = 700 does not match"),
    ("adapter_config", "vit_layers", [-3, -20], "vit_layers entry -20 is outside"),
    ("adapter_config", "text_hidden_size", 64, "text_hidden_size 64 != llm hidden_size 32"),
])
def test_bad_field_is_named(raw, section, key, value, message):
    bad = copy.deepcopy(raw)
    bad[section][key] = value
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(bad)


def test_missing_field_is_named(raw):
    bad = copy.deepcopy(raw)
    del bad["llm_config"]["rope_theta"]
    with pytest.raises(ConfigError, match=r"llm_config: missing required field\(s\) \['rope_theta'\]"):
        ModelConfig.from_dict(bad)


def test_missing_section_is_named(raw):
    bad = copy.deepcopy(raw)
    del bad["vit_config"]
    with pytest.raises(ConfigError, match="missing section 'vit_config'"):
        ModelConfig.from_dict(bad)


def test_wrong_model_type(raw):
    with pytest.raises(ConfigError, match="expected 'molmoact'"):
        ModelConfig.from_dict({**raw, "model_type": "llama"})


def test_unknown_unnorm_key_lists_available(raw):
    cfg = ModelConfig.from_dict(raw)
    with pytest.raises(ConfigError, match=r"unknown unnorm key 'bridge_orig'; this checkpoint has \['fractal20220817_data'\]"):
        cfg.action_stats("bridge_orig")
    assert cfg.action_stats(None).action_dim == 7


def test_norm_stats_shape_mismatch(raw):
    bad = copy.deepcopy(raw)
    bad["norm_stats"]["fractal20220817_data"]["action"]["q99"] = [1.0, 2.0]
    with pytest.raises(ConfigError, match="same length"):
        ModelConfig.from_dict(bad)


def test_image_processor_config_read_from_file(checkpoint_a):
    cfg = ImageProcessorConfig.load(checkpoint_a)
    assert (cfg.max_crops, cfg.max_multi_image_crops) == (8, 4)
    with pytest.raises(ConfigError, match="'resize_mode' = 'metaclip' is not supported"):
        ImageProcessorConfig(resize_mode="metaclip")


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        ModelConfig.load(tmp_path)


@pytest.mark.parametrize("section,key,value,message", [
    # A corrupt or hostile config must fail on the field, not hang or allocate terabytes later.
    ("llm_config", "num_hidden_layers", 10**6, "'num_hidden_layers' = 1000000 exceeds the limit of 512"),
    ("llm_config", "num_hidden_layers", 10**9, "'num_hidden_layers' = 1000000000 exceeds the limit"),
    ("vit_config", "num_hidden_layers", 10**6, "vit_config: field 'num_hidden_layers' = 1000000 exceeds"),
    ("llm_config", "max_position_embeddings", 10**9, "'max_position_embeddings' = 1000000000 exceeds the limit"),
    ("llm_config", "vocab_size", 10**9, "'vocab_size' = 1000000000 exceeds the limit"),
    ("llm_config", "layer_norm_eps", -1, "llm_config: field 'layer_norm_eps' must be a small positive number"),
    ("llm_config", "layer_norm_eps", 0, "'layer_norm_eps' must be a small positive number"),
    ("vit_config", "layer_norm_eps", -1e-6, "vit_config: field 'layer_norm_eps' must be a small positive"),
    ("llm_config", "rope_theta", float("inf"), "'rope_theta' must be a positive finite number"),
    ("vit_config", "image_default_input_size", [10**6, 10**6], "'image_default_input_size' = 1000000 exceeds"),
    # The attention checks are shared by the three block types: the adapter gets them too.
    ("adapter_config", "num_key_value_heads", 3, "adapter_config: num_attention_heads must be a multiple"),
    ("adapter_config", "num_attention_heads", 3, "adapter_config: num_attention_heads \\* head_dim must equal"),
    ("vit_config", "hidden_act", "relu", "vit_config: field 'hidden_act' = 'relu'"),
])
def test_sizes_are_bounded_and_named(raw, section, key, value, message):
    bad = copy.deepcopy(raw)
    bad[section][key] = value
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(bad)


def test_image_processor_sizes_are_bounded(checkpoint_a, tmp_path):
    raw = json.loads((checkpoint_a / "preprocessor_config.json").read_text())
    for key, value, message in [("max_crops", 10**6, "'max_crops' = 1000000 exceeds the limit of 64"),
                                ("base_image_input_size", [10**5, 10**5], "'base_image_input_size' = 100000 exceeds")]:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(ConfigError, match=message):
            ImageProcessorConfig.load(tmp_path)


def test_molmoact_7b_sizes_are_within_the_limits(raw):
    # The released 7B-D's sizes (MOLMOACT.md sections 2-4) on the fixture's config: the bounds must
    # not refuse the model this project exists for.
    big = copy.deepcopy(raw)
    big["llm_config"].update(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                             head_dim=128, intermediate_size=18944, max_position_embeddings=4096)
    big["vit_config"].update(hidden_size=1152, num_attention_heads=16, num_key_value_heads=16, head_dim=72,
                             intermediate_size=4304, num_hidden_layers=27)
    big["adapter_config"].update(hidden_size=1152, num_attention_heads=16, num_key_value_heads=16, head_dim=72,
                                 intermediate_size=18944, text_hidden_size=3584)
    cfg = ModelConfig.from_dict(big)
    assert cfg.llm.num_hidden_layers == 28 and cfg.llm.kv_dim == 512 and cfg.vit.hidden_size == 1152
