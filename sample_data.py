"""Small real image data that ships offline, written out as image folders for demos and tests."""
import glob
import gzip
import os
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def write_class_folders(images: np.ndarray, labels: np.ndarray, root: str,
                        size: Optional[int] = None) -> str:
    """Write uint8 grey images (N, H, W) as `root/<label>/<index>.png`, resized to `size`."""
    for index, (pixels, label) in enumerate(zip(images, labels)):
        folder = os.path.join(root, str(label))
        os.makedirs(folder, exist_ok=True)
        image = Image.fromarray(pixels, mode="L")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        image.save(os.path.join(folder, f"{index:05d}.png"))
    return root


def write_digits_folder(root: str, size: int = 32, limit: Optional[int] = None) -> str:
    """Write scikit-learn's bundled 8x8 digits (upsampled to `size`) as a class-folder tree."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images[:limit] * (255.0 / 16.0)).astype(np.uint8)
    return write_class_folders(pixels, digits.target[:limit], root, size)


def read_idx(path: str) -> np.ndarray:
    """A gzipped idx file of unsigned bytes (the MNIST format) as an array of its stored shape."""
    with gzip.open(path, "rb") as idx_file:
        data = idx_file.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    shape = tuple(np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(folder: str, split: str, limit: Optional[int] = None
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """The first `limit` images (N, 28, 28) and labels of the 'train' or 'val' (test) split."""
    paths = [os.path.join(folder, name) for name in FASHION_MNIST_FILES[split]]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} not found: install the Debian package dataset-fashion-mnist "
            "or point to a folder holding the four Fashion-MNIST idx .gz files")
    images, labels = read_idx(paths[0])[:limit], read_idx(paths[1])[:limit]
    return images, labels.astype(np.int64)


def digits_train_val(val_size: int = 500, seed: int = 0
                     ) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """The bundled digits as uint8 8x8 images, split at random (seeded) into "val" (`val_size`
    images) and "train" (the rest): {split: (images, labels)}."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.RandomState(seed).permutation(len(pixels))
    return {"train": (pixels[order[val_size:]], digits.target[order[val_size:]]),
            "val": (pixels[order[:val_size]], digits.target[order[:val_size]])}


def write_splits(splits: Dict[str, Tuple[np.ndarray, np.ndarray]], root: str,
                 size: Optional[int] = None) -> str:
    """Write {split: (images, labels)} as `root/<split>/<label>/<index>.png` class folders."""
    for split, (images, labels) in splits.items():
        write_class_folders(images, labels, os.path.join(root, split), size)
    return root


def digit_fonts() -> list:
    """The TrueType fonts that ship with matplotlib (a dependency): serif, sans, mono, italics."""
    import matplotlib

    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    # STIX size variants, the cm* math fonts, LastResort and the Display fonts draw symbols,
    # boxes or nothing at the digits' code points.
    return sorted(path for path in glob.glob(os.path.join(folder, "*.ttf"))
                  if not os.path.basename(path).startswith(("STIXSiz", "STIXNonUni", "cm", "Last"))
                  and "Display" not in path)


def rendered_digits(count: int, size: int = 28, seed: int = 0
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """`count` grey digits (N, size, size) drawn in matplotlib's fonts with a random size, stroke,
    slant, rotation, shift, blur and noise, and their labels: a second offline digit set."""
    rng = np.random.RandomState(seed)
    fonts = digit_fonts()
    images = np.empty((count, size, size), dtype=np.uint8)
    labels = rng.randint(0, 10, size=count)
    canvas = size * 4  # drawn large, then shrunk: smooth edges as in scanned digits
    for index, label in enumerate(labels):
        font_size = int(canvas * rng.uniform(0.7, 0.95))
        font = ImageFont.truetype(fonts[rng.randint(len(fonts))], font_size)
        image = Image.new("L", (canvas, canvas), 0)
        ImageDraw.Draw(image).text((canvas / 2, canvas / 2), str(label), fill=255, font=font,
                                   anchor="mm")
        stroke = rng.randint(3)  # thicker pens: 0, 2 or 4 canvas pixels
        if stroke:
            image = image.filter(ImageFilter.MaxFilter(2 * stroke + 1))
        shear = rng.uniform(-0.3, 0.3)
        image = image.transform(image.size, Image.AFFINE,
                                (1, shear, -shear * canvas / 2, 0, 1, 0), Image.BILINEAR)
        image = image.rotate(rng.uniform(-15, 15), Image.BILINEAR,
                             translate=tuple(rng.uniform(-0.1, 0.1, 2) * canvas))
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2)))
        small = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32)
        small += rng.normal(0, rng.uniform(0, 12), small.shape)
        images[index] = np.clip(small, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)
