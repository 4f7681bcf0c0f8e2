"""A modality's rank is fixed only by ``modality_num_dim`` (or ``add_pos_emb``, as in transfusion-pytorch);
a default shape alone leaves it free. A grid with more dimensions than the rotary axes is placed with its
leading dimensions merged row-major into the first axis."""

import pytest
import torch
from torch import randint, randn

from mmgen_pytorch import Transfusion
from mmgen_pytorch.transfusion.packing import Vocabulary, modality_positions, placed_shape

from _helpers import perturbed, reinitialised


def model_with(**overrides):
    torch.manual_seed(0)
    config = dict(num_text_tokens=32, dim_latent=8, modality_default_shape=(8,),
                  transformer=dict(dim=32, depth=1, heads=2, dim_head=16, attn_backend="sdpa"))
    return Transfusion(**{**config, **overrides})


def test_a_rank_free_modality_takes_grids_of_any_rank_in_one_batch():
    model = model_with()
    assert model.modalities[0].rank is None and model.rotary_axes == 1
    loss = model([[randint(0, 32, (3,)), randn(4, 4, 8)], [randn(8, 8), randint(0, 32, (2,)), randn(2, 3, 2, 8)]])
    loss.backward()
    assert torch.isfinite(loss)


def test_placed_shape_merges_leading_dimensions_row_major():
    assert placed_shape((4, 4), 1) == (16,) and placed_shape((2, 3, 4), 2) == (6, 4)
    assert placed_shape((3,), 2) == (3,) and placed_shape((), 1) == ()
    torch.testing.assert_close(modality_positions(5, (4, 4), 1), modality_positions(5, (16,), 1), rtol=0, atol=0)
    # token (a, b, c) of a (2, 3, 4) grid on two axes sits at (3a + b, c)
    expected = torch.tensor([[3 * a + b, c] for a in range(2) for b in range(3) for c in range(4)])
    torch.testing.assert_close(modality_positions(0, (2, 3, 4), 2), expected, rtol=0, atol=0)


@pytest.mark.parametrize("default_shape, grid, run", [((8,), (4, 4), (16,)), ((2, 2), (2, 3, 4), (6, 4))])
def test_a_merged_grid_trains_exactly_like_the_explicit_run(monkeypatch, default_shape, grid, run):
    # the same [meta] header for both, so the two sequences differ only in the grid's shape
    monkeypatch.setattr(Vocabulary, "shape_ids", lambda self, shape: self.char_ids("9"))
    model = perturbed(model_with(modality_default_shape=default_shape, prob_uncond=0.0))
    tokens, noise, text = randn(*run, 8), randn(torch.Size(run).numel(), 8), randint(0, 32, (4,))
    losses = [model([[text, tokens.reshape(*shape, 8)]], times=[[0.4]], noise=[[noise]], return_breakdown=True)[1]
              for shape in (grid, run)]
    merged, explicit = (torch.stack([b.total, b.text, *b.flow]).detach() for b in losses)
    torch.testing.assert_close(merged, explicit, rtol=1e-5, atol=1e-6 * float(explicit.abs().max()))


def test_a_fixed_rank_still_rejects_other_grids():
    for overrides, bad, rank in ((dict(modality_num_dim=1), randn(4, 4, 8), 1),
                                 (dict(modality_default_shape=(2, 2), modality_num_dim=2), randn(2, 8), 2),
                                 (dict(add_pos_emb=True), randn(4, 4, 8), 1)):  # a position MLP fixes it too
        model = model_with(**overrides)
        with pytest.raises(ValueError, match=rf"`x\[0\]\[1\]`: the modality has rank {rank}, got a latent grid"):
            model([[randint(0, 32, (3,)), bad]])
        with pytest.raises(ValueError, match=f"`fixed_modality_shape` must be a tuple of {rank} positive ints"):
            model.generate_modality_only(fixed_modality_shape=(2,) * (rank + 1), progress=False)


def test_sampling_a_grid_of_another_rank_cached_equals_uncached():
    model = reinitialised(model_with())
    prompts = [[randint(0, 32, (3,))], [randint(0, 32, (5,))]]
    outputs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(5)
        outputs.append(model.sample(prompts, max_length=40, cfg_scale=2.0, modality_steps=3, text_min_p=0.0,
                                    fixed_modality_shape=(4, 4), force_modality_at_start=0, max_modalities=1,
                                    use_cache=use_cache, generator=generator, progress=False))
    for cached, uncached in zip(*outputs):
        latents = [(a[1], b[1]) for a, b in zip(cached, uncached) if isinstance(a, tuple)]
        assert len(cached) == len(uncached) and len(latents) == 1
        for a, b in latents:
            assert a.shape == (4, 4, 8)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        texts = [(a, b) for a, b in zip(cached, uncached) if not isinstance(a, tuple)]
        assert all(torch.equal(a, b) for a, b in texts)
    only = model.generate_modality_only(2, fixed_modality_shape=(4, 4), modality_steps=2, progress=False)
    assert only.shape == (2, 4, 4, 8)
