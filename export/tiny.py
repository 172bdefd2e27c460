"""Random MolmoAct checkpoints in the official Hugging Face layout, for demos, tests and benchmarks.

The files are the ones a released checkpoint has (config.json with vit/adapter/llm/norm_stats,
preprocessor and processor configs, tokenizer files, model.safetensors with the official key
names), so everything downstream is exercised exactly as with real weights. The tokenizer is the
real Qwen2 tokenizer with MolmoAct's added tokens, shipped with the package (see
cli/assets/README.md), so no network is needed.
"""

from __future__ import annotations

import json
import lzma
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from molmoact_edge.export.model import MolmoAct
from molmoact_edge.runtime.engine.config import ModelConfig

TOKENIZER_ASSET = "qwen2-molmoact-tokenizer.json.xz"
EOS = "<|endoftext|>"

# Plausible action statistics (the layout of OpenVLA's dataset_statistics.json). Invented numbers
# for a random model: they only exercise de-normalisation.
DEMO_NORM_STATS = {
    "demo_robot": {
        "action": {
            "q01": [-0.02, -0.02, -0.02, -0.08, -0.08, -0.08, 0.0],
            "q99": [0.02, 0.02, 0.02, 0.08, 0.08, 0.08, 1.0],
            "mask": [True, True, True, True, True, True, False],
        },
        "num_transitions": 0,
        "num_trajectories": 0,
    }
}


@dataclass(frozen=True)
class TinySize:
    """Widths and depths of a random model; vocabulary, image geometry and token ids stay real."""

    vit_hidden: int = 32
    vit_heads: int = 2
    vit_mlp: int = 64
    vit_layers: int = 10
    adapter_heads: int = 2
    projector_hidden: int = 48
    llm_hidden: int = 32
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_mlp: int = 48
    llm_layers: int = 2

    def __post_init__(self):
        for name in ("vit_hidden", "vit_heads", "vit_mlp", "vit_layers", "adapter_heads", "projector_hidden",
                     "llm_hidden", "llm_heads", "llm_kv_heads", "llm_mlp", "llm_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TinySize.{name} must be positive")
        if self.vit_layers < 9:
            raise ValueError("TinySize.vit_layers must be >= 9 so that vit_layers (-3, -9) exist")
        if self.vit_hidden % self.vit_heads or self.vit_hidden % self.adapter_heads:
            raise ValueError("TinySize.vit_hidden must be divisible by vit_heads and adapter_heads")
        if self.llm_hidden % self.llm_heads or self.llm_heads % self.llm_kv_heads:
            raise ValueError("TinySize.llm_hidden % llm_heads and llm_heads % llm_kv_heads must be 0")


PRESETS = {
    "tiny": TinySize(),
    # The benchmark model of issue 4: real vocabulary and image geometry, LLM hidden 768, 8 layers.
    "bench": TinySize(vit_hidden=256, vit_heads=4, vit_mlp=512, vit_layers=10, adapter_heads=4,
                      projector_hidden=1024, llm_hidden=768, llm_heads=12, llm_kv_heads=2, llm_mlp=2048,
                      llm_layers=8),
}


def config_dict(size: TinySize, norm_stats: dict | None = None) -> dict:
    """A config.json in the official MolmoAct layout."""
    vit_hd = size.vit_hidden // size.vit_heads
    return {
        "architectures": ["MolmoActForActionReasoning"],
        "model_type": "molmoact",
        "image_patch_id": 152066,
        "n_action_bins": 256,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "norm_stats": norm_stats if norm_stats is not None else DEMO_NORM_STATS,
        "vit_config": {
            "model_type": "molmoact_vit", "hidden_size": size.vit_hidden, "intermediate_size": size.vit_mlp,
            "num_hidden_layers": size.vit_layers, "num_attention_heads": size.vit_heads,
            "num_key_value_heads": size.vit_heads, "head_dim": vit_hd, "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6, "image_default_input_size": [378, 378], "image_patch_size": 14,
            "image_num_pos": 729, "patch_bias": True, "pre_layernorm": False, "use_cls_token": False,
            "float32_attention": True, "attention_dropout": 0.0, "residual_dropout": 0.0,
        },
        "adapter_config": {
            "model_type": "", "vit_layers": [-3, -9], "hidden_size": size.vit_hidden,
            "num_attention_heads": size.adapter_heads, "num_key_value_heads": size.adapter_heads,
            "head_dim": size.vit_hidden // size.adapter_heads, "intermediate_size": size.projector_hidden,
            "text_hidden_size": size.llm_hidden, "hidden_act": "silu", "float32_attention": True,
            "image_padding_embed": None, "attention_dropout": 0.0, "residual_dropout": 0.0,
            "image_feature_dropout": 0.0,
        },
        "llm_config": {
            "model_type": "molmoact_llm", "hidden_size": size.llm_hidden, "intermediate_size": size.llm_mlp,
            "num_hidden_layers": size.llm_layers, "num_attention_heads": size.llm_heads,
            "num_key_value_heads": size.llm_kv_heads, "head_dim": size.llm_hidden // size.llm_heads,
            "vocab_size": 152064, "additional_vocab_size": 128, "rope_theta": 1000000.0, "rope_scaling": None,
            "layer_norm_eps": 1e-6, "hidden_act": "silu", "qkv_bias": True, "norm_after": False,
            "use_qk_norm": False, "qk_norm_type": "olmo", "max_position_embeddings": 4096,
        },
    }


PREPROCESSOR_CONFIG = {
    "image_processor_type": "MolmoActImageProcessor", "processor_class": "MolmoActProcessor",
    "base_image_input_size": [378, 378], "crop_mode": "overlap-and-resize-c2", "do_convert_rgb": True,
    "do_pad": True, "image_patch_size": 14, "image_pooling_h": 2, "image_pooling_w": 2, "max_crops": 8,
    "max_multi_image_crops": 8, "normalize_mode": "siglip", "overlap_margins": [4, 4], "pad_value": 0.0,
    "resize_mode": "siglip",
}
PROCESSOR_CONFIG = {
    "processor_class": "MolmoActProcessor", "always_start_with_space": False, "default_inference_len": 65,
    "image_padding_mask": False, "message_format": "role", "prompt_templates": "uber_model",
    "style": "demo", "system_prompt": "demo_or_style", "use_col_tokens": True,
}


def tokenizer_json_text() -> str:
    data = resources.files("molmoact_edge").joinpath("assets", TOKENIZER_ASSET).read_bytes()
    return lzma.decompress(data).decode("utf-8")


def random_state_dict(cfg: ModelConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights with sensible scales (fan-in for linears, ~1 for norms and embeddings)."""
    with torch.device("meta"):
        model = MolmoAct(cfg)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, meta in sorted(model.state_dict().items()):
        shape = tuple(meta.shape)
        if name.endswith("bias"):
            t = torch.full(shape, 0.05)
        elif "norm" in name or name.endswith("ln_f.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif "wte" in name:
            t = torch.randn(shape, generator=gen)
        elif name.endswith("positional_embedding"):
            t = 0.5 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        out[name] = t.to(dtype).contiguous()
    return out


def write_checkpoint(out_dir: str | Path, size: TinySize | str = "tiny", seed: int = 0,
                     dtype: torch.dtype = torch.bfloat16, norm_stats: dict | None = None,
                     weights: Callable[[ModelConfig], dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a checkpoint folder; returns its path. Its weights are random (`random_state_dict` of
    `seed`) unless `weights` builds them from the checkpoint's config."""
    from safetensors.torch import save_file

    size = PRESETS[size] if isinstance(size, str) else size
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    cfg_dict = config_dict(size, norm_stats)
    cfg = ModelConfig.from_dict(cfg_dict)
    (d / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    (d / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2))
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": 151643}, indent=2))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS, "add_bos_token": False,
         "tokenizer_class": "Qwen2Tokenizer", "clean_up_tokenization_spaces": False}, indent=2))
    (d / "tokenizer.json").write_text(tokenizer_json_text())
    sd = random_state_dict(cfg, seed, dtype) if weights is None else weights(cfg)
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    return d


def synthetic_scene(height: int = 480, width: int = 640) -> np.ndarray:
    """A table-top stand-in: shaded background, a red block, a blue bowl, a gripper-ish bar."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([90 + 60 * x / width, 80 + 50 * y / height, np.full_like(x, 70)], axis=-1)
    img[int(0.55 * height):int(0.70 * height), int(0.20 * width):int(0.32 * width)] = (200, 30, 30)
    bowl = (x - 0.68 * width) ** 2 + (y - 0.62 * height) ** 2 < (0.09 * width) ** 2
    img[bowl] = (40, 60, 200)
    img[int(0.10 * height):int(0.35 * height), int(0.47 * width):int(0.53 * width)] = (180, 180, 180)
    return np.clip(img, 0, 255).astype(np.uint8)
