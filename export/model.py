"""The PyTorch reference MolmoAct (7B-D family: SigLIP-style ViT + Qwen2-style LLM).

Module and parameter names mirror the released checkpoints' keys (``model.transformer.blocks.0.
self_attn.att_proj.weight`` ...), so loading is a name-for-name copy that can be checked key by
key. The numerics follow the official implementation: fp32 ViT and pooling attention, RMSNorm in
fp32, rotate-half RoPE on plain positions, image features ADDED to the ``<im_patch>`` embeddings.

The LLM keeps a static KV cache (allocated once for ``max_seq_len``, written in place at an
explicit position, gpt-fast style), so prefill, one-token decode and k-token verification are the
same forward call.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from molmoact_edge.runtime.engine.config import (
    AdapterConfig,
    LlmConfig,
    ModelConfig,
    VitConfig,
)
from torch import nn

CAUSAL = "causal"  # attention-mask marker: square causal mask, computed by the kernel itself

_ACT = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class MultiHeadAttention(nn.Module):
    """Bidirectional attention used by the ViT blocks and the 2x2 pooling connector."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, input_dim: int | None = None,
                 float32_attention: bool = True):
        super().__init__()
        input_dim = input_dim or hidden
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.float32_attention = float32_attention
        self.wq = nn.Linear(input_dim, heads * head_dim)
        self.wk = nn.Linear(input_dim, kv_heads * head_dim)
        self.wv = nn.Linear(input_dim, kv_heads * head_dim)
        self.wo = nn.Linear(heads * head_dim, hidden)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor | None = None) -> torch.Tensor:
        x_kv = x_q if x_kv is None else x_kv
        b, q_len = x_q.shape[:2]
        q = self.wq(x_q).view(b, q_len, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_kv).view(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_kv).view(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dtype = q.dtype
        if self.float32_attention:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v).to(dtype)
        return self.wo(out.transpose(1, 2).reshape(b, q_len, -1))


class VitMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)
        self.act = _ACT[act]

    def forward(self, x):
        return self.w2(self.act(self.w1(x)))


class VitBlock(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.attention = MultiHeadAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                                            cfg.head_dim, float32_attention=cfg.float32_attention)
        self.feed_forward = VitMlp(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class _Blocks(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.resblocks = nn.ModuleList(blocks)


class VisionTransformer(nn.Module):
    """Patch embedding + learned positions + pre-LN blocks; no CLS token and no final norm. Only the
    blocks up to the deepest feature layer exist (the checkpoints are truncated the same way)."""

    def __init__(self, cfg: VitConfig, n_blocks: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.image_num_pos, cfg.hidden_size))
        self.patch_embedding = nn.Linear(cfg.patch_pixels, cfg.hidden_size, bias=cfg.patch_bias)
        self.transformer = _Blocks([VitBlock(cfg) for _ in range(n_blocks)])

    def forward(self, patches: torch.Tensor) -> list[torch.Tensor]:
        # Crops are always the configured size, so the learned positions apply unchanged.
        x = self.patch_embedding(patches) + self.positional_embedding[None].to(patches.dtype)
        outs = []
        for block in self.transformer.resblocks:
            x = block(x)
            outs.append(x)
        return outs


class ProjectorMlp(nn.Module):
    """SwiGLU without biases: w2(act(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, out: int, act: str):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.act = _ACT[act]

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class VisionBackbone(nn.Module):
    """Crops -> multi-layer ViT features -> 2x2 attention pooling -> projection, one row per
    ``<im_patch>`` token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a: AdapterConfig = cfg.adapter
        self.feature_layers = cfg.vit_layer_indices
        self.image_vit = VisionTransformer(cfg.vit, cfg.vit_blocks_needed)
        pool_dim = cfg.vit.hidden_size * len(a.vit_layers)
        self.image_pooling_2d = MultiHeadAttention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads,
                                                   a.head_dim, input_dim=pool_dim,
                                                   float32_attention=a.float32_attention)
        self.image_projector = ProjectorMlp(a.hidden_size, a.intermediate_size, a.text_hidden_size, a.hidden_act)

    def vit_features(self, crops: torch.Tensor) -> torch.Tensor:
        """[n_crops, patches, pixels] -> [n_crops, patches, n_layers*vit_hidden] (layer order as configured)."""
        outs = self.image_vit(crops)
        return torch.cat([outs[i] for i in self.feature_layers], dim=-1)

    def pooled_features(self, crops: torch.Tensor, pooled_patches_idx: torch.Tensor) -> torch.Tensor:
        """One projected row per pooling group, including groups without any valid patch."""
        return self.pool(self.vit_features(crops.to(self.image_vit.patch_embedding.weight.dtype)), pooled_patches_idx)

    def pool(self, feats: torch.Tensor, pooled_patches_idx: torch.Tensor) -> torch.Tensor:
        """pooled_features from the ViT's features (a trainer with a frozen ViT caches them)."""
        feats = feats.reshape(-1, feats.shape[-1])
        valid = pooled_patches_idx >= 0
        # Padding slots are gathered as zero vectors that still count in the mean and are attended
        # to as keys: the official connector applies no mask, and the models were trained so.
        to_pool = feats[pooled_patches_idx.clamp(min=0)] * valid[..., None].to(feats.dtype)
        query = to_pool.mean(dim=-2, keepdim=True)
        pooled = self.image_pooling_2d(query, to_pool)[:, 0]
        return self.image_projector(pooled)

    def forward(self, crops: torch.Tensor, pooled_patches_idx: torch.Tensor) -> torch.Tensor:
        """Rows only for the groups with a valid patch: one per ``<im_patch>`` token."""
        return self.pooled_features(crops, pooled_patches_idx)[(pooled_patches_idx >= 0).any(dim=-1)]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, theta: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [q, head_dim] for plain integer positions (rotate-half layout), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                                / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


KeyValueStore = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""One layer's key/value memory as the block body sees it: given the new k, v [b, kv_heads, q, hd],
store them and return all keys/values so far ([b, kv_heads, n, hd]). The layout behind it is the
caller's (a static cache written in place, an explicit past concatenated for ONNX, ...)."""


def static_cache_store(k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> KeyValueStore:
    """The reference's store: write the new rows in place at ``positions`` of a preallocated
    [b, kv_heads, max_seq_len, hd] cache and read back the filled prefix."""

    def store(k, v):
        k_cache[:, :, positions] = k.to(k_cache.dtype)
        v_cache[:, :, positions] = v.to(v_cache.dtype)
        end = int(positions[-1]) + 1
        return k_cache[:, :, :end], v_cache[:, :, :end]

    return store


class Attention(nn.Module):
    """Causal GQA with fused q|k|v projection (with bias) and an output projection without bias."""

    def __init__(self, cfg: LlmConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.split = (cfg.hidden_size, cfg.kv_dim, cfg.kv_dim)
        self.att_proj = nn.Linear(cfg.hidden_size, sum(self.split), bias=cfg.qkv_bias)
        self.attn_out = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def project(self, x, cos, sin):
        """q [b, heads, q, hd] and the new k, v [b, kv_heads, q, hd], RoPE applied."""
        b, q_len, _ = x.shape
        q, k, v = self.att_proj(x).split(self.split, dim=-1)
        q = q.view(b, q_len, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos.to(q.dtype), sin.to(q.dtype)), apply_rope(k, cos.to(k.dtype), sin.to(k.dtype)), v

    def attend(self, q, keys, values, mask):
        """Causal attention of q over all keys/values so far ([b, kv_heads, n, hd]). ``mask`` is a bool
        [q, n] (True where a query may look), ``None`` (look everywhere) or :data:`CAUSAL`. The two
        special cases matter on CPU, where PyTorch's masked SDPA path is ~50x slower for one query."""
        b, _, q_len, _ = q.shape
        rep = self.heads // self.kv_heads
        if rep > 1:
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        if mask is None:  # one query over its whole past: nothing to mask
            out = F.scaled_dot_product_attention(q, keys, values)
        elif mask is CAUSAL:  # a prefill from position 0: a plain causal square
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.attn_out(out.transpose(1, 2).reshape(b, q_len, -1))

    def forward(self, x, cos, sin, kv: KeyValueStore, mask):
        q, k, v = self.project(x, cos, sin)
        keys, values = kv(k, v)
        return self.attend(q, keys, values, mask)


class LlmMlp(nn.Module):
    """Fused gated MLP: ``ff_proj`` rows are [up | gate]; out = ff_out(act(gate) * up)."""

    def __init__(self, cfg: LlmConfig):
        super().__init__()
        self.ff_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.ff_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = _ACT[cfg.hidden_act]

    def forward(self, x):
        up, gate = self.ff_proj(x).chunk(2, dim=-1)
        return self.ff_out(self.act(gate) * up)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: LlmConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = LlmMlp(cfg)
        self.ff_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x, cos, sin, kv: KeyValueStore, mask):
        """The one block body of every LLM variant; ``kv`` hides the cache layout."""
        x = x + self.self_attn(self.attn_norm(x), cos, sin, kv, mask)
        return x + self.mlp(self.ff_norm(x))


class Embedding(nn.Module):
    """Input table = base vocabulary rows + input-only extra rows (the image tokens live there)."""

    def __init__(self, cfg: LlmConfig):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.hidden_size))
        self.new_embedding = nn.Parameter(torch.zeros(cfg.additional_vocab_size, cfg.hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        base = ids < self.embedding.shape[0]
        # Index each table separately: concatenating a 7B table per call would copy ~1 GB.
        out = self.embedding[ids.clamp(max=self.embedding.shape[0] - 1)]
        extra = self.new_embedding[(ids - self.embedding.shape[0]).clamp(min=0)]
        return torch.where(base[..., None], out, extra)


class Transformer(nn.Module):
    def __init__(self, cfg: LlmConfig):
        super().__init__()
        self.wte = Embedding(cfg)
        self.blocks = nn.ModuleList([DecoderBlock(cfg) for _ in range(cfg.num_hidden_layers)])
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def run(self, x, cos, sin, mask, layer_kv: Callable[[int], KeyValueStore],
            hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Embeddings [b, q, H] through every block (block i stores into ``layer_kv(i)``), then the
        final norm. With ``hidden``, each block's output is appended to it."""
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, layer_kv(i), mask)
            if hidden is not None:
                hidden.append(x)
        return self.ln_f(x)


class _Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transformer = Transformer(cfg.llm)
        self.vision_backbone = VisionBackbone(cfg)


class MolmoAct(nn.Module):
    """Reference MolmoAct with a static KV cache. Call :meth:`setup_cache` before :meth:`forward`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = _Model(cfg)
        self.lm_head = nn.Linear(cfg.llm.hidden_size, cfg.llm.vocab_size, bias=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    @property
    def max_seq_len(self) -> int:
        return 0 if self.k_cache is None else self.k_cache.shape[-2]

    def setup_cache(self, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate the KV cache once: [layers, batch=1, kv_heads, max_seq_len, head_dim] each for K and V."""
        llm = self.config.llm
        if max_seq_len > llm.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                             f"{llm.max_position_embeddings}")
        dtype = dtype or self.lm_head.weight.dtype
        device = self.lm_head.weight.device
        shape = (llm.num_hidden_layers, 1, llm.num_key_value_heads, max_seq_len, llm.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def image_features(self, crops: torch.Tensor, pooled_patches_idx: torch.Tensor) -> torch.Tensor:
        return self.model.vision_backbone(crops, pooled_patches_idx)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [1, q, H] with image features added at the ``<im_patch>`` positions."""
        x = self.model.transformer.wte(input_ids)
        if image_features is not None:
            is_patch = input_ids[0] == self.config.image_patch_id
            n = int(is_patch.sum())
            if n != image_features.shape[0]:
                raise ValueError(f"{n} <im_patch> tokens but {image_features.shape[0]} image feature rows")
            x = x.clone()
            x[0, is_patch] += image_features.to(x.dtype)
        return x

    def forward(self, inputs_embeds: torch.Tensor, start_pos: int, logits_rows: torch.Tensor | None = None,
                return_hidden: bool = False):
        """Run q new tokens at positions start_pos..start_pos+q-1 against the cache.

        Returns logits for ``logits_rows`` (indices into the q new tokens; default: the last one),
        and with ``return_hidden`` also the per-layer hidden states (inputs, each block, ln_f).
        """
        if self.k_cache is None:
            raise RuntimeError("call setup_cache(max_seq_len) before forward")
        q_len = inputs_embeds.shape[1]
        end = start_pos + q_len
        if end > self.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds the KV cache of {self.max_seq_len}; "
                             "raise max_seq_len")
        device = inputs_embeds.device
        positions = torch.arange(start_pos, end, device=device)
        cos, sin = rope_tables(self.config.llm.head_dim, self.config.llm.rope_theta, positions)
        if q_len == 1:
            mask = None
        elif start_pos == 0:
            mask = CAUSAL
        else:
            mask = torch.arange(end, device=device)[None, :] <= positions[:, None]  # [q, end] over the cache
        hidden = [inputs_embeds]
        x = self.model.transformer.run(
            inputs_embeds, cos, sin, mask,
            lambda i: static_cache_store(self.k_cache[i], self.v_cache[i], positions), hidden)
        if logits_rows is None:
            logits_rows = torch.tensor([q_len - 1], device=device)
        logits = self.lm_head(x[0, logits_rows])
        if return_hidden:
            hidden[-1] = x  # the official last hidden state is after ln_f
            return logits, hidden
        return logits
