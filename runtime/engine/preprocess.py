"""Image preprocessing, identical to the official MolmoAct image processor (numpy, no torch).

One image becomes a global crop (the whole image squashed to the crop size) followed by the
overlapping high-resolution tiles, each cut into patches flattened in (dy, dx, c) order and
SigLIP-normalised to [-1, 1]. ``pooled_patches_idx`` says, for every ``<im_patch>`` token, which
2x2 patches the connector pools (``-1`` = padding, still attended to as a zero vector).

Bit-exactness matters here: the official resize interpolates in float32 on uint8 input and
rounds back to uint8, so the bilinear kernel below reproduces PyTorch's CPU kernel step by step
(source index, clamping, weights, the order of the multiply-adds). A different but legitimate
kernel may still flip an isolated value by one uint8 step (2/255 after normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from molmoact_edge.runtime.engine.config import ImageProcessorConfig
from molmoact_edge.runtime.engine.images import ImageError, check_pixels, pil_to_rgb_uint8


def as_rgb_uint8(image) -> np.ndarray:
    """Accept an HxWx3 uint8 array or a PIL image; anything else is refused with the reason."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image without importing PIL here
        image = pil_to_rgb_uint8(image)
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected an HxWx3 uint8 array or a PIL image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ImageError(f"expected uint8 pixels, got {image.dtype} (convert with (x*255).round().astype(np.uint8))")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError(f"empty image of shape {image.shape}")
    check_pixels(image.shape[1], image.shape[0])
    return image


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of PyTorch's bilinear upsampling (align_corners=False) along one axis."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = i0 + (i0 < in_size - 1)
    lam1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    lam0 = (np.float32(1) - lam1).astype(np.float32)
    return i0, i1, lam0, lam1


def resize_bilinear_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Squash an HxWx3 uint8 image to (height, width) like torchvision's ``Resize(BILINEAR,
    antialias=False)`` on a uint8 tensor: interpolate in float32, round half to even, back to uint8."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    y0, y1, ly0, ly1 = _linear_taps(h, height)
    x0, x1, lx0, lx1 = _linear_taps(w, width)
    src = image.astype(np.float32)
    lx0, lx1 = lx0[None, :, None], lx1[None, :, None]
    # Width inside, height outside: the order PyTorch's CPU kernel accumulates in. Its compiled
    # outer step is a fused multiply-add; float64 reproduces the single rounding of an FMA here
    # (a float32 product is exact in float64), which removes the last off-by-one-step pixels.
    top = src[y0][:, x0] * lx0 + src[y0][:, x1] * lx1
    bottom = src[y1][:, x0] * lx0 + src[y1][:, x1] * lx1
    first = (top * ly0[:, None, None]).astype(np.float64)
    out = (bottom.astype(np.float64) * ly1[:, None, None].astype(np.float64) + first).astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def siglip_normalize(image_uint8: np.ndarray) -> np.ndarray:
    x = image_uint8.astype(np.float32) / np.float32(255.0)
    return np.float32(-1.0) + x * np.float32(2.0)


def to_patches(crops: np.ndarray, patch: int) -> np.ndarray:
    """[n, H, W, C] -> [n, (H/p)*(W/p), p*p*C], patches row-major, pixels (dy, dx, c) inside a patch."""
    n, h, w, c = crops.shape
    x = crops.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def select_tiling(h: float, w: float, window: int, max_crops: int) -> tuple[int, int]:
    """The official tiling choice: the (rows, cols) grid of ``window``-pixel tiles that needs the
    least upscaling, or, when every grid needs downscaling, the least downscaling. Ties go to fewer
    tiles, then fewer rows."""
    tilings = sorted(((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops),
                     key=lambda t: (t[0] * t[1], t[0]))
    cand = np.array(tilings, dtype=np.int32) * window
    size = np.array([h, w], dtype=np.float32)
    with np.errstate(divide="ignore"):  # a side smaller than the margins gives size 0 -> infinite scale
        scale = np.min(cand.astype(np.float32) / size, axis=-1)
    if np.all(scale < 1):
        ix = int(np.argmax(scale))
    else:
        ix = int(np.argmin(np.where(scale < 1.0, 10e9, scale)))
    return tilings[ix]


def pool_groups(idx: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """[H, W] patch indices -> [ceil(H/ph), ceil(W/pw), ph*pw]: the patches each pooled token gathers.
    Odd grids are padded with -1, the extra row/column going to the bottom/right first."""
    hp = -idx.shape[0] % ph
    wp = -idx.shape[1] % pw
    idx = np.pad(idx, [[hp // 2, (hp + 1) // 2], [wp // 2, (wp + 1) // 2]], constant_values=-1)
    gh, gw = idx.shape[0] // ph, idx.shape[1] // pw
    return idx.reshape(gh, ph, gw, pw).transpose(0, 2, 1, 3).reshape(gh, gw, ph * pw)


@dataclass(frozen=True)
class ImageInputs:
    """One image's contribution to the model input."""

    crops: np.ndarray  # float32 [n_crops, patches_per_crop, patch_pixels]; crop 0 is the global view
    pooled_patches_idx: np.ndarray  # int64 [n_tokens, pool_h*pool_w] into this image's crops*patches
    grids: tuple[tuple[int, int], ...]  # (rows, cols) of pooled tokens: global grid, then tile grid


def _overlapping_tiles(image: np.ndarray, cfg: ImageProcessorConfig, max_crops: int):
    """Tiles of ``crop`` pixels on a stride of ``window`` pixels, and for each patch of the resized
    image the index of the tile patch that represents it (overlap margins removed)."""
    p = cfg.image_patch_size
    crop = cfg.base_image_input_size[0]
    left, right = cfg.overlap_margins
    n = cfg.crop_patches  # patches per crop side
    window = (n - left - right) * p
    margin_px = (left + right) * p
    rows, cols = select_tiling(image.shape[0] - margin_px, image.shape[1] - margin_px, window, max_crops)
    src = siglip_normalize(resize_bilinear_uint8(image, rows * window + margin_px, cols * window + margin_px))

    tiles = np.empty((rows * cols, crop, crop, 3), dtype=np.float32)
    owner = np.empty((rows, cols, n, n), dtype=np.int64)
    for i in range(rows):
        for j in range(cols):
            k = i * cols + j
            tiles[k] = src[i * window:i * window + crop, j * window:j * window + crop]
            idx = np.arange(n * n, dtype=np.int64).reshape(n, n) + k * n * n
            # A patch in an overlap margin is represented by the neighbouring tile instead.
            if i > 0:
                idx[:left, :] = -1
            if j > 0:
                idx[:, :left] = -1
            if i < rows - 1:
                idx[-right:, :] = -1
            if j < cols - 1:
                idx[:, -right:] = -1
            owner[i, j] = idx
    flat = owner.transpose(0, 2, 1, 3).reshape(-1)  # row-major over the resized image's patches
    patch_map = flat[flat >= 0].reshape(src.shape[0] // p, src.shape[1] // p)
    return tiles, patch_map


def preprocess_image(image, cfg: ImageProcessorConfig, max_crops: int) -> ImageInputs:
    """Crops and pooling map of one image, as the official ``overlap-and-resize-c2`` mode builds them."""
    image = as_rgb_uint8(image)
    p, crop = cfg.image_patch_size, cfg.base_image_input_size[0]
    n = cfg.crop_patches
    tiles, patch_map = _overlapping_tiles(image, cfg, max_crops)
    global_view = siglip_normalize(resize_bilinear_uint8(image, crop, crop))

    tile_pool = pool_groups(patch_map, cfg.image_pooling_h, cfg.image_pooling_w)
    global_pool = pool_groups(np.arange(n * n, dtype=np.int64).reshape(n, n), cfg.image_pooling_h, cfg.image_pooling_w)
    # The global view goes first, so tile patch indices shift by one crop.
    tile_pool = np.where(tile_pool >= 0, tile_pool + n * n, -1)
    pooled = np.concatenate([global_pool.reshape(-1, global_pool.shape[-1]), tile_pool.reshape(-1, tile_pool.shape[-1])])
    crops = to_patches(np.concatenate([global_view[None], tiles]), p)
    return ImageInputs(crops=crops, pooled_patches_idx=pooled,
                       grids=(tuple(global_pool.shape[:2]), tuple(tile_pool.shape[:2])))


@dataclass(frozen=True)
class VisionInputs:
    """All images of one prompt, concatenated in prompt order."""

    crops: np.ndarray  # float32 [total_crops, patches_per_crop, patch_pixels]
    pooled_patches_idx: np.ndarray  # int64 [n_image_tokens, pool] into total_crops*patches_per_crop
    per_image: tuple[ImageInputs, ...]

    @property
    def n_tokens(self) -> int:
        return self.pooled_patches_idx.shape[0]


def preprocess_images(images, cfg: ImageProcessorConfig, multi: bool) -> VisionInputs:
    """``multi=False`` is the official single-image path (``images=[img]``, ``max_crops``);
    ``multi=True`` the nested multi-image path (``images=[[img, ...]]``, ``max_multi_image_crops``)."""
    if not multi and len(images) != 1:
        raise ImageError(f"the single-image layout takes exactly one image, got {len(images)}; "
                         "use the multi-view template for several camera views")
    if not images:
        raise ImageError("at least one image is required")
    max_crops = cfg.max_multi_image_crops if multi else cfg.max_crops
    try:
        per_image = tuple(preprocess_image(im, cfg, max_crops) for im in images)
    except MemoryError:  # the resize holds a float32 copy of the full image: 4x its uint8 size
        shapes = [getattr(im, "shape", getattr(im, "size", "?")) for im in images]
        raise ImageError(f"not enough memory to preprocess images of sizes {shapes}; downscale them "
                         "or free memory") from None
    offset, pooled = 0, []
    for item in per_image:
        # The official processor shifts the padding entries (-1) too, so from the second image on
        # they point at the previous image's last patch and are pooled as real features. The
        # released models were trained and evaluated that way; we reproduce it (fixture multi_2x256).
        pooled.append(item.pooled_patches_idx + offset)
        offset += item.crops.shape[0] * item.crops.shape[1]
    return VisionInputs(crops=np.concatenate([x.crops for x in per_image]),
                        pooled_patches_idx=np.concatenate(pooled), per_image=per_image)
