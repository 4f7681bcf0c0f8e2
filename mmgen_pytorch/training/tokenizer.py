"""Training a tokenizer (VQVAE, AutoencoderKL, RQVAE) as upstream does: every step updates the tokenizer on
reconstruction + perceptual + its regulariser + the GAN term, then the PatchGAN discriminator on real
images and the detached reconstructions, each with its own optimizer (``optim``'s settings, as upstream).
Before ``tokenizer_loss.disc_start`` the GAN terms are off and the discriminator is neither run nor stepped
(upstream runs it with a zero weight: its Adam state stays zero, so only Adam's bias-correction step count
differs); its learning-rate schedule starts at ``disc_start`` (RQ-VAE's; LlamaGen's and LDM's are constant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from torch import Tensor, nn

from ..tokenizers.losses import LPIPS, NLayerDiscriminator, TokenizerLoss, last_decoder_layer, regularization
from .config import Config

DISCRIMINATOR = "discriminator"  # the part's name in checkpoints: discriminator.safetensors


def build_tokenizer_loss(config: Config) -> TokenizerLoss:
    """The LPIPS (pretrained files, or random when asked) and a fresh discriminator, from ``tokenizer_loss``."""
    spec = config.tokenizer_loss
    perceptual = None
    if spec.perceptual_weight > 0:
        perceptual = LPIPS.random() if spec.random_lpips else LPIPS.from_files(spec.vgg16_path, spec.lpips_path)
    discriminator = NLayerDiscriminator(in_channels=config.data.channels, channels=spec.disc_channels,
                                        layers=spec.disc_layers)
    return TokenizerLoss(discriminator=discriminator, perceptual=perceptual, perceptual_weight=spec.perceptual_weight,
                         reconstruction=spec.reconstruction, reduction=spec.reduction,
                         reconstruction_weight=spec.reconstruction_weight, disc_start=spec.disc_start,
                         disc_weight=spec.disc_weight, disc_loss_weight=spec.disc_loss_weight,
                         disc_loss=spec.disc_loss, gen_loss=spec.gen_loss, adaptive_weight=spec.adaptive_weight)


@dataclass
class Adversary:
    """The discriminator side of a tokenizer run."""
    loss: TokenizerLoss         # holds the LPIPS and the (unwrapped) discriminator
    model: nn.Module            # the discriminator, prepared (DDP-wrapped)
    optimizer: Any              # prepared
    scheduler: Any

    @property
    def inner(self) -> nn.Module:
        return self.loss.discriminator


def tokenizer_step(config: Config, state, batch: Dict[str, Tensor], step: int) -> Dict[str, Tensor]:
    """One micro-step of tokenizer training at optimizer step ``step``: the tokenizer's loss backward and
    step, then (from ``disc_start`` on) the discriminator's. Returns the detached terms for the log."""
    accelerator, adversary, clip = state.accelerator, state.adversary, config.optim.grad_clip
    images = batch["image"]
    with accelerator.autocast():
        output = state.model(images)
        losses = adversary.loss.generator_losses(
            images, output.recon, regularization(state.inner, output), step=step,
            last_layer=last_decoder_layer(state.inner), discriminator=adversary.inner)
    _update(accelerator, state.model, state.optimizer, losses.total, clip)
    metrics = dict(loss=losses.total, reconstruction=losses.reconstruction, perceptual=losses.perceptual,
                   regularization=losses.regularization, gan=losses.gan, gan_weight=losses.gan_weight)
    if adversary.loss.gan_active(step):
        with accelerator.autocast():
            disc_loss = adversary.loss.discriminator_losses(images, output.recon, step=step,
                                                            discriminator=adversary.model)
        _update(accelerator, adversary.model, adversary.optimizer, disc_loss, clip)
        metrics["disc_loss"] = disc_loss
    return {key: value.detach().float() for key, value in metrics.items()}


def _update(accelerator, model: nn.Module, optimizer, loss: Tensor, clip) -> None:
    accelerator.backward(loss)
    if accelerator.sync_gradients and clip is not None:
        accelerator.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

