"""Small real image data that ships offline, written out as image folders for demos and tests."""
import os
from typing import Optional

import numpy as np
from PIL import Image


def write_digits_folder(root: str, size: int = 32, limit: Optional[int] = None) -> str:
    """Write scikit-learn's bundled 8x8 digits as `root/<digit>/<index>.png` RGB images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    count = len(digits.images) if limit is None else min(limit, len(digits.images))
    for index in range(count):
        folder = os.path.join(root, str(digits.target[index]))
        os.makedirs(folder, exist_ok=True)
        pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC)
        image.convert("RGB").save(os.path.join(folder, f"{index:04d}.png"))
    return root
