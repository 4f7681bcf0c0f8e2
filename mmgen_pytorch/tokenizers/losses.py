"""The perceptual + adversarial training loss of the image tokenizers (VQGAN-style), as upstream trains them.

- :class:`LPIPS`: the VGG16 perceptual distance of Zhang et al. Its trunk takes torchvision's ``vgg16``
  ImageNet weights (parameter names ``features.{i}.weight``, loaded strictly, the classifier ignored) and
  its five 1x1 "linear" layers the ``lpips`` package's ``weights/v0.1/vgg.pth`` (``lin{k}.model.1.weight``).
  Inputs in [-1, 1] are shifted and scaled per channel, the relu1_2 .. relu5_3 features unit-normalised
  over channels, their squared differences weighted by the linear layers, averaged over space and summed.
- :class:`NLayerDiscriminator`: pix2pix's PatchGAN (4x4 convolutions, BatchNorm, LeakyReLU 0.2) with
  taming's initialisation, under taming's / LlamaGen's key names (``main.{i}.*``).
- :func:`discriminator_loss` / :func:`generator_loss`: hinge or non-saturating.
- :func:`adaptive_weight`: taming's balance of the GAN term, ``|grad rec| / (|grad gan| + 1e-4)`` at the
  decoder's last layer, clamped to [0, 1e4].
- :class:`TokenizerLoss`: reconstruction (L1 / L2) + perceptual + the tokenizer's own regulariser
  (VQ / RQ commitment, KL; :func:`regularization`) + the GAN term from ``disc_start`` on; and the
  discriminator's loss on real images and detached reconstructions.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, List, Literal, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from .._utils import check, check_finite_number, check_positive_int, describe
from ..files import CheckpointMismatchError, check_state_dict, read_tensor_file

PathLike = Union[str, Path]
GAN_LOSSES = ("hinge", "non-saturating")
RECONSTRUCTION_LOSSES = ("l1", "l2")
REDUCTIONS = ("mean", "sum")


# LPIPS

# torchvision's vgg16 `features` up to relu5_3: (index of the conv, in, out); ReLUs follow each conv and
# 2x2 max pools sit at 4, 9, 16, 23. LPIPS reads the ReLU outputs after indices 3, 8, 15, 22 and 29.
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
               (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512),
               (28, 512, 512))
VGG16_POOLS = (4, 9, 16, 23)
VGG16_TAPS = (3, 8, 15, 22, 29)
VGG16_CLASSIFIER_KEYS = {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# the lpips package's ScalingLayer: inputs in [-1, 1] -> (x - shift) / scale per RGB channel
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features[:30]`` (conv, ReLU and max-pool layers under the same indices),
    returning the five ReLU outputs LPIPS compares."""

    def __init__(self):
        super().__init__()
        layers: List[nn.Module] = [nn.ReLU() for _ in range(max(VGG16_TAPS) + 1)]
        for index, fan_in, fan_out in VGG16_CONVS:
            layers[index] = nn.Conv2d(fan_in, fan_out, 3, padding=1)
        for index in VGG16_POOLS:
            layers[index] = nn.MaxPool2d(2, 2)
        self.features = nn.Sequential(*layers)

    def forward(self, x: Float[Tensor, "b 3 h w"]) -> List[Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in VGG16_TAPS:
                taps.append(x)
        return taps


class LinearLayer(nn.Module):
    """The lpips package's ``NetLinLayer``: dropout (inactive: LPIPS runs in eval mode) then a 1x1 conv to
    one channel without bias, so its weight is ``model.1.weight``."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """The LPIPS (VGG16, v0.1) distance per image, ``[b]``, between images in [-1, 1]; a frozen metric:
    no trainable parameters and always in eval mode, while gradients flow to its inputs.

    Build it with :meth:`from_files` (the pretrained weights) or, for tests only, :meth:`random`.
    The state dict holds ``net.features.*`` (torchvision's names under ``net.``) and ``lin{k}.model.1.weight``;
    the scaling constants are fixed buffers outside it."""

    def __init__(self):
        super().__init__()
        self.net = VGG16Features()
        for k, channels in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{k}", LinearLayer(channels))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def random(cls) -> "LPIPS":
        """Untrained weights (PyTorch's default initialisation, linear weights made non-negative as the
        trained ones are): for tests and smoke runs, not a perceptual distance."""
        lpips = cls()
        with torch.no_grad():
            for k in range(len(LPIPS_CHANNELS)):
                weight = lpips.linear_layers()[k].weight
                weight.copy_(weight.abs())
        return lpips

    @classmethod
    def from_files(cls, vgg16: PathLike, lpips: PathLike) -> "LPIPS":
        """``vgg16``: torchvision's ImageNet ``vgg16`` state dict (``vgg16-397923af.pth``); ``lpips``: the
        lpips package's linear weights (``lpips/weights/v0.1/vgg.pth``). Both files are read with
        ``weights_only=True`` and checked strictly before anything is loaded."""
        model = cls()
        trunk, linear = read_vgg16_weights(vgg16, model.net), read_linear_weights(lpips, model)
        model.net.load_state_dict(trunk, strict=True)
        for k, layer in enumerate(model.linear_layers()):
            layer.weight.data.copy_(linear[f"lin{k}.model.1.weight"])
        return model

    def linear_layers(self) -> List[nn.Conv2d]:
        return [getattr(self, f"lin{k}").model[1] for k in range(len(LPIPS_CHANNELS))]

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # a fixed metric: its dropout stays off

    def forward(self, x: Float[Tensor, "b c h w"], y: Float[Tensor, "b c h w"]) -> Float[Tensor, "b"]:
        """The distance of each pair; greyscale batches (c = 1) are compared as RGB images of equal channels."""
        check(isinstance(x, Tensor) and isinstance(y, Tensor) and x.shape == y.shape and x.ndim == 4
              and x.shape[1] in (1, 3), f"LPIPS compares two [b, 3, h, w] (or greyscale [b, 1, h, w]) image batches "
                                        f"of one shape, got {describe(x)} and {describe(y)}")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        features = self.net(torch.cat([x, y]).sub(self.shift).div(self.scale))
        distance = x.new_zeros(x.shape[0])
        for layer, feature in zip(self.linear_layers(), features):
            a, b = unit_normalize(feature).chunk(2)
            distance = distance + layer((a - b).square()).mean(dim=(1, 2, 3))
        return distance


def unit_normalize(x: Tensor) -> Tensor:
    """Each position's feature vector divided by its L2 norm over channels (plus 1e-10, as lpips)."""
    return x / (x.square().sum(dim=1, keepdim=True).sqrt() + NORM_EPS)


def read_vgg16_weights(path: PathLike, trunk: VGG16Features) -> dict:
    """torchvision's ``vgg16`` state dict from ``path``: every ``features.*`` conv weight and bias up to
    relu5_3 with its shape; the ``classifier.*`` keys of the full model are allowed and dropped; any
    other key is refused by name."""
    state_dict = _read_state_dict(path, "torchvision's vgg16 ImageNet weights (vgg16-397923af.pth)")
    features = {key: value for key, value in state_dict.items() if key not in VGG16_CLASSIFIER_KEYS}
    check_state_dict(trunk.state_dict(), features, source=f"file {str(path)!r}",
                     target="the LPIPS VGG16 trunk (torchvision's vgg16 `features.{0..28}.weight/bias`, "
                            "optionally with its `classifier.{0,3,6}.*`)")
    return features


def read_linear_weights(path: PathLike, lpips: LPIPS) -> dict:
    """The lpips package's linear weights from ``path``: exactly ``lin0.model.1.weight`` ..
    ``lin4.model.1.weight``, ``[1, c, 1, 1]`` each."""
    state_dict = _read_state_dict(path, "the lpips package's VGG linear weights (lpips/weights/v0.1/vgg.pth)")
    expected = {f"lin{k}.model.1.weight": layer.weight for k, layer in enumerate(lpips.linear_layers())}
    check_state_dict(expected, state_dict, target="the LPIPS linear layers (the lpips package's "
                     "`lin0.model.1.weight` .. `lin4.model.1.weight`)", source=f"file {str(path)!r}")
    return dict(state_dict)


def _read_state_dict(path: PathLike, what: str) -> dict:
    path = Path(path)
    check(path.is_file(), f"LPIPS weights file {str(path)!r} does not exist; it should hold {what}",
          error=FileNotFoundError)
    state_dict = read_tensor_file(path)
    check(isinstance(state_dict, dict) and all(isinstance(v, Tensor) for v in state_dict.values()),
          f"{str(path)!r} holds {describe(state_dict)}, not a state dict of tensors; it should hold {what}",
          error=CheckpointMismatchError)
    return state_dict


# the PatchGAN discriminator


class NLayerDiscriminator(nn.Module):
    """pix2pix's PatchGAN as taming / LlamaGen / RQ-VAE build it: a 4x4 stride-2 conv + LeakyReLU(0.2), then
    ``layers - 1`` stride-2 and one stride-1 conv (no bias) + BatchNorm + LeakyReLU with widths
    ``channels * min(2**n, 8)``, and a 4x4 conv to one logit per patch. Conv weights ~ N(0, 0.02), BatchNorm
    weights ~ N(1, 0.02) with zero bias (taming's ``weights_init``)."""

    def __init__(self, *, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("channels", channels), ("layers", layers)):
            check_positive_int(name, value)
        self.layers = layers
        widths = [channels * min(2 ** n, 8) for n in range(layers + 1)]
        modules: List[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1
            modules += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=False),
                        nn.BatchNorm2d(widths[n]), nn.LeakyReLU(0.2)]
        modules.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*modules)
        self.apply(_taming_init)

    @property
    def min_size(self) -> int:
        """The smallest image side that leaves at least one logit (each 4x4 stride-1 conv takes one)."""
        return 3 * 2 ** self.layers

    def forward(self, images: Float[Tensor, "b c h w"]) -> Float[Tensor, "b 1 h2 w2"]:
        check(images.ndim == 4 and min(images.shape[-2:]) >= self.min_size,
              f"the discriminator ({self.layers} layers) needs [b, c, h, w] images of side >= {self.min_size}, "
              f"got {describe(images)}")
        return self.main(images)


def _taming_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# GAN losses


def discriminator_loss(kind: str, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``hinge``: ``(mean relu(1 - real) + mean relu(1 + fake)) / 2``; ``non-saturating`` (taming's
    "vanilla"): ``(mean softplus(-real) + mean softplus(fake)) / 2``, the binary cross-entropy of real
    -> 1 and fake -> 0."""
    if kind == "hinge":
        return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
    check(kind == "non-saturating", f"`disc_loss` must be one of {list(GAN_LOSSES)}, got {kind!r}")
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(kind: str, logits_fake: Tensor) -> Tensor:
    """``hinge``: ``-mean(fake)`` (taming's and RQ-VAE's generator loss); ``non-saturating``:
    ``mean softplus(-fake)`` = ``-mean log sigmoid(fake)``."""
    if kind == "hinge":
        return -logits_fake.mean()
    check(kind == "non-saturating", f"`gen_loss` must be one of {list(GAN_LOSSES)}, got {kind!r}")
    return F.softplus(-logits_fake).mean()


ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4


def adaptive_weight(reconstruction: Tensor, gan: Tensor, last_layer: Tensor) -> Tensor:
    """taming's balance: ``|d rec / d W| / (|d gan / d W| + 1e-4)`` at the decoder's last weight ``W``,
    clamped to [0, 1e4] and detached (the graph is kept for the backward pass)."""
    rec_grad, = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan, last_layer, retain_graph=True)
    return (rec_grad.norm() / (gan_grad.norm() + ADAPTIVE_EPS)).clamp(0.0, ADAPTIVE_MAX).detach()


# the tokenizers' own terms


def regularization(tokenizer: nn.Module, output: NamedTuple) -> Tensor:
    """The tokenizer's own regulariser in its forward ``output``: VQ ``vq + commit + entropy``, KL
    ``kl_weight * KL`` and RQ ``latent_loss_weight * commitment`` (its training loss without the
    reconstruction term)."""
    from .kl import KLOutput
    from .rq import RQOutput
    from .vq import VQOutput

    if isinstance(output, VQOutput):
        return output.quantizer.vq + output.quantizer.commit + output.quantizer.entropy
    if isinstance(output, KLOutput):
        return tokenizer.config.kl_weight * output.kl
    if isinstance(output, RQOutput):
        return tokenizer.config.latent_loss_weight * output.commitment_loss
    raise TypeError(f"`output` must be a VQVAE, AutoencoderKL or RQVAE forward output, got {describe(output)}")


def last_decoder_layer(tokenizer: nn.Module) -> Tensor:
    """The weight the adaptive GAN weight is measured at: the decoder's ``conv_out`` (all three upstreams)."""
    return tokenizer.decoder.conv_out.weight


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with ``requires_grad`` off inside (gradients still flow through it to its input)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for parameter, flag in zip(module.parameters(), flags):
            parameter.requires_grad_(flag)


class GeneratorLosses(NamedTuple):
    total: Tensor            # what the tokenizer's optimizer minimises
    reconstruction: Tensor   # weighted, as in the total
    perceptual: Tensor       # weighted
    regularization: Tensor   # the tokenizer's own (commitment / KL)
    gan: Tensor              # gan_weight * generator loss (0 before disc_start)
    gan_weight: Tensor       # adaptive weight * disc_weight (disc_weight without adaptive weighting)


class TokenizerLoss(nn.Module):
    """Reconstruction + perceptual + regulariser + PatchGAN, for :class:`VQVAE`, :class:`AutoencoderKL` and
    :class:`RQVAE` alike (their regularisers come from their own forward, :func:`regularization`).

    - ``reconstruction``: ``"l2"`` (LlamaGen, RQ-VAE) or ``"l1"`` (LDM), times ``reconstruction_weight``;
      ``reduction="mean"`` averages over every pixel, ``"sum"`` sums over each image's pixels and averages
      over the batch, with the per-image LPIPS counted once per pixel (LDM's ``nll_loss``: this is the
      scale its ``kl_weight`` is set for).
    - ``perceptual``: an :class:`LPIPS` (or None with ``perceptual_weight=0``).
    - The GAN terms are on from the step numbered ``disc_start`` (steps counted from 0) and zero before:
      the generator's ``gan_weight * generator_loss(D(recon))`` with ``gan_weight = disc_weight``, times
      :func:`adaptive_weight` of (reconstruction + perceptual) with ``adaptive_weight=True``; the
      discriminator's ``disc_loss_weight * discriminator_loss(D(x), D(recon.detach()))``.
    """

    def __init__(self, *, discriminator: Optional[NLayerDiscriminator] = None, perceptual: Optional[LPIPS] = None,
                 perceptual_weight: float = 1.0, reconstruction: Literal["l1", "l2"] = "l2",
                 reduction: Literal["mean", "sum"] = "mean", reconstruction_weight: float = 1.0,
                 disc_start: int = 0, disc_weight: float = 0.5, disc_loss_weight: float = 1.0,
                 disc_loss: Literal["hinge", "non-saturating"] = "hinge",
                 gen_loss: Literal["hinge", "non-saturating"] = "hinge", adaptive_weight: bool = False):
        super().__init__()
        _check_choice("reconstruction", reconstruction, RECONSTRUCTION_LOSSES)
        _check_choice("reduction", reduction, REDUCTIONS)
        _check_choice("disc_loss", disc_loss, GAN_LOSSES)
        _check_choice("gen_loss", gen_loss, GAN_LOSSES)
        for name, value in (("perceptual_weight", perceptual_weight), ("reconstruction_weight", reconstruction_weight),
                            ("disc_weight", disc_weight), ("disc_loss_weight", disc_loss_weight)):
            check_finite_number(name, value, minimum=0.0)
        check_positive_int("disc_start", disc_start, minimum=0)
        check(perceptual is None or isinstance(perceptual, LPIPS),
              f"`perceptual` must be an LPIPS or None, got {describe(perceptual)}", error=TypeError)
        check(perceptual is not None or perceptual_weight == 0,
              f"`perceptual_weight` is {perceptual_weight} but no `perceptual` LPIPS was given: build one with "
              f"LPIPS.from_files(vgg16=..., lpips=...) (or set perceptual_weight=0)")
        self.discriminator = discriminator if discriminator is not None else NLayerDiscriminator()
        self.perceptual = perceptual
        self.perceptual_weight, self.reconstruction_weight = perceptual_weight, reconstruction_weight
        self.reconstruction, self.reduction = reconstruction, reduction
        self.disc_start, self.disc_weight, self.disc_loss_weight = disc_start, disc_weight, disc_loss_weight
        self.disc_loss, self.gen_loss, self.adaptive_weight = disc_loss, gen_loss, adaptive_weight

    def gan_active(self, step: int) -> bool:
        return step >= self.disc_start

    def reconstruction_terms(self, images: Tensor, recon: Tensor) -> tuple:
        """(weighted reconstruction, weighted perceptual) in the configured reduction."""
        distance = (recon - images).abs() if self.reconstruction == "l1" else (recon - images).square()
        per_image = recon[0].numel()
        if self.perceptual is not None and self.perceptual_weight > 0:
            perceptual = self.perceptual(images, recon).mean()
        else:
            perceptual = recon.new_zeros(())
        if self.reduction == "sum":
            pixels, perceptual = distance.sum() / distance.shape[0], perceptual * per_image
        else:
            pixels = distance.mean()
        return self.reconstruction_weight * pixels, self.perceptual_weight * perceptual

    def generator_losses(self, images: Tensor, recon: Tensor, regularizer: Tensor, *, step: int,
                         last_layer: Optional[Tensor] = None,
                         discriminator: Optional[nn.Module] = None) -> GeneratorLosses:
        """The tokenizer's loss at ``step``; the discriminator (``discriminator`` or this loss's own) is
        frozen in it. ``last_layer`` (see :func:`last_decoder_layer`) is needed with ``adaptive_weight``."""
        pixels, perceptual = self.reconstruction_terms(images, recon)
        zero = recon.new_zeros(())
        gan, weight = zero, zero
        if self.gan_active(step):
            with frozen(discriminator if discriminator is not None else self.discriminator) as critic:
                raw = generator_loss(self.gen_loss, critic(recon))
            weight = torch.as_tensor(self.disc_weight, dtype=raw.dtype, device=raw.device)
            if self.adaptive_weight:
                check(last_layer is not None, "`last_layer` (the decoder's last weight) is needed with "
                                              "adaptive_weight=True")
                weight = weight * adaptive_weight(pixels + perceptual, raw, last_layer)
            gan = weight * raw
        total = pixels + perceptual + regularizer + gan
        return GeneratorLosses(total, pixels, perceptual, regularizer, gan, weight)

    def discriminator_losses(self, images: Tensor, recon: Tensor, *, step: int,
                             discriminator: Optional[nn.Module] = None) -> Optional[Tensor]:
        """The discriminator's weighted loss on real ``images`` and detached ``recon`` (two forward passes,
        as upstream: BatchNorm statistics per batch), or None before ``disc_start``."""
        if not self.gan_active(step):
            return None
        critic = discriminator if discriminator is not None else self.discriminator
        real, fake = critic(images.detach()), critic(recon.detach())
        return self.disc_loss_weight * discriminator_loss(self.disc_loss, real, fake)


def _check_choice(name: str, value, choices) -> None:
    check(value in choices, f"`{name}` must be one of {list(choices)}, got {value!r}")
