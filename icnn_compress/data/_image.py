"""Opening one image file as 8-bit RGB or grey, whatever PIL mode it was saved in, or a DatasetError saying why not.

PIL's ``convert`` saturates wider grey modes instead of scaling them: a 16-bit PNG (modes ``I;16``/``I``)
becomes a white image and a float TIFF in [0, 1] (mode ``F``) a black one, and a training run would go on
without a word. Here 16-bit values are scaled to 8 bits, float images in [0, 1] are scaled by 255 (others
are clipped to [0, 255]), and a file over PIL's decompression-bomb limit is refused with the setting that
raises the limit, instead of a traceback.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from icnn_compress.errors import DatasetError

_WIDE_GREY = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit or float grey image to mode ``L`` (PIL itself would clip it to 0..255)."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scaled = values * 255.0 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else values
    else:  # 16-bit PNGs open as I;16 or I; a wider (signed 32-bit) map is scaled from its positive range
        top = 65535.0 if not values.size or values.max() <= 65535 else 2147483647.0
        scaled = values * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def open_image(file: Path, mode: str) -> Image.Image:
    """Decode ``file`` now (a truncated file fails here, not in a worker later) and return it in ``mode``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                img.load()
                if img.mode in _WIDE_GREY:
                    return _to_8bit_grey(img).convert(mode)
                return img.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DatasetError(
            f"cannot read image {file}: {err} If the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS "
            "before reading it, or resize it."
        ) from err
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three for broken files and modes
        raise DatasetError(f"cannot read image {file}: {err}") from err
