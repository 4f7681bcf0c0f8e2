"""Progress bars tick once per sampling step: the modality a Transfusion / MonoFormer sampler generates
shows a bar over its denoising steps instead of the token bar jumping past it at the end."""

import pytest
import torch

from mmgen_pytorch import MonoFormer, Transfusion
from mmgen_pytorch.objectives import RectifiedFlow, flow, gaussian


class RecordingBar:
    """Stands in for tqdm: keeps every bar made and the value it showed after each change."""

    made = []

    def __init__(self, iterable=None, *, total=None, disable=False, **options):
        self.iterable, self.total, self.disable = iterable, len(iterable) if total is None else total, disable
        self.n, self.shown = 0, [0]
        RecordingBar.made.append(self)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, count=1):
        self.n += count
        self.shown.append(self.n)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def bars(monkeypatch):
    RecordingBar.made = []
    monkeypatch.setattr(flow, "tqdm", RecordingBar)
    monkeypatch.setattr(gaussian, "tqdm", RecordingBar)
    return RecordingBar.made


def ticks_one_step_at_a_time(bar, steps):
    return bar.total == steps and sorted(set(bar.shown)) == list(range(steps + 1)) and \
        all(0 <= b - a <= 1 for a, b in zip(bar.shown, bar.shown[1:]))


@pytest.mark.parametrize("method, evaluations_per_step", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_flow_bar_shows_the_step_being_integrated(bars, method, evaluations_per_step):
    seen = []
    RectifiedFlow(ode_method=method).integrate(lambda t, x: seen.append(bars[0].n) or -x, torch.zeros(2, 3), 5,
                                               progress=True)
    (bar,) = bars
    assert ticks_one_step_at_a_time(bar, 5) and bar.n == 5
    # every evaluation sees the step it belongs to (rk4 evaluates each step's end too: the next one)
    assert set(range(5)) <= set(seen) <= set(range(6)) and seen == sorted(seen)
    assert len(seen) == 5 * evaluations_per_step


def test_flow_without_progress_makes_no_bar(bars):
    RectifiedFlow().integrate(lambda t, x: -x, torch.zeros(2, 3), 4)
    assert bars == []


def test_transfusion_modality_bar_ticks_per_flow_step(bars):
    model = Transfusion(num_text_tokens=32, dim_latent=8, modality_default_shape=(2, 2),
                        transformer=dict(dim=32, depth=2, heads=2, dim_head=16, attn_backend="sdpa")).eval()
    model.generate_modality_only(2, modality_steps=6, progress=True)
    (bar,) = bars
    assert ticks_one_step_at_a_time(bar, 6)
    model.generate_modality_only(2, modality_steps=6, progress=False)
    assert len(bars) == 1


def test_monoformer_image_bar_ticks_per_diffusion_step(bars):
    model = MonoFormer(num_text_tokens=8, transformer=dict(dim=32, depth=2, heads=2, attn_backend="sdpa"),
                       latent_channels=4, latent_size=4, patch_size=2).eval()
    model.generate_images([torch.tensor([1, 2])], cfg_scale=2.0, steps=5, progress=True)
    (bar,) = bars
    assert ticks_one_step_at_a_time(bar, 5)
