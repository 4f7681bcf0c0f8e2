"""Official checkpoints -> our models: one module per upstream, plus what they share.

Each module only renames keys (and, where layouts differ, concatenates or permutes tensors) and
translates the upstream's config into our constructor arguments; loading never needs the upstream
code, reads files with ``weights_only=True`` (:mod:`mmgen_pytorch.files`) and is strict, naming every
missing and unexpected key. The models keep their public entry points (``from_official``,
``load_official_state_dict``, ``official_state_dict``, ``from_llama``) as thin calls into these modules.

- :mod:`.common`: reading and unwrapping a checkpoint, naming a checkpoint of the wrong kind, key renaming.
- :mod:`.llamagen`: LlamaGen's GPT (and DnD's, which shares its format): keys, ``ModelArgs``, presets.
- :mod:`.dnd`: DnD's ``ModelArgs`` (head fields) and its RQ-VAE keys.
- :mod:`.mar`: MAR's keys, training ``args`` and presets, and its KL-16 VAE keys.
- :mod:`.ldm`: the taming / LDM autoencoder layout shared by the KL and RQ tokenizers.
- :mod:`.vq`: LlamaGen's VQ tokenizer.
- :mod:`.llama_hf`: Hugging Face LLaMA -> MonoFormer.
"""

from ..files import (CheckpointFileError, CheckpointMismatchError, check_state_dict, checkpoint_format, load_strict,
                     read_json_file, read_tensor_file)
from .common import (CHECKPOINT_KINDS, check_checkpoint_kind, checkpoint_kind, load_checkpoint, read_checkpoint,
                     unwrap_checkpoint)
from .dnd import dnd_rqvae_state_dict
from .ldm import ldm_autoencoder_state_dict
from .llama_hf import hf_llama_backbone_state_dict
from .llamagen import llamagen_backbone_state_dict, llamagen_backbone_to_official
from .mar import mar_state_dict, mar_vae_state_dict
from .vq import llamagen_vq_state_dict

__all__ = [
    "CHECKPOINT_KINDS", "CheckpointFileError", "CheckpointMismatchError", "check_checkpoint_kind", "check_state_dict",
    "checkpoint_format", "checkpoint_kind", "dnd_rqvae_state_dict", "hf_llama_backbone_state_dict",
    "ldm_autoencoder_state_dict", "llamagen_backbone_state_dict", "llamagen_backbone_to_official",
    "llamagen_vq_state_dict", "load_checkpoint", "load_strict", "mar_state_dict", "mar_vae_state_dict",
    "read_checkpoint", "read_json_file", "read_tensor_file", "unwrap_checkpoint",
]
