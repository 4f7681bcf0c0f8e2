"""From a packed batch to the objective's inputs: one time and one noise draw per noised modality.

Reading order: :class:`NoisedGroup` (the typed record the model's backbone, heads and losses read)
-> :func:`noise_groups` -> the checks of user-given ``times`` / ``noise``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._utils import check, check_has_data
from ..objectives.base import ContinuousObjective
from .packing import LatentRun, PackedBatch

TimesInput = Union[Sequence[Sequence[float]], Tensor, None]
NoiseInput = Optional[Sequence[Sequence[Tensor]]]


@dataclass
class NoisedGroup:
    """All latent tokens of one modality type in a packed batch, with what the objective needs."""

    modality: int
    flat_index: Tensor   # [k] index into the flattened [b * n] grid
    clean: Tensor        # [k, dim_latent] the latents
    noised: Tensor       # [k, dim_latent] the backbone's input (clean where not trained)
    noise: Tensor        # [k, dim_latent] (zeros where not trained)
    times: Tensor        # [k] each token's time (the objective's clean time where not trained)
    coords: Tensor       # [k, axes] each token's position inside its modality
    rows: Tensor         # [k] batch row
    trained: Tensor      # [k] bool: the token belongs to a noised modality (it carries a loss)

    def backbone_input(self) -> LatentRun:
        return LatentRun(self.modality, self.flat_index, self.noised, self.coords)


def noise_groups(packed: PackedBatch, objective: ContinuousObjective, dim_latents: Sequence[int], *,
                 times: TimesInput = None, noise: NoiseInput = None) -> Tuple[List[NoisedGroup], Tensor]:
    """Draw (or take) a time and a noise tensor for every noised modality instance and noise its tokens.

    Returns the groups and the per-token times ``[b, n]`` of the packed grid (clean time off latents).
    ``times`` / ``noise``: per sample, one entry per noised modality in order (see ``Transfusion.forward``).
    """
    device = packed.token_ids.device
    instance_times, instance_noise = _instance_draws(packed, objective, dim_latents, times, noise, device)
    trained_instance = torch.tensor([inst.noised for inst in packed.instances], device=device)
    instance_rows = torch.tensor([inst.row for inst in packed.instances], device=device)
    groups = []
    for group in packed.groups:
        noise_of_group = torch.cat([instance_noise[i] if instance_noise[i] is not None else
                                    torch.zeros_like(group.tokens[:packed.instances[i].index.numel()])
                                    for i in group.instance.unique_consecutive().tolist()])
        t = instance_times[group.instance]
        groups.append(NoisedGroup(group.modality, group.flat_index, group.tokens,
                                  objective.noised(group.tokens, noise_of_group, t), noise_of_group, t, group.coords,
                                  instance_rows[group.instance], trained_instance[group.instance]))
    token_times = torch.full(packed.shape, objective.clean_time, device=device)
    for group in groups:
        token_times.view(-1)[group.flat_index] = group.times
    return groups, token_times


def _instance_draws(packed: PackedBatch, objective: ContinuousObjective, dim_latents: Sequence[int],
                    times: TimesInput, noise: NoiseInput, device) -> Tuple[Tensor, List[Optional[Tensor]]]:
    """Time and noise of every instance: clean ones get the objective's clean time and no noise."""
    noised = sorted((i for i, inst in enumerate(packed.instances) if inst.noised),
                    key=lambda i: (packed.instances[i].row, packed.instances[i].ordinal))
    instance_times = torch.full((len(packed.instances),), objective.clean_time, device=device)
    instance_noise: List[Optional[Tensor]] = [None] * len(packed.instances)
    if isinstance(times, Tensor):  # transfusion-pytorch's padded Float[b, m]
        check_has_data("times", times)
        times = _unpad_times(packed, noised, times)
    given_times = _per_noised_instance(packed, noised, times, "times")
    given_noise = _per_noised_instance(packed, noised, noise, "noise")
    drawn = objective.sample_times(len(noised), device=device)
    for k, i in enumerate(noised):
        instance = packed.instances[i]
        where = f"modality {instance.ordinal} of sample {instance.row}"
        if given_times is not None:
            objective.check_time(given_times[k], name=f"`times` for {where}")
        instance_times[i] = float(given_times[k]) if given_times is not None else drawn[k]
        size = (instance.index.numel(), dim_latents[instance.modality])
        if given_noise is None:
            instance_noise[i] = torch.randn(size, device=device)
            continue
        check(given_noise[k].numel() == size[0] * size[1],
              f"`noise` for {where} must have {size[0]} x {size[1]} values, got shape {tuple(given_noise[k].shape)}")
        check(torch.compiler.is_compiling() or bool(torch.isfinite(given_noise[k]).all()),
              f"`noise` for {where} contains NaN or inf values")
        instance_noise[i] = given_noise[k].reshape(size).to(device)
    return instance_times, instance_noise


def _per_noised_instance(packed: PackedBatch, noised: List[int], values, name: str):
    if values is None:
        return None
    check(len(values) == len(packed.lengths), f"`{name}` needs one list per sample ({len(packed.lengths)}), got {len(values)}")
    flat = [v for per_sample in values for v in per_sample]
    check(len(flat) == len(noised), f"`{name}` needs one entry per modality ({len(noised)} in this batch), got {len(flat)}")
    return flat


def _unpad_times(packed: PackedBatch, noised: List[int], times: Tensor) -> List[List[float]]:
    """Row ``r`` of a padded ``[b, m]`` tensor gives sample ``r``'s noised modalities their times in
    order; the entries past them are padding."""
    counts = [0] * len(packed.lengths)
    for i in noised:
        counts[packed.instances[i].row] += 1
    check(times.ndim == 2 and times.shape[0] == len(counts) and times.shape[1] >= max(counts, default=0),
          f"`times` as a tensor must be [batch={len(counts)}, >= {max(counts, default=0)}] (per sample, the "
          f"times of its noised modalities, then padding), got shape {tuple(times.shape)}")
    return [row[:count] for row, count in zip(times.tolist(), counts)]
