"""scikit-learn's 8x8 handwritten digits as image folders, for the training entry point and its ``digits-*``
configs (which train the five models as ``examples/train_digits.py``'s recipes do).

    python -m mmgen_pytorch.data.digits DIR    # DIR/train/<digit>/<index>.png, DIR/train-captions.jsonl, DIR/test/...

The split is the digits examples' (:func:`~mmgen_pytorch.evaluation.features.digits_split`: 1,257 training and
540 held-out digits). Each digit is a greyscale 8x8 PNG, its pixel values 0..16 written as ``round(255 v / 16)``
(the scale :func:`~mmgen_pytorch.evaluation.features.digits_pca_extractor` reads them at), in the class folder
named by the digit, so labels are the digits themselves; the captions files give each image its digit's name
("zero" ... "nine"). Needs scikit-learn (the ``examples`` extra) and Pillow (``data``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .._utils import check
from .images import pil_image_module

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "test")


def write_digits_folder(root: Union[str, Path], *, split: str = "train") -> Path:
    """Write ``split`` ("train" or "test") of the digits under ``root``: ``root/<split>/<digit>/<index>.png``
    and ``root/<split>-captions.jsonl``. Returns the images folder ``root/<split>``; a folder already written
    is rewritten whole."""
    from ..evaluation.features import digits_split

    check(split in SPLITS, f"`split` must be one of {SPLITS}, got {split!r}")
    Image = pil_image_module()
    x_train, x_test, y_train, y_test = digits_split()
    pixels, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
    folder = Path(root) / split
    uint8 = torch.as_tensor(pixels, dtype=torch.float64).mul(255 / 16).round().to(torch.uint8).view(-1, 8, 8)
    lines = []
    for index, (image, label) in enumerate(zip(uint8, labels.tolist())):
        name = f"{label}/{index:04d}.png"
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.numpy()).save(folder / name)  # a 2-D uint8 array: mode "L"
        lines.append(json.dumps({"file": name, "caption": DIGIT_NAMES[label]}))
    (Path(root) / f"{split}-captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmgen_pytorch.data.digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the folder to write both splits into")
    args = parser.parse_args(argv)
    for split in SPLITS:
        print(f"wrote {write_digits_folder(args.root, split=split)}")


if __name__ == "__main__":
    main()
