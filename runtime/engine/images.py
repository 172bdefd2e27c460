"""Image files and PIL images -> HxWx3 uint8 RGB arrays, with their size checked before decoding.

Every image the engine takes from a file goes through :func:`load_image`, so that a damaged, huge
or unusual file ends in one :class:`ImageError` that names the file and the problem, never in a
traceback from deep inside the decoder.

The pixel limit. The processor squashes any image into at most ``max_crops`` tiles of 378 px plus
a global view (MolmoAct-7B: 8 + 1 crops, about 1.3 megapixels of model input), so the pixels of a
much larger image are thrown away by the resize anyway; only its cost remains (a 12000 x 12000
image: 430 MB as uint8, 1.7 GB in the resize's float32 copy, seconds of work). ``MAX_IMAGE_PIXELS``
(40 megapixels) admits every robot camera (a RealSense D435 colour frame is 2 MP) and 8K UHD
(33 MP); above it the image is refused, not downscaled: a downscale of our own would change the
pixels the official resize sees and so the model's input, silently. A user with a huge photo can
resize it knowingly.

16-bit images. PIL's ``convert("RGB")`` clips a 16-bit grayscale image to 255 instead of scaling
it (almost every pixel turns white). Sixteen-bit samples span 0..65535 (the PNG definition), so
they are scaled to 0..255 here, rounded, and the grey value repeated over the three channels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

MAX_IMAGE_PIXELS = 40_000_000

# PIL modes holding 16-bit samples; "I" (32-bit) arises from a PNG only for 16-bit grayscale.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageError(ValueError):
    """An input image that cannot be used; the message says what was received and what is expected."""


def check_pixels(width: int, height: int, where: str = "the image") -> None:
    """Refuse an image above :data:`MAX_IMAGE_PIXELS` (or without pixels) before it is decoded."""
    if width < 1 or height < 1:
        raise ImageError(f"{where} is empty ({width} x {height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{where} is {width} x {height} = {width * height / 1e6:.1f} megapixels, above the "
                         f"limit of {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; the model sees at most a few "
                         "megapixels of it, so downscale it first (e.g. to the camera's working resolution)")


def _sixteen_bit_gray_to_rgb(image) -> np.ndarray:
    gray = np.asarray(image).astype(np.uint32)  # "I" arrives as int32, "I;16*" as (big/little) uint16
    if gray.min() < 0 or gray.max() > 65535:
        raise ImageError(f"16-bit image with values outside 0..65535 ({gray.min()}..{gray.max()})")
    scaled = ((gray * 255 + 32767) // 65535).astype(np.uint8)  # round(x * 255 / 65535)
    return np.repeat(scaled[:, :, None], 3, axis=2)


def pil_to_rgb_uint8(image, where: str = "the image") -> np.ndarray:
    """A PIL image -> HxWx3 uint8 RGB (EXIF orientation applied), 16-bit grayscale scaled, not clipped."""
    from PIL import ImageOps

    check_pixels(*image.size, where=where)
    sixteen_bit = image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG")
    image = ImageOps.exif_transpose(image)  # a copy, which no longer knows its file format
    if sixteen_bit:
        return _sixteen_bit_gray_to_rgb(image)
    if image.mode in ("I", "F"):
        raise ImageError(f"{where} has {'32-bit integer' if image.mode == 'I' else 'floating-point'} pixels, "
                         "which have no defined white level; save it as an 8-bit or 16-bit image")
    return np.asarray(image.convert("RGB"))


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array, or raise :class:`ImageError` saying why not."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        with warnings.catch_warnings():
            # PIL warns from 89 megapixels; our own, lower limit refuses such an image just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            # The header is read; the pixels are not: refuse a huge image before decoding it.
            check_pixels(*im.size, where=f"image {path}")
            im.load()
            return pil_to_rgb_uint8(im, where=f"image {path}")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image file PIL can read (PNG or JPEG expected)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {path} is refused as a decompression bomb ({e})") from None
    except MemoryError:
        raise ImageError(f"not enough memory to decode image {path}; downscale it or free memory") from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, struct.error...
        raise ImageError(f"image {path} could not be decoded ({type(e).__name__}: {e}); it is probably "
                         "truncated or corrupt: re-save or re-copy it") from None
