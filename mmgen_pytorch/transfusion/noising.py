"""From a packed batch to the objective's inputs: one time and one noise draw per noised modality.

Reading order: :class:`NoisedGroup` (the typed record the model's backbone, heads and losses read)
-> :func:`noise_groups` -> the checks of user-given ``times`` / ``noise`` -> times from a user function
(``num_modalities_to_times_fn``), the groups a little later on their paths (velocity consistency) and
the per-sample times returned by ``forward(return_times=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._utils import check, check_has_data, check_value_range, describe
from ..objectives.base import ContinuousObjective
from .packing import LatentRun, PackedBatch

TimesInput = Union[Sequence[Sequence[float]], Tensor, None]
NoiseInput = Optional[Sequence[Sequence[Tensor]]]
TimesFn = Callable[[Tensor], Tensor]  # modalities per sample Long[b] -> their times Float[b, m]


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
                 times: TimesInput = None, noise: NoiseInput = None,
                 time_scale: float = 1.0) -> Tuple[List[NoisedGroup], Tensor]:
    """Draw (or take) a time and a noise tensor for every noised modality instance and noise its tokens.

    Returns the groups and the per-token times ``[b, n]`` of the packed grid (clean time off latents).
    ``times`` / ``noise``: per sample, one entry per noised modality in order (see ``Transfusion.forward``).
    ``time_scale`` multiplies the noised instances' times (velocity consistency keeps them below 1).
    """
    device = packed.token_ids.device
    instance_times, instance_noise = _instance_draws(packed, objective, dim_latents, times, noise, device)
    if time_scale != 1.0:
        trained = torch.tensor([inst.noised for inst in packed.instances], dtype=torch.bool, device=device)
        instance_times = torch.where(trained, instance_times * time_scale, instance_times)
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
    return groups, grid_times(packed, groups, objective)


def grid_times(packed: PackedBatch, groups: Sequence[NoisedGroup], objective: ContinuousObjective) -> Tensor:
    """Every token's time ``[b, n]``: its group's time on latent tokens, the clean time elsewhere."""
    token_times = torch.full(packed.shape, objective.clean_time, device=packed.token_ids.device)
    for group in groups:
        token_times.view(-1)[group.flat_index] = group.times
    return token_times


def _instance_draws(packed: PackedBatch, objective: ContinuousObjective, dim_latents: Sequence[int],
                    times: TimesInput, noise: NoiseInput, device) -> Tuple[Tensor, List[Optional[Tensor]]]:
    """Time and noise of every instance: clean ones get the objective's clean time and no noise."""
    noised = sorted((i for i, inst in enumerate(packed.instances) if inst.noised),
                    key=lambda i: (packed.instances[i].row, packed.instances[i].ordinal))
    instance_times = torch.full((len(packed.instances),), objective.clean_time, device=device)
    instance_noise: List[Optional[Tensor]] = [None] * len(packed.instances)
    if isinstance(times, Tensor):  # transfusion-pytorch's padded Float[b, m]
        check_has_data("times", times)
        times = _unpad_times(packed, times)
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


def _unpad_times(packed: PackedBatch, times: Tensor) -> List[List[float]]:
    """Row ``r`` of a padded ``[b, m]`` tensor gives sample ``r``'s noised modalities their times in
    order; the entries past them are padding."""
    counts = noised_counts(packed)
    check(times.ndim == 2 and times.shape[0] == len(counts) and times.shape[1] >= max(counts, default=0),
          f"`times` as a tensor must be [batch={len(counts)}, >= {max(counts, default=0)}] (per sample, the "
          f"times of its noised modalities, then padding), got shape {tuple(times.shape)}")
    return [row[:count] for row, count in zip(times.tolist(), counts)]


# times from a user function, later times (velocity consistency), times per sample

def random_modality_length_to_time_fn(num_modalities: Tensor) -> Tensor:
    """``num_modalities_to_times_fn`` drawing every time uniformly: ``Long[b]`` -> ``Float[b, max]``."""
    check(isinstance(num_modalities, Tensor) and num_modalities.ndim == 1,
          f"`num_modalities` must be a 1-D tensor of modality counts per sample, got {describe(num_modalities)}")
    most = int(num_modalities.amax()) if num_modalities.numel() else 0
    return torch.rand((num_modalities.shape[0], most), device=num_modalities.device)


def noised_counts(packed: PackedBatch) -> List[int]:
    """How many noised modalities each sample of the batch holds."""
    counts = [0] * len(packed.lengths)
    for inst in packed.instances:
        counts[inst.row] += int(inst.noised)
    return counts


def times_from_fn(packed: PackedBatch, fn: TimesFn) -> Optional[Tensor]:
    """``fn``'s padded ``[b, >= max]`` times for the batch's noised modalities (None without any), its
    result checked (ValueError naming ``num_modalities_to_times_fn``) before anything runs on it."""
    name = "num_modalities_to_times_fn"
    check(callable(fn), f"`{name}` must be callable (Long[b] modality counts -> Float[b, m] times), got {describe(fn)}")
    counts = noised_counts(packed)
    if not any(counts):
        return None
    times = fn(torch.tensor(counts, device=packed.token_ids.device))
    most = max(counts)
    check(isinstance(times, Tensor) and times.is_floating_point() and times.ndim == 2
          and times.shape[0] == len(counts) and times.shape[1] >= most,
          f"`{name}` must return Float[batch={len(counts)}, >= {most}] (the most modalities in a sample), "
          f"got {describe(times)}")
    used = torch.cat([row[:count] for row, count in zip(times, counts)])
    check_value_range(name, used, 0.0, 1.0, expected="flow times in [0, 1] (0 is noise)")
    return times


def later_groups(groups: Sequence[NoisedGroup], objective: ContinuousObjective,
                 delta: float) -> List[NoisedGroup]:
    """The trained tokens of ``groups`` moved ``delta`` later in time along the same noise paths."""
    later = []
    for group in groups:
        times = torch.where(group.trained, group.times + delta, group.times)
        noised = torch.where(group.trained[:, None], objective.noised(group.clean, group.noise, times), group.noised)
        later.append(replace(group, times=times, noised=noised))
    return later


def per_sample_times(packed: PackedBatch, token_times: Tensor) -> Tensor:
    """The times of each sample's noised modalities in order, ``Float[b, max]`` padded with 0
    (transfusion-pytorch's ``times``), read off the per-token times."""
    counts = noised_counts(packed)
    times = torch.zeros(len(counts), max(counts, default=0), device=token_times.device)
    noised = sorted((inst for inst in packed.instances if inst.noised), key=lambda inst: (inst.row, inst.ordinal))
    column = [0] * len(counts)
    for inst in noised:
        times[inst.row, column[inst.row]] = token_times.view(-1)[inst.index[0]]
        column[inst.row] += 1
    return times
