"""Model and processor configuration, read from a checkpoint's own JSON files.

Every number the model needs comes from the checkpoint (``config.json``,
``preprocessor_config.json``, ``processor_config.json``); nothing here is a MolmoAct-7B constant.
Values are validated when parsed, and an error names the file, the field and what is accepted.

Only the MolmoAct-7B-D family (SigLIP ViT + Qwen2-style LLM) is implemented. Fields that select
7B-O behaviour (CLS token, QK-norm, post-norm blocks, aspect-preserving resize...) are checked
explicitly, so an unsupported checkpoint is refused at load time instead of running wrongly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class ConfigError(ValueError):
    """A checkpoint or bundle configuration that cannot be used; the message says why and what to do."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path} is missing: a MolmoAct checkpoint directory must contain it "
                          "(download the full checkpoint folder, not only the weights)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-download it") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _build(cls, data: dict[str, Any], where: str):
    """Instantiate dataclass ``cls`` from the fields of ``data`` it declares; extra keys are ignored
    (Hugging Face configs carry many fields that do not affect inference)."""
    kwargs = {}
    missing = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in data:
            kwargs[f.name] = data[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append(f.name)
    if missing:
        raise ConfigError(f"{where}: missing required field(s) {missing}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


# Upper bounds on every size a config declares, checked before anything is allocated or built. A
# corrupt or hostile config.json (10^6 layers, 10^9 positions) must fail here with the field named,
# not hang while the model is built or crash in a terabyte allocation. The bounds are generous but
# finite: several times the largest open models of this kind (MolmoAct-7B: LLM 28 layers, hidden
# 3584, MLP 18944, 28 heads / 4 KV heads of 128, vocab 152064 + 128, 4096 positions; SigLIP ViT
# 27 layers, hidden 1152, 729 positions; Llama-3.1-405B, the largest dense open LLM: 126 layers,
# hidden 16384, MLP 53248, 128 heads).
SIZE_LIMITS: dict[str, int] = {
    "hidden_size": 32768,
    "intermediate_size": 262144,
    "text_hidden_size": 32768,
    "num_hidden_layers": 512,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1024,
    "vocab_size": 1 << 21,
    "additional_vocab_size": 1 << 16,
    "max_position_embeddings": 1 << 20,  # 7B: 4096; a million positions is far beyond any RoPE we support
    "image_patch_size": 128,
    "image_num_pos": 1 << 16,
    "image_pooling_h": 16,
    "image_pooling_w": 16,
    "max_crops": 64,  # 7B: 8; each crop is a full ViT pass
    "max_multi_image_crops": 64,  # 7B: 4
    "image_side": 8192,  # image_default_input_size / base_image_input_size, per side (7B: 378)
}


def _check_size(name: str, v, low: int = 1, limit_key: str | None = None) -> None:
    """``v`` is an integer in [low, SIZE_LIMITS[limit_key or name]]; the error names the field and the bound."""
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ConfigError(f"field {name!r} must be {kind}, got {v!r}")
    limit = SIZE_LIMITS[limit_key or name]
    if v > limit:
        raise ConfigError(f"field {name!r} = {v} exceeds the limit of {limit} (MolmoAct-7B's sizes are far "
                          "below it); this config is corrupt or describes a model this runtime cannot hold")


def _check_positive(obj, *names: str) -> None:
    for n in names:
        _check_size(n, getattr(obj, n))


def _check_eps(obj) -> None:
    v = obj.layer_norm_eps
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ConfigError(f"field 'layer_norm_eps' must be a small positive number (MolmoAct: 1e-6), got {v!r}")


def _check_image_size(name: str, size: tuple) -> None:
    if len(size) != 2:
        raise ConfigError(f"field {name!r} must be [height, width], got {list(size)}")
    for side in size:
        _check_size(name, side, limit_key="image_side")


def _check_equal(obj, name: str, accepted) -> None:
    v = getattr(obj, name)
    if v != accepted:
        raise ConfigError(f"field {name!r} = {v!r} is not supported (accepted: {accepted!r}); "
                          "only the MolmoAct-7B-D family (SigLIP + Qwen2) is implemented")


ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


@dataclass(frozen=True)
class AttentionConfig:
    """The attention and MLP geometry the ViT, the adapter's pooling attention and the LLM share;
    each subclass declares its own ``hidden_act`` default and calls :meth:`check_attention`."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    def check_attention(self) -> None:
        """Sizes bounded, heads x head_dim = hidden, query heads grouped evenly over the key/value
        heads, a supported activation."""
        _check_positive(self, "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                        "head_dim")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"field 'hidden_act' = {self.hidden_act!r}; accepted: {ACTIVATIONS}")
        if self.num_attention_heads * self.head_dim != self.hidden_size:
            raise ConfigError("num_attention_heads * head_dim must equal hidden_size "
                              f"({self.num_attention_heads} * {self.head_dim} != {self.hidden_size})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads "
                              f"({self.num_attention_heads} % {self.num_key_value_heads} != 0)")


@dataclass(frozen=True)
class VitConfig(AttentionConfig):
    num_hidden_layers: int
    image_default_input_size: tuple[int, int]
    image_patch_size: int
    image_num_pos: int
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    patch_bias: bool = True
    pre_layernorm: bool = False
    use_cls_token: bool = False
    float32_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "image_default_input_size", tuple(self.image_default_input_size))
        self.check_attention()
        _check_positive(self, "num_hidden_layers", "image_patch_size", "image_num_pos")
        _check_eps(self)
        _check_image_size("image_default_input_size", self.image_default_input_size)
        h, w = self.image_default_input_size
        if h % self.image_patch_size or w % self.image_patch_size:
            raise ConfigError(f"image_default_input_size {self.image_default_input_size} is not a multiple "
                              f"of image_patch_size {self.image_patch_size}")
        if (h // self.image_patch_size) * (w // self.image_patch_size) != self.image_num_pos:
            raise ConfigError(f"image_num_pos = {self.image_num_pos} does not match the patch grid of "
                              f"{self.image_default_input_size} / {self.image_patch_size}")
        _check_equal(self, "use_cls_token", False)
        _check_equal(self, "pre_layernorm", False)

    @property
    def patch_grid(self) -> tuple[int, int]:
        h, w = self.image_default_input_size
        return h // self.image_patch_size, w // self.image_patch_size

    @property
    def patch_pixels(self) -> int:
        return self.image_patch_size * self.image_patch_size * 3


@dataclass(frozen=True)
class AdapterConfig(AttentionConfig):
    vit_layers: tuple[int, ...]
    text_hidden_size: int
    hidden_act: str = "silu"
    float32_attention: bool = True
    image_padding_embed: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "vit_layers", tuple(int(v) for v in self.vit_layers))
        if not self.vit_layers:
            raise ConfigError("field 'vit_layers' must list at least one ViT layer")
        self.check_attention()
        _check_positive(self, "text_hidden_size")
        _check_equal(self, "image_padding_embed", None)


@dataclass(frozen=True)
class LlmConfig(AttentionConfig):
    num_hidden_layers: int
    vocab_size: int
    additional_vocab_size: int
    rope_theta: float
    layer_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    qkv_bias: bool = True
    norm_after: bool = False
    use_qk_norm: bool = False
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096

    def __post_init__(self):
        self.check_attention()
        _check_positive(self, "num_hidden_layers", "vocab_size", "max_position_embeddings")
        _check_size("additional_vocab_size", self.additional_vocab_size, low=0)
        _check_eps(self)
        if (isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float))
                or not 0 < self.rope_theta < math.inf):
            raise ConfigError(f"field 'rope_theta' must be a positive finite number, got {self.rope_theta!r}")
        _check_equal(self, "norm_after", False)
        _check_equal(self, "use_qk_norm", False)
        _check_equal(self, "rope_scaling", None)

    @property
    def input_vocab_size(self) -> int:
        """Rows of the input embedding table: base vocabulary + input-only extra rows (image tokens)."""
        return self.vocab_size + self.additional_vocab_size

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class ActionStats:
    """One dataset's action statistics (the OpenVLA ``dataset_statistics.json`` layout)."""

    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray

    @classmethod
    def from_json(cls, key: str, data: dict[str, Any]) -> ActionStats:
        action = data.get("action")
        if not isinstance(action, dict) or "q01" not in action or "q99" not in action:
            raise ConfigError(f"norm_stats[{key!r}] needs an 'action' entry with 'q01' and 'q99'")
        q01 = np.asarray(action["q01"], dtype=np.float64)
        q99 = np.asarray(action["q99"], dtype=np.float64)
        mask = np.asarray(action.get("mask", [True] * len(q01)), dtype=bool)
        if q01.ndim != 1 or q01.shape != q99.shape or mask.shape != q01.shape or len(q01) == 0:
            raise ConfigError(f"norm_stats[{key!r}].action: q01, q99 and mask must be 1-D and the same length "
                              f"(got {q01.shape}, {q99.shape}, {mask.shape})")
        return cls(q01=q01, q99=q99, mask=mask)

    @property
    def action_dim(self) -> int:
        return len(self.q01)


@dataclass(frozen=True)
class ModelConfig:
    """``config.json`` of a MolmoAct checkpoint (Hugging Face remote-code format)."""

    vit: VitConfig
    adapter: AdapterConfig
    llm: LlmConfig
    image_patch_id: int
    n_action_bins: int = 256
    tie_word_embeddings: bool = False
    norm_stats: dict[str, ActionStats] = field(default_factory=dict)
    # Not an official field: "official" when the checkpoint was trained only on the official answer
    # wording, so decoding forces that wording (runtime/engine/grammar.py); absent means "free".
    answer_glue: str = "free"

    def __post_init__(self):
        if self.answer_glue not in ("free", "official"):
            raise ConfigError(f"answer_glue must be 'free' or 'official', got {self.answer_glue!r}")
        nl = self.vit.num_hidden_layers
        for layer in self.adapter.vit_layers:
            if not -nl <= layer < nl:
                raise ConfigError(f"adapter vit_layers entry {layer} is outside the ViT's {nl} layers")
        if self.adapter.text_hidden_size != self.llm.hidden_size:
            raise ConfigError(f"adapter text_hidden_size {self.adapter.text_hidden_size} != llm hidden_size "
                              f"{self.llm.hidden_size}")
        if not self.llm.vocab_size <= self.image_patch_id < self.llm.input_vocab_size:
            raise ConfigError(f"image_patch_id {self.image_patch_id} must index the extra input rows "
                              f"[{self.llm.vocab_size}, {self.llm.input_vocab_size})")
        _check_equal(self, "tie_word_embeddings", False)

    @property
    def vit_layer_indices(self) -> tuple[int, ...]:
        """The ViT block outputs used as features, 0-based, in the order they are concatenated."""
        n = self.vit.num_hidden_layers
        return tuple(v if v >= 0 else v + n for v in self.adapter.vit_layers)

    @property
    def vit_blocks_needed(self) -> int:
        """The checkpoint stores (and we run) only the blocks up to the deepest feature layer."""
        return max(self.vit_layer_indices) + 1

    def resolve_unnorm_key(self, unnorm_key: str | None) -> str:
        """The norm_stats key to use: ``unnorm_key`` if the checkpoint has it, else the only key;
        errors (as :meth:`action_stats`) list the available keys."""
        self.action_stats(unnorm_key)
        return unnorm_key if unnorm_key is not None else next(iter(self.norm_stats))

    def action_stats(self, unnorm_key: str | None) -> ActionStats:
        if not self.norm_stats:
            raise ConfigError("this checkpoint has no norm_stats; actions cannot be de-normalised")
        if unnorm_key is None:
            if len(self.norm_stats) != 1:
                raise ConfigError(f"this checkpoint has several norm_stats; choose one with --unnorm-key from "
                                  f"{sorted(self.norm_stats)}")
            return next(iter(self.norm_stats.values()))
        if unnorm_key not in self.norm_stats:
            raise ConfigError(f"unknown unnorm key {unnorm_key!r}; this checkpoint has {sorted(self.norm_stats)}")
        return self.norm_stats[unnorm_key]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config.json") -> ModelConfig:
        if data.get("model_type") not in (None, "molmoact"):
            raise ConfigError(f"{where}: model_type is {data.get('model_type')!r}, expected 'molmoact'")
        for section in ("vit_config", "adapter_config", "llm_config"):
            if not isinstance(data.get(section), dict):
                raise ConfigError(f"{where}: missing section {section!r}")
        if "image_patch_id" not in data:
            raise ConfigError(f"{where}: missing required field 'image_patch_id'")
        stats = data.get("norm_stats") or {}
        if not isinstance(stats, dict):
            raise ConfigError(f"{where}: norm_stats must be an object keyed by dataset name")
        try:
            return cls(
                vit=_build(VitConfig, data["vit_config"], f"{where} vit_config"),
                adapter=_build(AdapterConfig, data["adapter_config"], f"{where} adapter_config"),
                llm=_build(LlmConfig, data["llm_config"], f"{where} llm_config"),
                image_patch_id=data["image_patch_id"],
                n_action_bins=data.get("n_action_bins", 256),
                tie_word_embeddings=data.get("tie_word_embeddings", False),
                norm_stats={k: ActionStats.from_json(k, v) for k, v in stats.items()},
                answer_glue=data.get("answer_glue", "free"),
            )
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> ModelConfig:
        path = Path(checkpoint_dir) / "config.json"
        return cls.from_dict(_read_json(path), str(path))


@dataclass(frozen=True)
class ImageProcessorConfig:
    """``preprocessor_config.json``: how images become crops and patches."""

    base_image_input_size: tuple[int, int] = (378, 378)
    image_patch_size: int = 14
    image_pooling_h: int = 2
    image_pooling_w: int = 2
    overlap_margins: tuple[int, int] = (4, 4)
    max_crops: int = 8
    max_multi_image_crops: int = 4
    crop_mode: str = "overlap-and-resize-c2"
    resize_mode: str = "siglip"
    normalize_mode: str = "siglip"

    def __post_init__(self):
        object.__setattr__(self, "base_image_input_size", tuple(self.base_image_input_size))
        object.__setattr__(self, "overlap_margins", tuple(self.overlap_margins))
        _check_positive(self, "image_patch_size", "image_pooling_h", "image_pooling_w", "max_crops",
                        "max_multi_image_crops")
        _check_image_size("base_image_input_size", self.base_image_input_size)
        h, w = self.base_image_input_size
        if h != w:
            raise ConfigError(f"base_image_input_size must be square, got {self.base_image_input_size}")
        if h % self.image_patch_size:
            raise ConfigError("base_image_input_size must be a multiple of image_patch_size")
        if len(self.overlap_margins) != 2 or sum(self.overlap_margins) >= h // self.image_patch_size:
            raise ConfigError(f"overlap_margins {self.overlap_margins} must be two margins smaller than a crop")
        _check_equal(self, "crop_mode", "overlap-and-resize-c2")
        _check_equal(self, "resize_mode", "siglip")
        _check_equal(self, "normalize_mode", "siglip")

    @property
    def crop_patches(self) -> int:
        return self.base_image_input_size[0] // self.image_patch_size

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> ImageProcessorConfig:
        path = Path(checkpoint_dir) / "preprocessor_config.json"
        return _build(cls, _read_json(path), str(path))


@dataclass(frozen=True)
class ProcessorConfig:
    """``processor_config.json``: the text side of the processor (image column tokens, chat wrap)."""

    use_col_tokens: bool = True
    message_format: str = "role"
    always_start_with_space: bool = False
    system_prompt: str = "demo_or_style"
    style: str = "demo"
    prompt_templates: str = "uber_model"

    def __post_init__(self):
        _check_equal(self, "message_format", "role")
        _check_equal(self, "prompt_templates", "uber_model")
        _check_equal(self, "system_prompt", "demo_or_style")

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> ProcessorConfig:
        path = Path(checkpoint_dir) / "processor_config.json"
        if not path.exists():  # optional in older exports: the official defaults apply
            return cls()
        return _build(cls, _read_json(path), str(path))
