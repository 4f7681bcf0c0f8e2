"""Image tokenizers: LlamaGen's VQ (VQ-16/VQ-8), MAR's KL-16 autoencoder and DnD's RQ-VAE, built
on one shared convolutional encoder/decoder (:mod:`.blocks`), and their LPIPS + PatchGAN training loss
(:mod:`.losses`)."""

from .kl import KL16_LATENT_SCALE, AutoencoderKL, DiagonalGaussian, KLConfig
from .losses import LPIPS, NLayerDiscriminator, TokenizerLoss
from .rq import RQConfig, RQVAE
from .vq import VQ_PRESETS, VQConfig, VQVAE

__all__ = ["AutoencoderKL", "DiagonalGaussian", "KL16_LATENT_SCALE", "KLConfig", "LPIPS", "NLayerDiscriminator",
           "RQConfig", "RQVAE", "TokenizerLoss", "VQConfig", "VQVAE", "VQ_PRESETS"]
