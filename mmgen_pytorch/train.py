"""Train any of the five models on your own images: one entry point on Hugging Face Accelerate.

    python -m mmgen_pytorch.train CONFIG [--section.key value ...] [--resume]
    python -m mmgen_pytorch.train CONFIG [--section.key value ...] --show   # the resolved config, nothing built
    accelerate launch -m mmgen_pytorch.train CONFIG                  # GPUs, as `accelerate config` chose
    torchrun --nproc_per_node 2 -m mmgen_pytorch.train CONFIG        # CPU (gloo) or GPUs

CONFIG is a YAML / JSON file or a shipped config name (``python -m mmgen_pytorch.train --list``); see
:mod:`mmgen_pytorch.training.config` for the keys. Whatever the config gets wrong is refused before the first
step with one line, ``config error: ...`` naming the key (exit status 1): the keys themselves, then what the
data, tokenizer and model make of them (a model's refusal of its kwargs, a tokenizer whose latent grid or
channels do not fit the model's, data the model cannot take). ``tokenizer.path`` is a saved tokenizer or a
tokenizer's training output folder (its latest checkpoint). ``data.batch_size`` is the global batch per optimizer
step: each process takes ``batch_size / (grad_accum * processes)`` items per micro-step, the same items
whatever the number of processes, so runs on 1 and N processes see the same batches.

Outputs in ``train.output_dir``: ``config.yaml`` (the resolved config), ``checkpoints/step-XXXXXXX/``
(:func:`~mmgen_pytorch.checkpoint.save_training_state`: model, EMA, optimizer, scheduler, grad scaler, step,
RNG states, plus one RNG file per process), ``samples/step-XXXXXXX.png`` (grids from the EMA model),
``log.jsonl`` (step, loss, lr) and TensorBoard event files when TensorBoard is installed. ``--resume``
continues from the latest checkpoint: on one process with ``data.num_workers: 0`` the resumed run is
bit-identical to an uninterrupted one (same batches, same random draws, same weights). With workers, the
augmentation draws after a resume come from new worker seeds (still seeded, not the same).

A tokenizer (``model.name`` VQVAE, AutoencoderKL or RQVAE; configs ``llamagen-vq-16``, ``mar-kl-16``,
``dnd-rqvae``) trains on images with :class:`~mmgen_pytorch.tokenizers.losses.TokenizerLoss` as its upstream
does: each step updates the tokenizer, then its PatchGAN discriminator (from ``tokenizer_loss.disc_start``),
each with its own optimizer; checkpoints add ``discriminator.safetensors`` and its optimizer / scheduler
states, and the checkpoint folder loads as the tokenizer (``VQVAE.load(folder)``). LPIPS needs torchvision's
VGG16 and the lpips package's linear weights as local files (``tokenizer_loss.vgg16_path`` / ``lpips_path``).

One process or DDP: Accelerate's FSDP, DeepSpeed and Megatron-LM setups are refused before anything is
built (the main process saves the unwrapped model and optimizer, and the EMA copies whole parameters; with
FSDP2's sharded parameters both fail), and so is ACCELERATE_USE_FSDP / _DEEPSPEED on CPU, where Accelerate
would ignore it and run DDP. FSDP2 training: ``examples/train_distributed.py --fsdp``.

With an ``eval`` section (``every`` > 0; :mod:`mmgen_pytorch.training.evaluation`) the main process scores the
EMA model every ``eval.every`` steps: FID / IS / precision / recall of ``eval.num_samples`` class-balanced
samples against ``eval.reference`` (a generator), or the rFID of the reconstructed first ``eval.num_samples``
reference images (a tokenizer); logged as ``eval/fid`` ... on lines of their own in ``log.jsonl`` and to the
tracker. Scoring leaves the training RNG streams as they were: losses and resumes are those of a run without it.

On a machine without a GPU, :func:`~mmgen_pytorch.training.allocator.keep_freed_memory` first sets glibc's
allocator to keep freed memory for reuse (``MMGEN_KEEP_FREED_MEMORY=0``: leave it as it is).

Needs accelerate and pyyaml (``pip install mmgen-pytorch[train]``) and ema-pytorch for the EMA.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ._utils import eval_mode, install_hint
from .data.cache import StackFields
from .training.allocator import keep_freed_memory
from .training.config import (TOKENIZERS, Config, ConfigError, absolute_paths, check_config, check_world_size,
                              load_config, shipped_configs, with_absolute_paths)
from .training.evaluation import build_evaluator, check_eval, evaluation_conditioning
from .training.recipes import (LOSSES, TEXT_MODELS, build_dataset, build_model, check_conditions, check_idle_blocks,
                               check_image_channels, check_latent_fit, dataset_labels, draw_samples, encode_once,
                               has_captions, load_tokenizer, loss_options, save_grid)
from .training.runs import CHECKPOINTS, checkpoint_dir, latest_checkpoint
from .training.tokenizer import DISCRIMINATOR, Adversary, build_tokenizer_loss, tokenizer_step

SAMPLES, LOG_FILE = "samples", "log.jsonl"


# the data stream: global batches in a seeded order, each process its slice, resumable at any step


class StepBatchSampler(Sampler):
    """Batches of indices for micro-steps ``start .. total - 1``: epoch ``e`` is a permutation drawn from a
    generator seeded with ``seed + e``, cut into global micro-batches of ``global_batch`` (the last partial
    one dropped); this process takes rows ``[rank * b, (rank + 1) * b)`` of each (``b = global_batch / world``).
    The order depends only on the seed and the micro-step, so a resumed run continues it exactly."""

    def __init__(self, length: int, *, global_batch: int, seed: int, rank: int, world: int, start: int, total: int):
        if length < global_batch:
            raise ValueError(f"the dataset has {length} items, fewer than one global micro-batch ({global_batch})")
        self.length, self.global_batch, self.seed = length, global_batch, seed
        self.rank, self.per_rank, self.start, self.total = rank, global_batch // world, start, total

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Iterator[List[int]]:
        per_epoch = self.length // self.global_batch
        order, epoch = None, None
        for step in range(self.start, self.total):
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch))
            first = (step % per_epoch) * self.global_batch + self.rank * self.per_rank
            yield order[first:first + self.per_rank].tolist()


def learning_rate_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup over ``warmup`` steps, then constant or cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def param_groups(model: nn.Module, weight_decay: float, decay_1d: bool) -> List[dict]:
    """Weight decay on matrices only (biases, norms, embeddings' 1-D vectors excluded) unless ``decay_1d``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_1d or weight_decay == 0:
        return [dict(params=params, weight_decay=weight_decay)]
    return [dict(params=[p for p in params if p.ndim >= 2], weight_decay=weight_decay),
            dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]


# checkpoints


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng-rank{rank:05d}.pt"


@dataclass
class State:
    """What a training run holds."""
    accelerator: Any
    model: nn.Module            # prepared (DDP-wrapped)
    inner: nn.Module            # unwrapped
    optimizer: Any              # prepared
    scheduler: Any
    ema: Any
    tokenizer: Optional[nn.Module]   # the frozen tokenizer a generator trains through
    step: Callable[..., Dict[str, torch.Tensor]]  # one micro-step: (config, state, batch, step) -> logged terms
    adversary: Optional[Adversary] = None  # tokenizer training: the discriminator, its optimizer and the loss

    def sampling_model(self) -> nn.Module:
        """What grids and metrics draw from: the EMA model (the model itself without EMA)."""
        return self.inner if self.ema is None else self.ema.ema_model

    def trained(self) -> List[nn.Module]:
        """The prepared modules that take gradients (for gradient accumulation)."""
        return [self.model] + ([self.adversary.model] if self.adversary is not None else [])

    def schedulers(self, step: int) -> List[Any]:
        """The schedulers of the optimizers that stepped at ``step``: the discriminator's schedule starts
        with its training at ``disc_start`` (as RQ-VAE's; LlamaGen's and LDM's are constant)."""
        active = self.adversary is not None and self.adversary.loss.gan_active(step)
        return [self.scheduler] + ([self.adversary.scheduler] if active else [])

    def parts(self) -> dict:
        """What checkpoints hold besides the model (:class:`~mmgen_pytorch.checkpoint.TrainedPart`)."""
        from .checkpoint import TrainedPart

        if self.adversary is None:
            return {}
        return {DISCRIMINATOR: TrainedPart(self.adversary.inner, self.adversary.optimizer.optimizer,
                                           self.adversary.scheduler)}


def model_step(config: Config, state: State, batch: dict, step: int) -> Dict[str, torch.Tensor]:
    """One micro-step of a generator: its loss backward and (on the last micro-step) the optimizer step."""
    accelerator = state.accelerator
    loss = LOSSES[config.model.name](state.model, state.inner, batch, state.tokenizer, **loss_options(config))
    accelerator.backward(loss)
    if accelerator.sync_gradients and config.optim.grad_clip is not None:
        accelerator.clip_grad_norm_(state.model.parameters(), config.optim.grad_clip)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return dict(loss=loss.detach())


def save_checkpoint(state: State, output_dir: Path, step: int) -> None:
    from .checkpoint import get_rng_states, save_training_state

    accelerator, folder = state.accelerator, checkpoint_dir(output_dir, step)
    accelerator.wait_for_everyone()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(get_rng_states(), rng_file(folder, accelerator.process_index))
    accelerator.wait_for_everyone()  # the training state last: a folder with it is complete (latest_checkpoint)
    if accelerator.is_main_process:
        save_training_state(folder, model=state.inner, optimizer=state.optimizer.optimizer, step=step, ema=state.ema,
                            scheduler=state.scheduler, grad_scaler=accelerator.scaler, parts=state.parts())
    accelerator.wait_for_everyone()


def resume(state: State, folder: Path) -> int:
    """The step to continue from; every process restores its own RNG states."""
    from .checkpoint import load_training_state, set_rng_states
    from .files import read_tensor_file

    step = load_training_state(folder, model=state.inner, optimizer=state.optimizer.optimizer, ema=state.ema,
                               scheduler=state.scheduler, grad_scaler=state.accelerator.scaler, restore_rng=False,
                               parts=state.parts())
    set_rng_states(read_tensor_file(rng_file(folder, state.accelerator.process_index), expected="torch"))
    schedulers = [state.scheduler] + ([state.adversary.scheduler] if state.adversary is not None else [])
    for scheduler in schedulers:
        follow_schedule(scheduler)
    return step


def follow_schedule(scheduler) -> None:
    """Set the learning rates of a restored LambdaLR's optimizer from its schedule at its restored step. The
    saved rates follow the schedule the run was saved with; with another ``train.steps`` (which a resume may
    change) a cosine schedule differs, and the saved rate would be used for one step (0 at the old end).
    Unchanged, the rates are the same floats."""
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr() reads


# what a run continues: checked before anything is loaded or built

RESUMABLE_CHANGES = {"train": ("steps", "log_every", "sample_every", "checkpoint_every", "progress", "tracker",
                               "output_dir"),
                     "data": ("num_workers",), "sample": None, "eval": None}  # None: the whole section may change


def checkpoint_to_resume(config: Config, output_dir: Path, resume_run: bool) -> Optional[Path]:
    """The checkpoint ``--resume`` continues, or None for a fresh run. A fresh run into a folder that
    holds checkpoints is refused (it would mix two runs' logs and checkpoints); a resumed run must have the
    config it was saved with (``config.yaml``), up to :data:`RESUMABLE_CHANGES`."""
    latest = latest_checkpoint(output_dir)
    if not resume_run:
        if latest is not None:
            raise ConfigError(f"train.output_dir {str(output_dir)!r} already holds checkpoints (the latest: "
                              f"{latest.name}): pass --resume to continue that run, or choose another train.output_dir")
        return None
    if latest is None:
        raise ConfigError(f"--resume: no checkpoint under {str(output_dir / CHECKPOINTS)!r}")
    saved = output_dir / "config.yaml"
    if saved.is_file():  # paths compared as absolute (an earlier version wrote them as given)
        changed = config_changes(config_sections(absolute_paths(_yaml_load(saved))), config_sections(config.to_dict()))
        if changed:
            raise ConfigError(f"--resume: the config differs from the one {str(saved)!r} was saved with in "
                              f"{', '.join(changed)}; a resumed run must keep it (only "
                              f"{', '.join(_resumable_names())} may change)")
    return latest


def config_changes(saved: dict, current: dict) -> List[str]:
    """``section.key`` names whose values differ, except the :data:`RESUMABLE_CHANGES`."""
    changed = []
    for section in sorted(set(saved) | set(current)):
        free = RESUMABLE_CHANGES.get(section, ())
        if free is None:
            continue
        old, new = saved.get(section) or {}, current.get(section) or {}
        changed += [f"{section}.{key}" for key in sorted(set(old) | set(new))
                    if key not in free and old.get(key) != new.get(key)]
    return changed


def _resumable_names() -> List[str]:
    return [f"{section}.{key}" for section, keys in RESUMABLE_CHANGES.items() for key in (keys or ["*"])]


def _yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


# the loop


def make_accelerator(config: Config):
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
    except ImportError:
        raise SystemExit(f"mmgen_pytorch.train needs Hugging Face Accelerate: {install_hint('train')}") from None
    tracker = config.train.tracker
    if tracker == "auto":
        from importlib.util import find_spec

        tracker = "tensorboard" if find_spec("tensorboard") or find_spec("tensorboardX") else "none"
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=config.train.find_unused_parameters)]
    check_unsharded(sharding_asked())  # before Accelerate imports the sharding library
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=config.train.grad_accum,
                              mixed_precision=config.train.mixed_precision, kwargs_handlers=handlers,
                              log_with=None if tracker == "none" else tracker, project_dir=config.train.output_dir)
    check_unsharded(accelerator.distributed_type.name)
    return accelerator, tracker


SHARDED_SETUPS = ("FSDP", "DEEPSPEED", "MEGATRON_LM")  # Accelerate's setups that shard weights or optimizer state


def check_unsharded(setup: str) -> None:
    """The loop needs the whole model on every process (one process, or DDP): the main process alone saves
    the unwrapped model and optimizer, the EMA copies the model's parameters and the sample grid runs the
    model; under FSDP (sharded DTensor parameters) the EMA update and the checkpoint fail. ``setup``: the
    distributed type Accelerate chose, or one asked for through ACCELERATE_USE_* (which Accelerate ignores
    on CPU, running DDP instead): a sharded one is refused before anything is built."""
    if setup in SHARDED_SETUPS:
        raise ConfigError(f"mmgen_pytorch.train runs on one process or DDP, not Accelerate's {setup} (its "
                          f"checkpoints, EMA and sample grids need the whole model on every process): choose "
                          f"multi-GPU (DDP) in `accelerate config` and leave ACCELERATE_USE_{setup} unset; FSDP2 "
                          f"training: examples/train_distributed.py --fsdp")


def sharding_asked() -> str:
    from accelerate.utils import parse_flag_from_env

    return next((name for name in SHARDED_SETUPS if parse_flag_from_env(f"ACCELERATE_USE_{name}")), "NO")


def make_ema(config: Config, model: nn.Module):
    if config.optim.ema_beta is None:
        return None
    from ema_pytorch import EMA

    # by default a constant beta from `ema_start` on (upstream MAR, DiT, MonoFormer); `ema_warmup`: ema-pytorch's
    # own ramp (inv_gamma 1, power 2/3), the decay growing towards the beta
    ramp = dict(inv_gamma=1.0, power=2 / 3) if config.optim.ema_warmup else dict(inv_gamma=1e-12)
    return EMA(model, beta=config.optim.ema_beta, update_after_step=config.optim.ema_start, update_every=1,
               include_online_model=False, use_foreach=True, **ramp)


def make_optimizer(config: Config, model: nn.Module):
    """AdamW over ``model`` as ``optim`` says, and its LambdaLR (stepped once per optimizer step). The fused
    kernel where torch has one for the parameters' device (CPU and CUDA): one kernel per parameter instead of a
    dozen small ops, 5x faster on the digits models' ~1M parameters (the same update up to rounding)."""
    optim = config.optim
    groups = param_groups(model, optim.weight_decay, optim.decay_1d)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, fused=fused or None)
    schedule = lambda step: learning_rate_factor(step, warmup=optim.warmup_steps, total=config.train.steps,
                                                 schedule=optim.schedule)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def build(config: Config, accelerator, tokenizer: Optional[nn.Module], dataset) -> State:
    torch.manual_seed(config.train.seed)  # the same initial weights on every process
    training_tokenizer = config.model.name in TOKENIZERS
    loss = build_tokenizer_loss(config) if training_tokenizer else None  # reads the LPIPS files first
    model = build_model(config, tokenizer)
    check_conditions(config, model, dataset)
    check_image_channels(config, model, tokenizer)
    check_latent_fit(config, model, tokenizer, dataset)
    check_idle_blocks(config, model, accelerator.num_processes)
    if tokenizer is not None:
        tokenizer.to(accelerator.device)
    optimizer, scheduler = make_optimizer(config, model)
    ema = make_ema(config, model)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
    state = State(accelerator, prepared, accelerator.unwrap_model(prepared), optimizer, scheduler, ema, tokenizer,
                  step=model_step)
    if training_tokenizer:
        loss.to(accelerator.device)
        disc_optimizer, disc_scheduler = make_optimizer(config, loss.discriminator)
        disc, disc_optimizer = accelerator.prepare(loss.discriminator, disc_optimizer)
        state.adversary = Adversary(loss, disc, disc_optimizer, disc_scheduler)
        state.step = tokenizer_step
    return state


@dataclass
class Prepared:
    """A run built and checked, ready for its first step."""
    config: Config
    state: State
    loader: DataLoader
    start: int
    output_dir: Path
    classes: Optional[int]
    evaluator: Any


def run(config: Config, *, resume_run: bool = False) -> List[float]:
    """Train as ``config`` says; returns the logged losses: every ``log_every`` steps, the mean over the
    micro-batches since the previous log and over the processes."""
    return train_prepared(prepare(config, resume_run=resume_run))


def prepare(config: Config, *, resume_run: bool = False) -> Prepared:
    """Everything before the first step: the checks (a :class:`ConfigError` for whatever the config gets
    wrong), the tokenizer, data, model, optimizer, evaluator and the resumed state. Paths in the config that
    exist are made absolute first, so the run's ``config.yaml`` reads the same from any folder."""
    config = with_absolute_paths(config)
    accelerator, tracker = make_accelerator(config)
    micro_batch = check_world_size(config, accelerator.num_processes)
    output_dir = Path(config.train.output_dir)
    reference = check_eval(config)
    tokenizer = load_tokenizer(config)
    dataset = build_dataset(config, tokenizer)  # a cache of another kind is refused before the model is built
    check_dataset_length(config, len(dataset), micro_batch * accelerator.num_processes)
    state = build(config, accelerator, tokenizer, dataset)
    # after what the config asks of the data and model, so that a rerun of a mended config is told its own errors
    folder = checkpoint_to_resume(config, output_dir, resume_run)
    # on the tokenizer's device, after every check; each process encodes the whole (small) dataset
    dataset = encode_once(config, dataset, state.tokenizer, batch_size=micro_batch,
                          progress=config.train.progress and accelerator.is_main_process)
    classes = num_classes(config, dataset)
    evaluator = None
    if reference is not None:  # checked on every process, built on the main one
        conditioning = evaluation_conditioning(config, state.sampling_model(), state.tokenizer, classes)
        evaluator = on_main_process(accelerator, lambda: build_evaluator(config, reference, conditioning,
                                                                         accelerator.device), what="`eval`")
    start = 0
    if folder is not None:
        start = resume(state, folder)
        accelerator.print(f"resumed from {folder} at step {start}" + (
            f": nothing to train, the run is at its `train.steps` {config.train.steps} (raise it to train on)"
            if start >= config.train.steps else ""))
    else:
        torch.manual_seed(config.train.seed + accelerator.process_index)  # each process its own draws
    if accelerator.is_main_process:
        write_config(config, output_dir)
    if tracker != "none":
        accelerator.init_trackers("mmgen_pytorch", config=flat_config(config))
    sampler = StepBatchSampler(len(dataset), global_batch=micro_batch * accelerator.num_processes,
                               seed=config.train.seed, rank=accelerator.process_index,
                               world=accelerator.num_processes, start=start * config.train.grad_accum,
                               total=config.train.steps * config.train.grad_accum)
    # the loader draws its workers' base seed from its own generator, not from the global RNG whose
    # state a resume restores (and per process and start step, so workers differ between them)
    seeds = torch.Generator().manual_seed(config.train.seed * 1_000_003 + start * 1009 + accelerator.process_index)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.data.num_workers, collate_fn=StackFields(),
                        generator=seeds)
    count = sum(p.numel() for p in state.inner.parameters())
    accelerator.print(f"{config.model.name}: {count / 1e6:.2f}M parameters, {len(dataset)} items, "
                      f"{accelerator.num_processes} process(es) x {micro_batch} x {config.train.grad_accum} "
                      f"accumulation per step on {accelerator.device}, tracker: {tracker}")
    return Prepared(config, state, loader, start, output_dir, classes, evaluator)


def train_prepared(prepared: Prepared) -> List[float]:
    try:
        return train_loop(prepared.config, prepared.state, prepared.loader, prepared.start, prepared.output_dir,
                          prepared.classes, prepared.evaluator)
    finally:
        prepared.state.accelerator.end_training()


def on_main_process(accelerator, build: Callable[[], Any], *, what: str) -> Any:
    """``build()`` on the main process (None elsewhere); when it fails, every process raises (the main one its
    error, the others a ConfigError carrying its message), so none waits for a process that stopped."""
    result, failure = None, None
    if accelerator.is_main_process:
        try:
            result = build()
        except Exception as error:  # told to the other processes, then raised
            failure = error
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([None if failure is None else f"{type(failure).__name__}: {failure}"])[0]
        if message is not None and failure is None:
            raise ConfigError(f"{what}: the main process failed to build it: {message}")
    if failure is not None:
        raise failure
    return result


def check_dataset_length(config: Config, length: int, global_batch: int) -> None:
    if length < global_batch:
        source = next(f"data.{name}" for name in ("folder", "hf", "cache") if getattr(config.data, name) is not None)
        raise ConfigError(f"`{source}` holds {length} items, fewer than one global micro-batch ({global_batch}: "
                          f"`data.batch_size` / `train.grad_accum`): give more items or a smaller `data.batch_size`")


def train_loop(config: Config, state: State, loader: DataLoader, start: int, output_dir: Path,
               classes: Optional[int], evaluator=None) -> List[float]:
    from tqdm.auto import tqdm

    accelerator, train = state.accelerator, config.train
    terms, logged, step = {}, [], start
    bar = tqdm(total=train.steps, initial=start, disable=not (train.progress and accelerator.is_main_process),
               desc="train", unit="step")
    for module in state.trained():
        module.train()
    for batch in loader:
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        with accelerator.accumulate(*state.trained()):
            for key, value in state.step(config, state, batch, step).items():
                terms.setdefault(key, []).append(value)
        if not accelerator.sync_gradients:
            continue
        lr = state.scheduler.get_last_lr()[0]  # the rate this step used
        for scheduler in state.schedulers(step):
            scheduler.step()
        if state.ema is not None:
            state.ema.update()
        step += 1
        bar.update(1)
        if step % train.log_every == 0 or step == train.steps:
            logged.append(log_step(accelerator, output_dir, step, terms, lr))
            bar.set_postfix(loss=f"{logged[-1]:.4f}")
            terms = {}
        if (train.checkpoint_every and step % train.checkpoint_every == 0) or step == train.steps:
            save_checkpoint(state, output_dir, step)
        if (train.sample_every and step % train.sample_every == 0) or step == train.steps:
            sample_grid(config, state, output_dir, step, classes)
        if config.eval.every and step % config.eval.every == 0:
            log_metrics(state, evaluator, output_dir, step)
    bar.close()
    return logged


def log_step(accelerator, output_dir: Path, step: int, terms: Dict[str, List[torch.Tensor]], lr: float) -> float:
    """Log each term's mean over the micro-steps since the last log and over the processes (``loss`` first;
    a tokenizer's ``disc_loss`` over the steps that had one); returns the loss."""
    values = {key: accelerator.reduce(torch.stack(parts).mean(), reduction="mean").item()
              for key, parts in terms.items()}
    if accelerator.is_main_process:
        write_log(accelerator, output_dir, step, dict(**values, lr=lr))
        print(f"step {step} loss {values['loss']:.6f} lr {lr:.3g}", flush=True)
    return values["loss"]


def write_log(accelerator, output_dir: Path, step: int, values: Dict[str, float]) -> None:
    """One line of ``log.jsonl`` and the tracker (main process)."""
    with open(output_dir / LOG_FILE, "a", encoding="utf-8") as file:
        file.write(json.dumps(dict(step=step, **values)) + "\n")
    accelerator.log(values, step=step)


def log_metrics(state: State, evaluator, output_dir: Path, step: int) -> None:
    """The ``eval`` metrics of the EMA model, scored on the main process (the others wait), logged as
    ``eval/fid`` ... in ``log.jsonl`` (a line of their own) and the tracker."""
    accelerator = state.accelerator
    if accelerator.is_main_process:
        values = evaluator(state.sampling_model(), state.tokenizer)
        write_log(accelerator, output_dir, step, values)
        print(f"step {step} " + " ".join(f"{name} {value:.4f}" for name, value in values.items()), flush=True)
    accelerator.wait_for_everyone()


def sample_grid(config: Config, state: State, output_dir: Path, step: int, classes: Optional[int]) -> None:
    """A PNG grid from the EMA model (the model itself without EMA), drawn on the main process with its own
    seeded generator, so the training RNG streams are untouched."""
    accelerator = state.accelerator
    if accelerator.is_main_process:
        model = state.sampling_model()
        with eval_mode(model):
            images = draw_samples(config, model, state.tokenizer, classes)
        if images is None and config.model.name in TOKENIZERS:
            accelerator.print(f"step {step}: no sample grid (a tokenizer draws none; the `eval` section scores its "
                              f"reconstructions by rFID)")
        elif images is None:
            accelerator.print(f"step {step}: no sample grid ({config.model.name} needs a tokenizer / class labels to "
                              f"draw one)")
        else:
            path = output_dir / SAMPLES / f"step-{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_grid(images, path)
    accelerator.wait_for_everyone()


def num_classes(config: Config, dataset) -> Optional[int]:
    """The classes the grid, evaluation and ``sample`` cycle through: the data's (a folder's class folders, else
    its labels), or the model's ``num_classes`` where the labels are not at hand (rows of a Hugging Face
    dataset); None, unconditional, for data without labels and for a text model trained on captions (a class id
    is no caption)."""
    if config.model.name in TEXT_MODELS and has_captions(dataset):
        return None
    classes = getattr(dataset, "classes", None)
    if classes:
        return len(classes)
    labels = dataset_labels(dataset)  # a flat folder (all -1) or a cache
    if labels is not None:
        return int(labels.max()) + 1 if bool((labels >= 0).any()) else None
    return config.model.kwargs.get("num_classes")


def flat_config(config: Config) -> dict:
    """Scalars only (what trackers store), keys ``section.key``."""
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    return flat


def write_config(config: Config, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(config_yaml(config), encoding="utf-8")


def config_yaml(config: Config) -> str:
    """The resolved config as YAML (what ``config.yaml`` holds and ``--show`` prints)."""
    import yaml

    return yaml.safe_dump(config_sections(config.to_dict()), sort_keys=False)


def config_sections(config: dict) -> dict:
    """The sections of a config dict that its model uses, with tuples as lists: a generator's has no
    ``tokenizer_loss`` (that trains tokenizers; the checks refuse it set for a generator)."""
    data = json.loads(json.dumps(config))
    if data.get("model", {}).get("name") not in TOKENIZERS:
        data.pop("tokenizer_loss", None)
    return data


# command line


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(prog="python -m mmgen_pytorch.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="a YAML / JSON file or a shipped config name")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    parser.add_argument("--list", action="store_true", help="list the shipped configs")
    parser.add_argument("--show", action="store_true",
                        help="print the resolved config (overrides applied) as YAML, then any config error, and exit "
                             "without building anything")
    args, overrides = parser.parse_known_args(argv)
    if not args.list and args.config is None:
        parser.error("give a CONFIG (a file or one of: " + ", ".join(shipped_configs()) + ")")
    return args, overrides


def main(argv: Optional[Sequence[str]] = None) -> List[float]:
    args, overrides = parse_args(argv)
    if args.list:
        print("\n".join(shipped_configs()))
        return []
    try:
        config = load_config(args.config, overrides, check_values=not args.show)
        if args.show:  # the config as resolved, then what it still lacks (e.g. the data of a shipped config)
            print(config_yaml(config), end="", flush=True)
            check_config(config)
            return []
        if not torch.cuda.is_available():
            keep_freed_memory()  # CPU training: no page faults for the tensors every step frees and allocates again
        prepared = prepare(config, resume_run=args.resume)
    except ConfigError as error:  # whatever the config gets wrong, up to the first step: one line, no traceback
        raise SystemExit(f"config error: {error}") from None
    return train_prepared(prepared)


if __name__ == "__main__":
    main(sys.argv[1:])
