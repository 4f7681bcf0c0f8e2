"""The taming / LDM convolutional autoencoder layout (MAR's KL-16 and DnD's RQ-VAE) -> our encoder /
decoder (:mod:`mmgen_pytorch.tokenizers.blocks`, LlamaGen's key names: ``conv_blocks.{k}.res/attn/
downsample|upsample``, ``mid.{0,1,2}``, decoder levels lowest resolution first), LDM's attention
resolutions as our levels, and the architecture read off a state dict in our layout.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Tuple

from torch import Tensor

from .._utils import check
from ..files import StateDict
from .common import rename_keys

LDM_AUTOENCODER_RULES = {
    r"(encoder|decoder)\.mid\.block_1\.(.+)": r"\1.mid.0.\2",
    r"(encoder|decoder)\.mid\.attn_1\.(.+)": r"\1.mid.1.\2",
    r"(encoder|decoder)\.mid\.block_2\.(.+)": r"\1.mid.2.\2",
    r"encoder\.down\.(\d+)\.block\.(.+)": r"encoder.conv_blocks.\1.res.\2",
    r"encoder\.down\.(\d+)\.(attn|downsample)\.(.+)": r"encoder.conv_blocks.\1.\2.\3",
}
_LDM_UP = re.compile(r"decoder\.up\.(\d+)\.(block|attn|upsample)\.(.+)")


def ldm_autoencoder_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """LDM/taming ``encoder.*`` / ``decoder.*`` keys in our layout. LDM's ``decoder.up.{i}`` counts
    levels from full resolution; ours (``decoder.conv_blocks.{k}``) in processing order, so
    ``k = num_levels - 1 - i``. Other keys pass through unchanged."""
    renamed = rename_keys(state_dict, LDM_AUTOENCODER_RULES)
    up_levels = [int(m.group(1)) for m in map(_LDM_UP.fullmatch, renamed) if m]
    last = max(up_levels, default=0)

    def up(match: re.Match) -> str:
        part = "res" if match.group(2) == "block" else match.group(2)
        return f"decoder.conv_blocks.{last - int(match.group(1))}.{part}.{match.group(3)}"

    return {_LDM_UP.sub(up, key): value for key, value in renamed.items()}


def levels_at_resolutions(resolution: int, num_levels: int, attn_resolutions: Iterable[int]) -> Tuple[int, ...]:
    """LDM's rule: level ``i`` runs at ``resolution // 2**i`` and gets attention when that is listed."""
    wanted = set(attn_resolutions)
    return tuple(i for i in range(num_levels) if resolution // 2 ** i in wanted)


def _level_keys(state_dict: Mapping[str, Tensor], part: str) -> Dict[int, List[str]]:
    levels: Dict[int, List[str]] = {}
    for key in state_dict:
        match = re.match(rf"{part}\.conv_blocks\.(\d+)\.", key)
        if match:
            levels.setdefault(int(match.group(1)), []).append(key)
    return levels


def infer_conv_layout(state_dict: Mapping[str, Tensor]) -> Dict[str, object]:
    """Read ch, ch_mult, res blocks, attention levels and z widths off an encoder/decoder state dict
    in our layout (keys ``encoder.*`` and ``decoder.*``)."""
    enc, dec = _level_keys(state_dict, "encoder"), _level_keys(state_dict, "decoder")
    check(len(enc) > 0 and len(dec) > 0, "the state dict has no `encoder.conv_blocks.*` / `decoder.conv_blocks.*` keys")
    ch = state_dict["encoder.conv_in.weight"].shape[0]
    num_res = len({k.split(".")[4] for k in enc[0] if k.startswith("encoder.conv_blocks.0.res.")})
    enc_mult = [state_dict[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in sorted(enc)]
    dec_levels = len(dec)
    dec_mult = [state_dict[f"decoder.conv_blocks.{dec_levels - 1 - i}.res.0.conv1.weight"].shape[0] // ch
                for i in range(dec_levels)]
    has_attn = lambda keys: any(".attn." in k for k in keys)  # noqa: E731
    return dict(
        ch=ch, num_res_blocks=num_res, encoder_ch_mult=tuple(enc_mult), decoder_ch_mult=tuple(dec_mult),
        encoder_attn_levels=tuple(i for i in sorted(enc) if has_attn(enc[i])),
        decoder_attn_levels=tuple(sorted(dec_levels - 1 - k for k in dec if has_attn(dec[k]))),
        encoder_out_channels=state_dict["encoder.conv_out.weight"].shape[0],
        decoder_z_channels=state_dict["decoder.conv_in.weight"].shape[1],
        in_channels=state_dict["encoder.conv_in.weight"].shape[1],
        out_channels=state_dict["decoder.conv_out.weight"].shape[0],
    )
