"""A training run's folder (``python -m mmgen_pytorch.train``'s ``train.output_dir``): its checkpoints, one
folder per saved step under ``checkpoints/``, and the model folder a run or a saved model loads from."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from ..checkpoint import TRAINING_STATE_FILE

CHECKPOINTS = "checkpoints"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"step-{step:07d}"


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint folder (``checkpoints/step-XXXXXXX``) was saved at."""
    return int(folder.name.split("-")[1])


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    found = sorted(path for path in (output_dir / CHECKPOINTS).glob("step-*") if (path / TRAINING_STATE_FILE).is_file())
    return found[-1] if found else None


def saved_model_folder(path, *, name: str) -> Tuple[Path, bool]:
    """``(folder, is_run)``: the folder a model loads from, given a training output folder (``config.yaml``:
    its latest complete checkpoint, ``is_run`` True) or a folder saved with ``save`` / ``save_pretrained``
    (``config.json``: itself). A FileNotFoundError naming ``name`` (the argument) otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        missing = "it does not exist" if not folder.exists() else "it is a file"
        raise FileNotFoundError(f"{name} {str(path)!r} is not a folder: {missing} (give a training output folder "
                                f"or a saved model folder)")
    if (folder / "config.yaml").is_file():
        checkpoint = latest_checkpoint(folder)
        if checkpoint is None:
            raise FileNotFoundError(f"{name} {str(path)!r}: a training output folder without a complete checkpoint "
                                    f"under {str(folder / CHECKPOINTS)!r}")
        return checkpoint, True
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{name} {str(path)!r} holds neither config.yaml (a training output folder) nor "
                                f"config.json (a model saved with save / save_pretrained)")
    return folder, False
