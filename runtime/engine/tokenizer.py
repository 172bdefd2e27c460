"""The checkpoint's tokenizer, on the `tokenizers` library (Rust; no transformers, no torch).

Special-token ids are resolved from the tokenizer file itself and checked, never assumed: a
checkpoint whose tokenizer lacks a token MolmoAct needs is refused with the token's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from molmoact_edge.runtime.engine.config import ConfigError

# The processor's image tokens, in the order the official processor resolves them.
IM_START, IM_END, IM_PATCH, IM_COL, IMAGE_PROMPT, IM_LOW = (
    "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>", "<im_low>")
DEPTH_START, DEPTH_END = "<DEPTH_START>", "<DEPTH_END>"


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: int
    pad: int
    im_start: int
    im_end: int
    im_patch: int
    im_col: int
    depth_start: int
    depth_end: int
    depth_codes: tuple[int, ...]  # <DEPTH_0>, <DEPTH_1>, ... in code order
    base_vocab_size: int  # entries of the BPE model without added tokens (Qwen2: 151643)


class Tokenizer:
    """Text <-> ids with the checkpoint's ``tokenizer.json``.

    ``encode`` adds nothing (the official processor inserts BOS itself); ``decode`` matches the
    official ``batch_decode(..., clean_up_tokenization_spaces=False)``.
    """

    def __init__(self, tokenizer_json: str | Path, eos_token: str = "<|endoftext|>",
                 bos_token: str | None = None, pad_token: str | None = None):
        from tokenizers import Tokenizer as _RustTokenizer

        path = Path(tokenizer_json)
        if not path.exists():
            raise ConfigError(f"{path} is missing; copy tokenizer.json from the MolmoAct checkpoint")
        try:
            self._tok = _RustTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception with a parse message
            raise ConfigError(f"{path} could not be read as a tokenizers JSON file: {e}") from e
        self.path = path
        self.special = self._resolve(eos_token, bos_token or eos_token, pad_token or eos_token)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> Tokenizer:
        d = Path(checkpoint_dir)
        cfg_path = d / "tokenizer_config.json"
        names: dict[str, str] = {}
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            for role in ("eos_token", "bos_token", "pad_token"):
                v = cfg.get(role)
                if isinstance(v, dict):  # AddedToken serialisation
                    v = v.get("content")
                if isinstance(v, str):
                    names[role] = v
        return cls(d / "tokenizer.json", names.get("eos_token", "<|endoftext|>"),
                   names.get("bos_token"), names.get("pad_token"))

    def _id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ConfigError(f"{self.path}: token {token!r} is not in the vocabulary; this is not a MolmoAct "
                              "tokenizer (use the tokenizer.json shipped with the checkpoint)")
        return i

    def _resolve(self, eos: str, bos: str, pad: str) -> SpecialTokens:
        image_tokens = (IM_START, IM_END, IM_PATCH, IM_COL, IMAGE_PROMPT, IM_LOW)
        ids = [self._id(t) for t in image_tokens]
        # The official processor finds these ids by encoding the joined strings; they must come
        # back as exactly one id each or the prompt would be tokenised differently.
        if self.encode("".join(image_tokens)) != ids:
            raise ConfigError(f"{self.path}: image tokens are not atomic added tokens")
        depth_codes = []
        while (i := self._tok.token_to_id(f"<DEPTH_{len(depth_codes)}>")) is not None:
            depth_codes.append(i)
        if not depth_codes:
            raise ConfigError(f"{self.path}: no <DEPTH_k> tokens; this is not a MolmoAct tokenizer")
        return SpecialTokens(
            bos=self._id(bos), eos=self._id(eos), pad=self._id(pad),
            im_start=ids[0], im_end=ids[1], im_patch=ids[2], im_col=ids[3],
            depth_start=self._id(DEPTH_START), depth_end=self._id(DEPTH_END),
            depth_codes=tuple(depth_codes),
            base_vocab_size=self._tok.get_vocab_size(with_added_tokens=False),
        )

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def added_tokens(self) -> tuple[str, ...]:
        """Every token of the file's ``added_tokens`` (special or not), in id order."""
        decoder = self._tok.get_added_tokens_decoder()
        return tuple(decoder[i].content for i in sorted(decoder))

    def added_tokens_in(self, text: str) -> list[str]:
        """The added tokens whose text occurs in ``text`` (``encode`` turns such an occurrence into
        the token's id), in order of first appearance. Tokens flagged ``normalized`` are looked for
        in the normalised text, as the Rust tokenizer matches them; the others in the raw text."""
        normalizer = self._tok.normalizer
        normalized = normalizer.normalize_str(text) if normalizer is not None else text
        found = {}
        for token in self._tok.get_added_tokens_decoder().values():
            where = normalized if token.normalized else text
            at = where.find(token.content)
            if at >= 0:
                found[token.content] = at
        return sorted(found, key=lambda t: (found[t], -len(t)))

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def rust(self):
        """The underlying ``tokenizers.Tokenizer`` (for vocabulary-wide work such as the grammar)."""
        return self._tok
