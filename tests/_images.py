"""Small deterministic test images shared by the tokenizer tests."""

import torch


def smooth_images(n=2, size=8, seed=0):
    """``[n, 3, size, size]`` smooth sinusoidal images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    freq = 1 + 2 * torch.rand(n, 3, 1, 1, generator=g)
    return torch.sin(freq * xx + freq.flip(1) * yy)
