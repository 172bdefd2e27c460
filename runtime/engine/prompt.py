"""Prompt building: the official instruction templates, the chat wrap, image token blocks and BOS.

The token sequence is ``BOS`` + image blocks + ``User: <prompt> Assistant:``, where each image
contributes ``<im_start>`` + rows x (cols x ``<im_patch>`` + ``<im_col>``) + ``<im_end>`` for its
global grid and again for its tile grid. The multi-image layout prefixes each image's blocks with
the text ``Image N``. Tokenising the whole string at once (as the official processor does) keeps
the text/token boundaries identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from molmoact_edge.runtime.engine.config import ImageProcessorConfig, ProcessorConfig
from molmoact_edge.runtime.engine.preprocess import VisionInputs, preprocess_images
from molmoact_edge.runtime.engine.tokenizer import (
    IM_COL,
    IM_END,
    IM_PATCH,
    IM_START,
    Tokenizer,
)

# Verbatim from the official evaluation code (SteerSimplerEnv/molmoact_model_test.py for the
# single view; test_molmoact.py and run_libero_eval.py for the multi view).
SINGLE_VIEW_TEMPLATE = (
    "The task is {instruction}. What is the action that the robot should take. To figure out the action "
    "that the robot should take to {instruction}, let's think through it step by step. First, what is the "
    "depth map for this image? Second, what is the trajectory of the end effector? Based on the depth map "
    "of the image and the trajectory of the end effector, what is the action that the robot should take?"
)
MULTI_VIEW_TEMPLATE = (
    "The task is {instruction}. What is the action that the robot should take. To figure out the action "
    "that the robot should take to {instruction}, let's think through it step by step. First, what is the "
    "depth map for the first image? Second, what is the trajectory of the end effector in the first image? "
    "Based on the depth map of the first image and the trajectory of the end effector in the first image, "
    "along with other images from different camera views as additional information, what is the action "
    "that the robot should take?"
)
TEMPLATES = {"single": SINGLE_VIEW_TEMPLATE, "multi": MULTI_VIEW_TEMPLATE}

# Styles for which the official processor adds no "style:" prefix (processing_molmoact.DEMO_STYLES).
_DEMO_STYLES = frozenset({"point_count", "pointing", "cosyn_point", "user_qa", "long_caption", "short_caption",
                          "correction_qa", "demo", "android_control"})


def default_template(n_images: int) -> str:
    """The official eval scripts' convention: single-view for one image, multi-view for several."""
    return "single" if n_images == 1 else "multi"


class InputError(ValueError):
    """An instruction or prompt the model cannot take; the message says why and what to do."""


def check_instruction(instruction, tokenizer: Tokenizer | None = None) -> str:
    """Refuse an unusable instruction before any work is done.

    Without ``tokenizer`` only the cheap checks run (a non-empty string), so a command can call it
    before loading a model. With it, an instruction that contains any added or special token of
    the tokenizer is refused: the official processor encodes such text as the token itself (e.g.
    ``<|endoftext|>`` as EOS, ``<DEPTH_7>`` as a depth code), so the model would read structure
    the user never meant, and escaping it instead would break parity with the official prompt.
    """
    if not isinstance(instruction, str):
        raise InputError(f"the instruction must be text, got {type(instruction).__name__}")
    if not instruction.strip():
        raise InputError("the instruction is empty; say what the robot should do, e.g. 'close the box'")
    if tokenizer is not None:
        found = tokenizer.added_tokens_in(instruction)
        if found:
            raise InputError(f"the instruction contains {', '.join(map(repr, found))}: "
                             f"{'a special token' if len(found) == 1 else 'special tokens'} of the model's "
                             "tokenizer, which the processor would encode as the token itself, not as text; "
                             f"remove {'it' if len(found) == 1 else 'them'} from the instruction")
    return instruction


def instruction_prompt(instruction: str, template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; accepted: {sorted(TEMPLATES)}")
    check_instruction(instruction)
    return TEMPLATES[template].format(instruction=instruction)


def chat_wrap(prompt: str, proc: ProcessorConfig) -> str:
    """``User: <prompt> Assistant:`` (the checkpoint's chat template and the processor agree on it)."""
    if proc.style not in _DEMO_STYLES:
        prompt = f"{proc.style}: {prompt}"
    text = f"User: {prompt} Assistant:"
    return " " + text if proc.always_start_with_space else text


def image_block(grids, use_col_tokens: bool) -> str:
    parts = []
    for rows, cols in grids:
        row = IM_PATCH * cols + (IM_COL if use_col_tokens else "")
        parts.append(IM_START + row * rows + IM_END)
    return "".join(parts)


@dataclass(frozen=True)
class ModelInputs:
    """Everything the model needs for one step: token ids and the vision inputs they refer to."""

    input_ids: np.ndarray  # int64 [S]
    vision: VisionInputs
    text: str  # the chat-wrapped prompt (without image tokens)
    template: str

    @property
    def n_image_tokens(self) -> int:
        return self.vision.n_tokens


def _check_image_count(n_images: int, image_cfg: ImageProcessorConfig, proc_cfg: ProcessorConfig,
                       max_positions: int) -> None:
    """Refuse more images than the model has positions for before any of them is preprocessed:
    each image's global view alone takes a fixed block of tokens (MolmoAct-7B: 212)."""
    rows = -(-image_cfg.crop_patches // image_cfg.image_pooling_h)
    cols = -(-image_cfg.crop_patches // image_cfg.image_pooling_w)
    per_image = rows * (cols + int(proc_cfg.use_col_tokens)) + 2
    if n_images * per_image > max_positions:
        raise InputError(f"{n_images} images need at least {n_images * per_image} positions ({per_image} each), "
                         f"more than the model's max_position_embeddings ({max_positions}); use fewer images")


def build_inputs(images, instruction: str, tokenizer: Tokenizer, image_cfg: ImageProcessorConfig,
                 proc_cfg: ProcessorConfig, template: str | None = None,
                 max_positions: int | None = None) -> ModelInputs:
    """Images + instruction -> token ids and crops, exactly as the official processor builds them.

    ``template='single'`` uses the flat single-image layout; ``'multi'`` the nested layout (also for
    one image, which is what the official ``test_molmoact.py`` does). ``max_positions`` (the
    model's ``max_position_embeddings``) refuses a prompt the model has no positions for.
    """
    images = list(images)
    template = template or default_template(len(images))
    multi = template == "multi"
    check_instruction(instruction, tokenizer)
    text = chat_wrap(instruction_prompt(instruction, template), proc_cfg)
    if max_positions is not None:
        _check_image_count(len(images), image_cfg, proc_cfg, max_positions)
    vision = preprocess_images(images, image_cfg, multi=multi)
    blocks = [image_block(item.grids, proc_cfg.use_col_tokens) for item in vision.per_image]
    if multi:
        blocks = [f"Image {k + 1}{b}" for k, b in enumerate(blocks)]
    ids = tokenizer.encode("".join(blocks) + text)
    bos = tokenizer.special.bos
    if not ids or ids[0] != bos:
        ids = [bos] + ids
    input_ids = np.asarray(ids, dtype=np.int64)
    if max_positions is not None and len(input_ids) > max_positions:
        raise InputError(f"the prompt is {len(input_ids)} tokens ({vision.n_tokens} of them image features), "
                         f"more than the model's max_position_embeddings ({max_positions}, config.json "
                         f"llm_config); shorten the instruction ({len(instruction)} characters, repeated twice "
                         "by the template) or use fewer images")
    n_patch = int((input_ids == tokenizer.special.im_patch).sum())
    if n_patch != vision.n_tokens:  # would mean the tokenizer split an image token: refuse loudly
        raise ValueError(f"prompt has {n_patch} <im_patch> tokens but the images produce {vision.n_tokens} features")
    return ModelInputs(input_ids=input_ids, vision=vision, text=text, template=template)
