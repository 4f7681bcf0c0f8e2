"""Feature extractors for the metrics: uint8 images ``(N, 3, H, W)`` -> ``(N, D)`` float features, and for
the Inception Score ``(N, C)`` logits.

- :func:`inception_v3`: the standard FID Inception (torch-fidelity's ``FeatureExtractorInceptionV3``, the
  TensorFlow 'pt_inception-2015-12-05' weights): 2048 pool features and the 1008 ``logits_unbiased``.
  Needs the ``inception`` extra (``pip install mmgen-pytorch[inception]``: torch-fidelity, which needs
  torchvision), imported on first use.
- :class:`TinyConvExtractor`: a small random-weight conv net (seeded), for tests and smoke runs.
- :func:`digits_pca_extractor`: the 20-dim PCA of scikit-learn's 8x8 digits (fitted on the training split
  of :func:`digits_split`, pixel units 0..16), the feature space of ``examples/evaluate_digits.py``.

Every extractor has an :attr:`~FeatureExtractor.identity` (its name and a fingerprint of its weights),
which reference-statistics caches record so that statistics from another extractor are refused.
"""

from __future__ import annotations

import importlib
import itertools
import os
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch
from jaxtyping import Float, UInt8
from torch import Tensor, nn

from .._utils import check, check_positive_int, describe, eval_mode, install_hint
from ..data.cache import weights_fingerprint
from ..data.images import images_to_unit, uint8_to_images, unit_to_uint8

INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ENV = "MMGEN_INCEPTION_WEIGHTS"  # a local copy of the file, for machines without network
INCEPTION_FEATURES, INCEPTION_CLASSES = 2048, 1008
DIGITS_PCA_DIM = 20
DIGITS_SIZE = 8  # sklearn's digits are 8x8

FeaturesAndLogits = Tuple[Float[Tensor, "n d"], Optional[Float[Tensor, "n c"]]]


def check_uint8_images(name: str, images: Any, image_size: Optional[int] = None) -> None:
    """``images`` must be a uint8 tensor ``(N, 3, H, W)`` with N >= 1 (and ``H == W == image_size`` when
    given); TypeError / ValueError naming ``name`` otherwise."""
    check(isinstance(images, Tensor), f"`{name}` must be a uint8 tensor (N, 3, H, W), got {describe(images)}",
          error=TypeError)
    check(images.dtype == torch.uint8,
          f"`{name}` must be a uint8 tensor (N, 3, H, W) of pixels 0..255, got {describe(images)} (images in "
          f"[-1, 1]: convert with mmgen_pytorch.evaluation.images_to_uint8)", error=TypeError)
    check(images.ndim == 4 and images.shape[1] == 3 and images.shape[0] > 0 and images.shape[-1] > 0,
          f"`{name}` must be a uint8 tensor (N, 3, H, W) with N >= 1 RGB images, got {describe(images)}")
    check(image_size is None or tuple(images.shape[-2:]) == (image_size, image_size),
          f"`{name}` must be {image_size}x{image_size} images for this extractor, got {describe(images)}")


def images_to_uint8(images: Float[Tensor, "n 3 h w"]) -> UInt8[Tensor, "n 3 h w"]:
    """Float images in [-1, 1] (the models' and datasets' range) as uint8 pixels: ``round(255 (x + 1) / 2)``,
    clipped to 0..255 (values outside [-1, 1] are clipped, as when writing an image file); the conversion of
    sample grids and sampled PNGs (:func:`~mmgen_pytorch.data.images.unit_to_uint8`)."""
    check(isinstance(images, Tensor) and images.is_floating_point(),
          f"`images` must be a float tensor in [-1, 1], got {describe(images)}", error=TypeError)
    return unit_to_uint8(images_to_unit(images.detach()))


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters (or buffers) live; CPU for a module without either."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


class FeatureExtractor(nn.Module):
    """Base class: ``forward(images)`` -> ``(N, num_features)`` float features of uint8 images ``(N, 3, H, W)``;
    :meth:`extract` gives the features and the ``(N, num_classes)`` logits (None when ``num_classes`` is
    None: such an extractor cannot give the Inception Score).

    Subclasses implement :meth:`compute` (the images already checked and on the extractor's device).

    Args:
        name: what the extractor is, written into reference caches with the weights' fingerprint.
        num_features: D.
        num_classes: the number of logits, or None.
        image_size: the only side length accepted (None: any size, the extractor resizes).
    """

    def __init__(self, *, name: str, num_features: int, num_classes: Optional[int] = None,
                 image_size: Optional[int] = None):
        super().__init__()
        self.name = name
        self.num_features = check_positive_int("num_features", num_features)  # torchmetrics reads it too
        self.num_classes = None if num_classes is None else check_positive_int("num_classes", num_classes)
        self.image_size = None if image_size is None else check_positive_int("image_size", image_size)

    @property
    def identity(self) -> str:
        """``"<name> sha256:<hex>"``: the name and a fingerprint of every weight and buffer."""
        return f"{self.name} {weights_fingerprint(self)}"

    def compute(self, images: UInt8[Tensor, "n 3 h w"]) -> FeaturesAndLogits:
        raise NotImplementedError

    def extract(self, images: UInt8[Tensor, "n 3 h w"]) -> FeaturesAndLogits:
        """``(features (N, D) float, logits (N, C) or None)``, in eval mode without gradients."""
        check_uint8_images("images", images, self.image_size)
        with eval_mode(self), torch.no_grad():
            return self.compute(images.to(module_device(self)))

    def forward(self, images: UInt8[Tensor, "n 3 h w"]) -> Float[Tensor, "n d"]:
        return self.extract(images)[0]


# --- a random conv net ----------------------------------------------------------------------------------


class TinyConvExtractor(FeatureExtractor):
    """Two strided 3x3 convolutions with ReLU, a global average pool and (with ``num_classes``) a linear
    head, initialised from ``seed`` (torch's global RNG is left untouched). Pixels enter as ``x / 127.5 - 1``.
    Its features separate images, but mean nothing perceptually: for tests and smoke runs only."""

    def __init__(self, *, num_features: int = 16, num_classes: Optional[int] = None, width: int = 8, seed: int = 0):
        super().__init__(name=f"tiny-random-conv(seed={seed})", num_features=num_features, num_classes=num_classes)
        width = check_positive_int("width", width)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, self.num_features, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = None if num_classes is None else nn.Linear(self.num_features, self.num_classes)

    def compute(self, images: UInt8[Tensor, "n 3 h w"]) -> FeaturesAndLogits:
        features = self.body(uint8_to_images(images))
        return features, None if self.head is None else self.head(features)


# --- the digits' PCA ------------------------------------------------------------------------------------


class PCAExtractor(FeatureExtractor):
    """A linear projection of greyscale pixels: the channel mean of uint8 images ``image_size`` x
    ``image_size``, rescaled to ``0..pixel_max``, flattened, centred on ``mean`` and projected on
    ``components`` (as scikit-learn's ``PCA.transform`` without whitening)."""

    def __init__(self, *, mean: Any, components: Any, image_size: int, pixel_max: float, name: str):
        mean, components = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(components, dtype=torch.float64)
        super().__init__(name=name, num_features=components.shape[0], image_size=image_size)
        pixels = self.image_size ** 2
        check(mean.shape == (pixels,) and components.ndim == 2 and components.shape[1] == pixels,
              f"`mean` and `components` must be ({pixels},) and (D, {pixels}) for {image_size}x{image_size} images, "
              f"got {tuple(mean.shape)} and {tuple(components.shape)}")
        self.pixel_max = float(pixel_max)
        self.register_buffer("mean", mean)
        self.register_buffer("components", components)

    def compute(self, images: UInt8[Tensor, "n 3 h w"]) -> FeaturesAndLogits:
        grey = images.double().mean(1).flatten(1) * (self.pixel_max / 255)
        return (grey - self.mean) @ self.components.T, None


def sklearn_module(name: str):
    """A scikit-learn submodule, imported on first use; ImportError naming the package otherwise."""
    try:
        return importlib.import_module(f"sklearn.{name}")
    except ImportError as error:
        raise ImportError(f"the digits extractor needs scikit-learn: pip install scikit-learn "
                          f"(or {install_hint('examples')})") from error


def digits_split():
    """scikit-learn's 8x8 digits (pixels 0..16) split as the digits examples do:
    ``train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)`` -> ``x_train, x_test, y_train, y_test``."""
    digits = sklearn_module("datasets").load_digits()
    return sklearn_module("model_selection").train_test_split(
        digits.data, digits.target, test_size=0.3, random_state=0, stratify=digits.target)


def digits_pca_extractor() -> PCAExtractor:
    """The 20-dim PCA (``random_state=0``) fitted on the training split of :func:`digits_split`, on pixel
    units 0..16: takes 8x8 uint8 images (greyscale repeated over the channels, 255 = 16 units)."""
    pca = sklearn_module("decomposition").PCA(n_components=DIGITS_PCA_DIM, random_state=0).fit(digits_split()[0])
    return PCAExtractor(mean=pca.mean_, components=pca.components_, image_size=DIGITS_SIZE, pixel_max=16.0,
                        name=f"digits-pca{DIGITS_PCA_DIM}")


# --- Inception ------------------------------------------------------------------------------------------


class InceptionExtractor(FeatureExtractor):
    """torch-fidelity's InceptionV3 (resizes to 299 as TensorFlow 1 did): the 2048 pool features and the
    1008 ``logits_unbiased`` (the fc layer without its bias: torch-fidelity's Inception Score input)."""

    def __init__(self, network: nn.Module):
        super().__init__(name="torch-fidelity-inception-v3-compat(pt_inception-2015-12-05)",
                         num_features=INCEPTION_FEATURES, num_classes=INCEPTION_CLASSES)
        self.network = network

    def compute(self, images: UInt8[Tensor, "n 3 h w"]) -> FeaturesAndLogits:
        features, logits = self.network(images)
        return features, logits


def inception_v3(weights_path: Union[str, os.PathLike, None] = None) -> InceptionExtractor:
    """The standard FID Inception as a :class:`FeatureExtractor`.

    The weights file (``INCEPTION_WEIGHTS_FILE``, published at ``INCEPTION_WEIGHTS_URL``) comes from, in
    order: ``weights_path``; the ``MMGEN_INCEPTION_WEIGHTS`` environment variable; torch hub's checkpoint
    folder (``torch.hub.get_dir()/checkpoints``, where torch-fidelity downloads it); else torch-fidelity
    downloads it. A given file is checked to load with ``torch.load(weights_only=True)`` as a state dict
    holding ``fc.weight`` (1008, 2048) before anything is built.

    Raises:
        FileNotFoundError: the given path does not exist.
        ValueError: the file is not the Inception state dict.
        ImportError: torch-fidelity is not installed (``pip install mmgen-pytorch[inception]``).
        RuntimeError: no file was given and the download failed (no network).
    """
    path = _inception_weights_path(weights_path)
    if path is not None:
        _check_inception_weights(path)
    network_class = _torch_fidelity_inception()
    try:
        network = network_class("inception-v3-compat", ["2048", "logits_unbiased"],
                                feature_extractor_weights_path=None if path is None else str(path))
    except OSError as error:  # urllib's URLError is an OSError: no network
        raise RuntimeError(f"could not download the Inception weights from {INCEPTION_WEIGHTS_URL} ({error}); "
                           f"download {INCEPTION_WEIGHTS_FILE} elsewhere and pass its path as `weights_path` "
                           f"or in the {INCEPTION_WEIGHTS_ENV} environment variable") from error
    return InceptionExtractor(network)


def _inception_weights_path(weights_path: Union[str, os.PathLike, None]) -> Optional[Path]:
    """The given path, else the environment variable's, else torch hub's cached copy, else None (download)."""
    check(weights_path is None or isinstance(weights_path, (str, os.PathLike)),
          f"`weights_path` must be a file path or None, got {describe(weights_path)}", error=TypeError)
    given, source = (weights_path, "`weights_path`") if weights_path is not None else (
        os.environ.get(INCEPTION_WEIGHTS_ENV) or None, f"the {INCEPTION_WEIGHTS_ENV} environment variable")
    if given is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
        return cached if cached.is_file() else None
    path = Path(given)
    check(path.is_file(), f"{source}: the Inception weights file {str(path)!r} does not exist; it is "
                          f"{INCEPTION_WEIGHTS_FILE}, from {INCEPTION_WEIGHTS_URL}", error=FileNotFoundError)
    return path


def _check_inception_weights(path: Path) -> None:
    """The file loads as a tensor state dict (weights_only) with the 1008-class fc layer of this Inception."""
    expected = f"expected the Inception state dict {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle, zip or format error: the file is not a tensor checkpoint
        raise ValueError(f"the Inception weights file {str(path)!r} does not load with torch.load(weights_only=True) "
                         f"({type(error).__name__}: {error}); {expected}") from error
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    check(isinstance(fc, Tensor) and tuple(fc.shape) == (INCEPTION_CLASSES, INCEPTION_FEATURES),
          f"the Inception weights file {str(path)!r} holds no `fc.weight` of shape "
          f"({INCEPTION_CLASSES}, {INCEPTION_FEATURES}); {expected}")


def _torch_fidelity_inception() -> type:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as error:
        raise ImportError(f"the Inception extractor needs torch-fidelity (which needs torchvision): "
                          f"{install_hint('inception')} (or pip install torch-fidelity)") from error
    return FeatureExtractorInceptionV3


# --- by name (the command line, the training config) ----------------------------------------------------

TINY_FEATURES, TINY_CLASSES = 16, 10
EXTRACTOR_FEATURES = {"inception": INCEPTION_FEATURES, "pca-digits": DIGITS_PCA_DIM, "tiny": TINY_FEATURES}
EXTRACTORS = tuple(EXTRACTOR_FEATURES)
EXTRACTOR_USES = {"inception": "the published numbers", "pca-digits": "8x8 digits only",
                  "tiny": "tests and smoke runs only"}
EXTRACTOR_SIZES = {"pca-digits": DIGITS_SIZE}  # the only image size each takes (the others resize)


def check_extractor_name(name: Any, *, inception_weights: Any = None, option: str = "extractor",
                         weights_option: str = "inception_weights", image_size: Optional[Tuple[int, int]] = None,
                         images: str = "the images") -> str:
    """``name`` must be one of :data:`EXTRACTORS`, ``inception_weights`` (a path) goes only with
    ``inception``, and ``images`` of ``image_size`` ``(H, W)`` (when known) must be a size the extractor
    takes (:data:`EXTRACTOR_SIZES`); errors name ``option`` / ``weights_option``."""
    check(name in EXTRACTORS, f"`{option}` must be one of {list(EXTRACTORS)}, got {name!r}")
    check(inception_weights is None or name == "inception",
          f"`{weights_option}` goes with the inception extractor, not with {name!r}")
    side = EXTRACTOR_SIZES.get(name)
    check(side is None or image_size is None or tuple(image_size) == (side, side),
          f"`{option}` {name} takes {side}x{side} images, but {images} are "
          f"{image_size[1] if image_size else 0}x{image_size[0] if image_size else 0}")
    return name


def check_extractor_installed(name: str, *, option: str = "extractor", by_default: bool = False) -> None:
    """The packages extractor ``name`` needs import (nothing is built or downloaded): an :class:`ImportError`
    naming ``option`` (``by_default``: not given, ``name`` is its default), what to install and the other
    extractors otherwise."""
    need = {"inception": _torch_fidelity_inception, "pca-digits": lambda: sklearn_module("decomposition")}.get(name)
    try:
        if need is not None:
            need()
    except ImportError as error:
        others = " / ".join(f"{other} ({EXTRACTOR_USES[other]})" for other in EXTRACTORS if other != name)
        default = " (the default)" if by_default else ""
        raise ImportError(f"`{option}` {name}{default}: {error}; or choose `{option}` {others}") from None


def build_extractor(name: str, *, inception_weights: Union[str, os.PathLike, None] = None,
                    device: Union[str, torch.device, None] = None) -> FeatureExtractor:
    """The extractor called ``name``: ``inception`` (:func:`inception_v3`, from ``inception_weights``),
    ``pca-digits`` (:func:`digits_pca_extractor`) or ``tiny`` (a :class:`TinyConvExtractor` with
    :data:`TINY_FEATURES` features and :data:`TINY_CLASSES` logits, seed 0: tests and smoke runs only),
    moved to ``device``."""
    check_extractor_name(name, inception_weights=inception_weights)
    if name == "inception":
        extractor = inception_v3(inception_weights)
    elif name == "pca-digits":
        extractor = digits_pca_extractor()
    else:
        extractor = TinyConvExtractor(num_features=TINY_FEATURES, num_classes=TINY_CLASSES)
    return extractor if device is None else extractor.to(device)
