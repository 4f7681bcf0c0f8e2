"""Metrics during training (the config's ``eval`` section): every ``eval.every`` steps the main process
scores the EMA model. A generator draws ``eval.num_samples`` class-balanced images exactly as sampling at
scale does (:func:`~mmgen_pytorch.evaluation.sampling.draw_batches`: batch seeds from ``eval.seed``), scored
by :func:`~mmgen_pytorch.evaluation.metrics.evaluate` against the reference statistics (computed once, when
the run starts); a tokenizer reconstructs the first ``eval.num_samples`` images of the reference (a fixed
held-out subset), scored by :func:`~mmgen_pytorch.evaluation.metrics.reconstruction_fid`.

Scoring runs inside ``torch.random.fork_rng``: whatever a sampler draws, the training RNG streams are left
as they were, so a run with metrics has the losses of a run without them and resumes bit-identically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .config import TOKENIZERS, Config, ConfigError

PREFIX = "eval/"


def check_eval(config: Config):
    """The ``eval`` section's files and packages, checked on every process before anything is built (so under
    DDP every process raises the same error): the reference (and, for a tokenizer, that it holds images to
    reconstruct), the Inception weights and the extractor's package. Returns the reference
    (:class:`~mmgen_pytorch.evaluation.sources.Reference`), or None when ``eval.every`` is 0."""
    from ..evaluation.features import EXTRACTOR_FEATURES, check_extractor_name
    from ..evaluation.sources import open_reference

    spec, resolution = config.eval, config.data.resolution
    if not spec.every:
        return None
    if spec.inception_weights is not None and not Path(spec.inception_weights).is_file():
        raise ConfigError(f"`eval.inception_weights` {spec.inception_weights!r} does not exist")
    try:
        check_extractor_name(spec.extractor, option="eval.extractor", image_size=(resolution, resolution),
                             images=f"the images (`data.resolution` {resolution})")
        reference = open_reference(spec.reference, num_features=EXTRACTOR_FEATURES[spec.extractor],
                                   name="`eval.reference`")
        reference.check_size((resolution, resolution), name=f"the images (`data.resolution` {resolution})")
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None
    check_packages_installed(spec.extractor)
    if config.model.name in TOKENIZERS and reference.images is None:
        raise ConfigError(f"`eval.reference` {spec.reference!r}: a tokenizer is scored by the rFID of its "
                          f"reconstructions, so the reference must hold images (a folder, or an ADM .npz with arr_0)")
    return reference


def check_packages_installed(extractor: str) -> None:
    """A ConfigError naming ``eval.extractor`` unless torchmetrics and the package ``extractor`` needs import."""
    from ..evaluation.features import check_extractor_installed
    from ..evaluation.metrics import check_metrics_installed

    try:
        check_metrics_installed()
        check_extractor_installed(extractor, option="eval.extractor")
    except ImportError as error:
        raise ConfigError(str(error)) from None


def evaluation_conditioning(config: Config, model: nn.Module, tokenizer: Optional[nn.Module],
                            num_classes: Optional[int]):
    """The class-balanced conditioning a generator is scored on (None for a tokenizer), checked to be one
    ``model`` (+ ``tokenizer``) can draw: a ConfigError naming ``eval`` otherwise. Cheap: called on every
    process, before the main process builds the evaluator."""
    from ..evaluation.sampling import Conditioning
    from .recipes import sampling_problem

    spec = config.eval
    if config.model.name in TOKENIZERS:
        return None
    conditioning = Conditioning(spec.num_samples, num_classes=num_classes, prompts=None,
                                max_caption_length=config.data.max_caption_length)
    problem = sampling_problem(model, tokenizer, conditioning.batch(range(min(spec.num_samples, spec.batch_size))))
    if problem is not None:
        raise ConfigError(f"`eval`: the model cannot draw the evaluation images: {problem}")
    return conditioning


class TrainingEvaluator:
    """Scores a model at a training step (:meth:`__call__`); built on the main process by :func:`build_evaluator`."""

    def __init__(self, *, config: Config, reference: Any, extractor: nn.Module, stats: Any = None,
                 conditioning: Any = None, metrics: Optional[List[str]] = None):
        self.spec, self.resolution = config.eval, config.data.resolution
        from .recipes import sample_options

        self.options = sample_options(config)
        self.reference, self.extractor, self.stats = reference, extractor, stats
        self.conditioning, self.metrics = conditioning, metrics

    def __call__(self, model: nn.Module, tokenizer: Optional[nn.Module]) -> Dict[str, float]:
        """``{"eval/fid": ...}`` (generators) or ``{"eval/rfid": ...}`` (tokenizers) of ``model``."""
        from ..evaluation.features import module_device

        device = module_device(self.extractor)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            scores = self._generated(model, tokenizer) if self.stats is not None else self._reconstructed(model)
        return {PREFIX + name: value for name, value in scores.items() if name != "num_samples"}

    def _generated(self, model: nn.Module, tokenizer: Optional[nn.Module]) -> Dict[str, float]:
        from ..evaluation.metrics import evaluate
        from ..evaluation.sampling import draw_batches, shard_batches
        from ..data.images import unit_to_uint8

        spec = self.spec
        batches = shard_batches(spec.num_samples, spec.batch_size, 0, 1)
        drawn = draw_batches(model, tokenizer, self.conditioning, batches, seed=spec.seed, options=self.options)
        return evaluate((unit_to_uint8(images) for _, images in drawn), self.stats, self.extractor, metrics=self.metrics)

    def _reconstructed(self, tokenizer: nn.Module) -> Dict[str, float]:
        from ..evaluation.metrics import reconstruction_fid

        held_out = self.reference.images.batches(self.spec.batch_size, resolution=self.resolution,
                                                 limit=self.spec.num_samples)
        return {"rfid": reconstruction_fid(held_out, tokenizer, self.extractor)}


def build_evaluator(config: Config, reference: Any, conditioning: Any, device: torch.device) -> TrainingEvaluator:
    """The extractor on ``device``; for a generator (``conditioning`` from :func:`evaluation_conditioning`),
    also the reference statistics. Run on the main process, after the checks every process ran."""
    from ..evaluation.features import build_extractor
    from ..evaluation.metrics import computable_metrics

    spec = config.eval
    extractor = build_extractor(spec.extractor, inception_weights=spec.inception_weights, device=device)
    if conditioning is None:
        return TrainingEvaluator(config=config, reference=reference, extractor=extractor)
    stats = reference.stats(extractor, resolution=config.data.resolution, batch_size=spec.batch_size)
    metrics, reasons = computable_metrics(extractor, stats, spec.num_samples)
    for reason in (*reference.notes, *reasons):
        print(f"eval: {reason}", flush=True)
    return TrainingEvaluator(config=config, reference=reference, extractor=extractor, stats=stats,
                             conditioning=conditioning, metrics=metrics)
