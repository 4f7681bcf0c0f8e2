"""Regenerate the golden reference files in this folder by running the upstream code. Run by hand, never by CI.

The exactness tests compare our models with outputs of the official implementations. This script makes those
outputs: it builds each upstream model at toy scale, gives it weights from a seeded recipe (`weights.py`; the
weights themselves are not stored), runs the upstream functions on small inputs and writes one file per model
(`config`, `weights` recipe, `inputs`, `outputs`, `notes`). It never imports mmgen_pytorch: the reference is
independent of the code under test. What each file holds is described in README.md beside this script.

Upstream checkouts, one folder each in UPSTREAM (default: `upstream/` beside this repository's checkout), each at
its pinned commit (the script refuses any other HEAD):

    mar              https://github.com/LTH14/mar                      fe470ac24afbee924668d8c5c83e9fec60af3a73
    DnD-Transformer  https://github.com/chenllliang/DnD-Transformer    4a8b9828faee42cc22006017fd72bc6bd4d4d315
    LlamaGen         https://github.com/FoundationVision/LlamaGen      ce98ec41803a74a90ce68c40ababa9eaeffeb4ec

    mkdir -p ../upstream && cd ../upstream
    git clone https://github.com/LTH14/mar && git -C mar checkout fe470ac24afbee924668d8c5c83e9fec60af3a73
    git clone https://github.com/chenllliang/DnD-Transformer && \\
        git -C DnD-Transformer checkout 4a8b9828faee42cc22006017fd72bc6bd4d4d315
    git clone https://github.com/FoundationVision/LlamaGen && \\
        git -C LlamaGen checkout ce98ec41803a74a90ce68c40ababa9eaeffeb4ec

`hf_llama.pt` comes from Hugging Face `transformers` (LlamaForCausalLM), pinned by version below.

Environment (a separate virtual environment, not the project's): Python 3.11 and

    pip install torch==2.13.0 torchvision==0.28.0 timm==0.9.12 transformers==5.23.0 omegaconf numpy scipy tqdm

timm (MAR's transformer blocks; 0.9.12 is what MAR's environment.yaml pins) needs torchvision; numpy, scipy and
tqdm are imported by MAR's modules, omegaconf by DnD's rqvae package. Everything runs on the CPU in float32 and
takes about a minute; running it twice gives identical files:

    python tests/golden/regenerate.py [--upstream DIR] [--only mar.pt ...]

The committed files were made with torch 2.13.0 (the PyPI build, run on the CPU), torchvision 0.28.0, timm 0.9.12,
transformers 5.23.0, omegaconf 2.4.0, numpy 2.4.6, scipy 1.17.1 and tqdm 4.70.1.

Upstream code is run unmodified. Around it: `Tensor.cuda` is a no-op (MAR calls `.cuda()` unconditionally); a few
upstream functions are wrapped to record what they receive (LlamaGen's and DnD's sampling functions for the
per-step logits and decision margins, MAR's `mask_by_order` for the mask schedule, whose `DiffLoss.sample` is
replaced by a recorder); and DnD's `rqvae.models` package is registered without running its __init__.py, which
imports the RQ-Transformer, whose config dataclasses fail on Python >= 3.11.
"""

import argparse
import contextlib
import functools
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from weights import build_state_dict, constant, copy_of, make_recipe, normal

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
UPSTREAM_PINS = {
    "mar": ("LTH14/mar", "fe470ac24afbee924668d8c5c83e9fec60af3a73"),
    "DnD-Transformer": ("chenllliang/DnD-Transformer", "4a8b9828faee42cc22006017fd72bc6bd4d4d315"),
    "LlamaGen": ("FoundationVision/LlamaGen", "ce98ec41803a74a90ce68c40ababa9eaeffeb4ec"),
}
PACKAGE_PINS = {"torch": "2.13.0", "timm": "0.9.12", "transformers": "5.23.0"}
WEIGHT_SEED = 0
INPUT_SEED = 1234


# --- environment -----------------------------------------------------------------------------------------------

def check_upstream(upstream: Path, folders):
    for folder in folders:
        repo, commit = UPSTREAM_PINS[folder]
        path = upstream / folder
        if not (path / ".git").exists():
            raise SystemExit(f"{repo}: expected a git clone at {path} (see this script's docstring)")
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        if head != commit:
            raise SystemExit(f"{repo} at {path}: expected commit {commit}, found {head}")


def check_packages():
    import timm
    import transformers
    found = {"torch": torch.__version__.split("+")[0], "timm": timm.__version__,
             "transformers": transformers.__version__}
    wrong = {name: (version, found[name]) for name, version in PACKAGE_PINS.items() if found[name] != version}
    if wrong:
        raise SystemExit("package versions differ from the pins: " + ", ".join(
            f"{name} expected {expected}, found {got}" for name, (expected, got) in wrong.items()))


@contextlib.contextmanager
def upstream_modules(path: Path):
    """Import from one upstream checkout; forget its modules afterwards (the checkouts share names like utils)."""
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))
        for name in [name for name, module in sys.modules.items() if comes_from(module, path)]:
            del sys.modules[name]


def comes_from(module, path: Path) -> bool:
    spec, path_list = getattr(module, "__spec__", None), getattr(module, "__path__", None)
    places = [getattr(module, "__file__", None) or "", *(getattr(spec, "submodule_search_locations", None) or []),
              *(path_list if isinstance(path_list, list) else [])]
    return any(place and Path(place).is_relative_to(path) for place in places)


@contextlib.contextmanager
def patched(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield original
    finally:
        setattr(owner, name, original)


def cuda_is_noop():
    return patched(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)


@contextlib.contextmanager
def recording(owner, name: str, keep):
    """Wrap owner.<name>: every call still runs, and keep(args, result) is appended to the yielded list."""
    seen = []

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(keep(args, result))
        return result
    with patched(owner, name, wrapper) as original:
        yield seen


def last_logits(args, result):
    return args[0][:, -1].detach().clone()


def set_weights(model: nn.Module, init_of) -> dict:
    recipe = make_recipe(WEIGHT_SEED, model.state_dict(), init_of)
    model.load_state_dict(build_state_dict(recipe), strict=True)
    return recipe


def keys_of(model: nn.Module, module_types) -> set:
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, module_types) and getattr(module, "weight", None) is not None}


def smallest_gap(logits: torch.Tensor) -> float:
    """Smallest top-1 minus top-2 difference over the last axis: how far a greedy decision is from a tie."""
    top = logits.float().topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).min().item()


def smallest_distance_gap(distances: torch.Tensor) -> float:
    """Smallest second-best minus best distance over the last axis."""
    low = distances.float().topk(2, dim=-1, largest=False).values
    return (low[..., 1] - low[..., 0]).min().item()


def magnitudes(outputs: dict) -> str:
    return ", ".join(f"{name} {value.abs().max().item():.3g}" for name, value in outputs.items()
                     if value.is_floating_point() and value.numel())


def notes_for(source: str, section: str, facts: list) -> str:
    return "\n".join([f"Made by tests/golden/regenerate.py with {source}, CPU, float32, torch {torch.__version__}; "
                      f"weights rebuilt from the recipe under `weights` (tests/golden/weights.py).",
                      f"Full description and tolerances: tests/golden/README.md, section {section}.", *facts])


def gaussian(generator, *shape):
    return torch.randn(*shape, generator=generator)


def uniform_pixels(generator, *shape):
    return torch.rand(*shape, generator=generator) * 2 - 1


# --- MAR -------------------------------------------------------------------------------------------------------

MAR_CONFIG = dict(img_size=64, vae_stride=16, patch_size=1, vae_embed_dim=16, encoder_embed_dim=64, encoder_depth=2,
                  encoder_num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0,
                  mask_ratio_min=0.7, label_drop_prob=0.1, class_num=10, attn_dropout=0.0, proj_dropout=0.0,
                  buffer_size=4, diffloss_d=2, diffloss_w=64, num_sampling_steps="10", diffusion_batch_mul=1,
                  grad_checkpointing=False)
MAR_EMBEDDINGS = {"class_emb.weight", "fake_latent", "mask_token", "encoder_pos_embed_learned",
                  "decoder_pos_embed_learned", "diffusion_pos_embed_learned"}


def build_mar(mar_module, **overrides):
    return mar_module.MAR(**{**MAR_CONFIG, **overrides}, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))


def mar_init(model):
    norms = keys_of(model, nn.LayerNorm)

    def init_of(key, tensor):
        if key in norms:
            return normal(0.1, mean=1.0)
        if key.endswith(".bias"):
            return normal(0.02)
        return normal(0.5) if key in MAR_EMBEDDINGS else normal(0.05)
    return init_of


def mar_inputs(generator):
    mask = torch.zeros(2, 16)
    for row in mask:
        row[torch.randperm(16, generator=generator)[:11]] = 1.0
    return {"x": gaussian(generator, 2, 16, 4, 4), "labels": torch.tensor([3, 7]), "mask": mask,
            "dl_x": gaussian(generator, 5, 16), "dl_t": torch.tensor([0, 1, 250, 500, 999]),
            "dl_c": gaussian(generator, 5, 64), "dl_noise": gaussian(generator, 5, 16),
            "gen_xt": gaussian(generator, 3, 16), "gen_c": gaussian(generator, 3, 64),
            "gen_c_uncond": gaussian(generator, 3, 64), "gen_cfg_scale": torch.tensor(3.0)}


def mar_encoder_decoder(model, inputs):
    tokens = model.patchify(inputs["x"])
    mask = inputs["mask"]

    def run(class_embedding):
        return model.forward_mae_decoder(model.forward_mae_encoder(tokens, mask, class_embedding), mask)
    return {"tokens": tokens, "unpatchify_tokens": model.unpatchify(tokens),
            "z_cond": run(model.class_emb(inputs["labels"])), "z_uncond": run(model.fake_latent.repeat(2, 1))}


def mar_diffloss(model, inputs):
    diffloss, x, t, c = model.diffloss, inputs["dl_x"], inputs["dl_t"], inputs["dl_c"]
    losses = diffloss.train_diffusion.training_losses(diffloss.net, x, t, model_kwargs=dict(c=c),
                                                      noise=inputs["dl_noise"])
    return {"dl_net_out": diffloss.net(x, t, c), "dl_loss": losses["loss"], "dl_mse": losses["mse"],
            "dl_vb": losses["vb"]}


def mar_sampler(model, inputs):
    diffusion, net = model.diffloss.gen_diffusion, model.diffloss.net
    xt, c, c_uncond, scale = inputs["gen_xt"], inputs["gen_c"], inputs["gen_c_uncond"], inputs["gen_cfg_scale"]
    plain, guided = [], []
    for i in range(diffusion.num_timesteps):
        plain.append(diffusion.p_mean_variance(net.forward, xt, torch.tensor([i] * 3), clip_denoised=False,
                                               model_kwargs=dict(c=c)))
        guided.append(diffusion.p_mean_variance(net.forward_with_cfg, torch.cat([xt, xt]), torch.tensor([i] * 6),
                                                clip_denoised=False,
                                                model_kwargs=dict(c=torch.cat([c, c_uncond]),
                                                                  cfg_scale=scale.item())))
    loop = diffusion.p_sample_loop(net.forward, (3, 16), noise=xt, clip_denoised=False, model_kwargs=dict(c=c),
                                   temperature=0.0)
    stack = lambda steps, name: torch.stack([step[name] for step in steps])  # noqa: E731
    return {"gen_timestep_map": torch.tensor(diffusion.timestep_map, dtype=torch.int64),
            "gen_betas": torch.from_numpy(np.asarray(diffusion.betas, dtype=np.float64)),
            "gen_mean": stack(plain, "mean"), "gen_log_variance": stack(plain, "log_variance"),
            "gen_pred_xstart": stack(plain, "pred_xstart"), "gen_cfg_mean": stack(guided, "mean"),
            "gen_cfg_log_variance": stack(guided, "log_variance"), "gen_loop_tau0": loop}


def mar_schedule(mar_module, model, num_iter: int) -> dict:
    """The official sample_tokens' per-step mask_len, number of predicted tokens and cfg scale (cfg 3, linear)."""
    calls = []

    def sample(z, temperature, cfg):  # stands in for DiffLoss.sample, which fails on steps that predict 0 tokens
        calls.append((z.shape[0] // 2, float(cfg)))  # cfg != 1 doubles the batch
        return torch.zeros(z.shape[0], model.token_embed_dim)

    np.random.seed(0)  # the generation order; the counts do not depend on it
    with recording(mar_module, "mask_by_order", lambda args, result: int(args[0].item())) as mask_lens, \
            patched(model.diffloss, "sample", sample):
        model.sample_tokens(bsz=1, num_iter=num_iter, cfg=3.0, cfg_schedule="linear", labels=torch.tensor([0]))
    tag = f"L{model.seq_len}_N{num_iter}"
    return {f"mask_len_{tag}": torch.tensor(mask_lens),
            f"num_pred_{tag}": torch.tensor([predicted for predicted, _ in calls]),
            f"cfg_linear_{tag}": torch.tensor([scale for _, scale in calls], dtype=torch.float32)}


def make_mar(upstream: Path) -> dict:
    with upstream_modules(upstream / "mar"), cuda_is_noop(), torch.no_grad():
        from models import mar as mar_module
        torch.manual_seed(0)
        model = build_mar(mar_module).eval()
        recipe = set_weights(model, mar_init(model))
        inputs = mar_inputs(torch.Generator().manual_seed(INPUT_SEED))
        outputs = {**mar_encoder_decoder(model, inputs), **mar_diffloss(model, inputs), **mar_sampler(model, inputs)}
        wide = build_mar(mar_module, img_size=256).eval()  # seq_len 256, for the schedule only
        for schedule_model in (model, wide):
            for num_iter in (4, 8, 64):
                outputs.update(mar_schedule(mar_module, schedule_model, num_iter))
    config = {**MAR_CONFIG, "norm_layer": "LayerNorm(eps=1e-6)"}
    notes = notes_for(f"LTH14/mar at {UPSTREAM_PINS['mar'][1][:7]}", "mar.pt",
                      [f"max |value|: {magnitudes(outputs)}"])
    return {"config": config, "weights": recipe, "inputs": inputs, "outputs": outputs, "notes": notes}


# --- MAR's KL VAE ----------------------------------------------------------------------------------------------

VAE_COMMON = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=2, dropout=0.0, resamp_with_conv=True,
                  in_channels=3, resolution=256, z_channels=4)
MAR_VAE_CONFIG = {"embed_dim": 4, "ch_mult": (1, 2), "use_variational": True, "ch": 32,
                  "encoder_kwargs": {**VAE_COMMON, "attn_resolutions": (16,), "double_z": True},
                  "decoder_kwargs": {**VAE_COMMON, "attn_resolutions": (), "give_pre_end": False}}


def mar_vae_init(model):
    norms = keys_of(model, nn.GroupNorm)

    def init_of(key, tensor):
        if key in norms:
            return normal(0.1, mean=1.0)
        return normal(0.02) if key.endswith(".bias") else normal(0.05)
    return init_of


def make_mar_vae(upstream: Path) -> dict:
    with upstream_modules(upstream / "mar"), torch.no_grad():
        from models import vae as vae_module
        torch.manual_seed(0)
        model = vae_module.AutoencoderKL(embed_dim=4, ch_mult=(1, 2), use_variational=True)
        model.encoder = vae_module.Encoder(**MAR_VAE_CONFIG["encoder_kwargs"])
        model.decoder = vae_module.Decoder(**MAR_VAE_CONFIG["decoder_kwargs"])
        model.eval()
        recipe = set_weights(model, mar_vae_init(model))
        image = uniform_pixels(torch.Generator().manual_seed(INPUT_SEED), 2, 3, 16, 16)
        posterior = model.encode(image)
        outputs = {"moments": posterior.parameters, "posterior_mean": posterior.mean,
                   "posterior_logvar": posterior.logvar, "posterior_std": posterior.std,
                   "decoded": model.decode(posterior.mean)}
    notes = notes_for(f"LTH14/mar at {UPSTREAM_PINS['mar'][1][:7]}", "mar_vae.pt",
                      [f"max |value|: {magnitudes(outputs)}"])
    return {"config": MAR_VAE_CONFIG, "weights": recipe, "inputs": {"image": image}, "outputs": outputs,
            "notes": notes}


# --- LlamaGen --------------------------------------------------------------------------------------------------

GPT_COMMON = dict(dim=64, n_layer=2, n_head=4, n_kv_head=None, multiple_of=256, ffn_dim_multiplier=None,
                  rope_base=10000, norm_eps=1e-05, initializer_range=0.02, token_dropout_p=0.0, attn_dropout_p=0.0,
                  resid_dropout_p=0.0, ffn_dropout_p=0.0, drop_path_rate=0.0, class_dropout_prob=0.1,
                  vocab_size=64, block_size=16, max_batch_size=32, max_seq_len=2048)
LLAMAGEN_C2I_CONFIG = {**GPT_COMMON, "num_classes": 10, "caption_dim": 2048, "model_type": "c2i", "cls_token_num": 1}
LLAMAGEN_T2I_CONFIG = {**GPT_COMMON, "num_classes": 1000, "caption_dim": 32, "model_type": "t2i",
                       "cls_token_num": 120}


def gpt_init(model, rms_norm_type, embedding_std: float):
    """LlamaGen / DnD GPT weights: embeddings N(0, embedding_std), RMSNorm 1 + 0.1 N(0,1), the rest N(0, 0.02)."""
    norms = keys_of(model, rms_norm_type)
    embeddings = {"tok_embeddings.weight", "cls_embedding.embedding_table.weight"}

    def init_of(key, tensor):
        if key in norms:
            return normal(0.1, mean=1.0)
        if key in embeddings:
            return normal(embedding_std)
        if key == "cls_embedding.uncond_embedding":  # the official init's distribution, randn / sqrt(caption_dim)
            return normal(1 / math.sqrt(tensor.shape[-1]))
        return normal(0.02)
    return init_of


def llamagen_generate(generate_module, model, cond, cfg_scale: float, **kwargs):
    with recording(generate_module, "sample", last_logits) as seen:
        tokens = generate_module.generate(model, cond, max_new_tokens=16, cfg_scale=cfg_scale, cfg_interval=-1,
                                          temperature=1.0, top_k=0, top_p=1.0, sample_logits=False, **kwargs)
    return tokens, torch.stack(seen, dim=1)


def llamagen_training_call(model, **kwargs):
    """The official training call, made in train() mode with the random condition dropout switched off."""
    embedder = model.cls_embedding
    name = "dropout_prob" if hasattr(embedder, "dropout_prob") else "uncond_prob"
    model.train()
    with patched(embedder, name, 0.0):
        logits, loss = model(**kwargs)
    model.eval()
    return logits, loss


def llamagen_generations(generate_module, model, cond, cfg_scale: float, **kwargs):
    outputs, gaps = {}, {}
    for tag, scale in (("cfg", cfg_scale), ("nocfg", 1.0)):
        tokens, step_logits = llamagen_generate(generate_module, model, cond, scale, **kwargs)
        assert torch.equal(step_logits.argmax(-1), tokens.long()), "greedy tokens are the argmax of the step logits"
        outputs[f"greedy_{tag}"], outputs[f"step_logits_{tag}"] = tokens, step_logits
        gaps[tag] = smallest_gap(step_logits)
    return outputs, gaps


def t2i_inputs(generator):
    caption = gaussian(generator, 2, 120, 32)
    emb_mask = torch.ones(2, 120, dtype=torch.int64)
    emb_mask[0, :115] = 0  # row 0: 115 left-padding positions, then 5 caption tokens
    caption = caption * emb_mask[:, :, None]
    return {"caption": caption, "emb_mask": emb_mask, "z": torch.randint(0, 64, (2, 16), generator=generator),
            "valid": torch.ones(2, dtype=torch.int64), "train_attn_mask": t2i_training_mask(emb_mask, 16)}


def t2i_training_mask(emb_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """The mask LlamaGen's t2i data pipeline builds per sample (dataset/t2i.py), cut as its training loop cuts it."""
    caption_len = emb_mask.shape[1]
    length = caption_len + image_tokens
    masks = []
    for row in emb_mask:
        mask = torch.tril(torch.ones(length, length))
        mask[:, :caption_len] = mask[:, :caption_len] * row.float().unsqueeze(0)
        eye = torch.eye(length, length)
        masks.append((mask * (1 - eye) + eye).to(torch.bool))
    return torch.stack(masks).unsqueeze(1)[:, :, :-1, :-1]


def make_llamagen_gpt(upstream: Path, config: dict, conditional: bool) -> dict:
    with upstream_modules(upstream / "LlamaGen"), torch.no_grad():
        from autoregressive.models import generate as generate_module
        from autoregressive.models import gpt
        torch.manual_seed(0)
        model = gpt.Transformer(gpt.ModelArgs(**config)).eval()
        recipe = set_weights(model, gpt_init(model, gpt.RMSNorm, embedding_std=0.2))
        generator = torch.Generator().manual_seed(INPUT_SEED)
        if conditional:  # class-conditional
            inputs = {"cond_idx": torch.tensor([1, 5, 9]), "z": torch.randint(0, 64, (3, 16), generator=generator)}
            logits, loss = llamagen_training_call(model, idx=inputs["z"][:, :-1], cond_idx=inputs["cond_idx"],
                                                  targets=inputs["z"])
            generations, gaps = llamagen_generations(generate_module, model, inputs["cond_idx"], 2.0)
        else:
            inputs = t2i_inputs(generator)
            logits, loss = llamagen_training_call(model, cond_idx=inputs["caption"], idx=inputs["z"][:, :-1],
                                                  targets=inputs["z"], mask=inputs["train_attn_mask"],
                                                  valid=inputs["valid"])
            generations, gaps = llamagen_generations(generate_module, model, inputs["caption"], 3.0,
                                                     emb_masks=inputs["emb_mask"])
        freqs_cis = gpt.precompute_freqs_cis_2d(4, config["dim"] // config["n_head"], config["rope_base"],
                                                config["cls_token_num"])
    outputs = {"logits": logits, "loss": loss, "freqs_cis": freqs_cis, **generations}
    name = "llamagen_c2i.pt" if conditional else "llamagen_t2i.pt"
    notes = notes_for(f"FoundationVision/LlamaGen at {UPSTREAM_PINS['LlamaGen'][1][:7]}", name,
                      [f"smallest top-1 minus top-2 step-logit gap: with guidance {gaps['cfg']:.3g}, "
                       f"without {gaps['nocfg']:.3g}", f"max |value|: {magnitudes(outputs)}"])
    return {"config": config, "weights": recipe, "inputs": inputs, "outputs": outputs, "notes": notes}


LLAMAGEN_VQ_CONFIG = dict(codebook_size=64, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
                          commit_loss_beta=0.25, entropy_loss_ratio=0.0, encoder_ch_mult=[1, 2],
                          decoder_ch_mult=[1, 2], z_channels=32, dropout_p=0.0)


def vq_init(model):
    norms = keys_of(model, nn.GroupNorm)
    norm_biases = {key[:-len("weight")] + "bias" for key in norms}

    def init_of(key, tensor):
        if key == "quantize.codebook_used":
            return constant(0.0)
        if key == "quantize.embedding.weight":
            return normal(1.0)
        if key in norms:
            return normal(0.1, mean=1.0)
        return normal(0.1) if key in norm_biases else normal(0.02)
    return init_of


def vq_code_gap(model, image) -> float:
    """Smallest gap between the best and second-best code distance (normalised latents and codebook)."""
    latents = model.quant_conv(model.encoder(image)).permute(0, 2, 3, 1).reshape(-1, model.config.codebook_embed_dim)
    codebook = torch.nn.functional.normalize(model.quantize.embedding.weight, dim=-1)
    latents = torch.nn.functional.normalize(latents, dim=-1)
    return smallest_distance_gap(torch.cdist(latents.double(), codebook.double()) ** 2)


def make_llamagen_vq(upstream: Path) -> dict:
    with upstream_modules(upstream / "LlamaGen"), torch.no_grad():
        from tokenizer.tokenizer_image import vq_model
        torch.manual_seed(0)
        config = LLAMAGEN_VQ_CONFIG
        model = vq_model.VQModel(vq_model.ModelArgs(**config))
        model.encoder = vq_model.Encoder(ch=32, ch_mult=config["encoder_ch_mult"], z_channels=config["z_channels"],
                                         dropout=config["dropout_p"])
        model.decoder = vq_model.Decoder(ch=32, ch_mult=config["decoder_ch_mult"], z_channels=config["z_channels"],
                                         dropout=config["dropout_p"])
        model.eval()
        recipe = set_weights(model, vq_init(model))
        image = uniform_pixels(torch.Generator().manual_seed(INPUT_SEED), 2, 3, 16, 16)
        quant, _, (_, _, indices) = model.encode(image)
        outputs = {"quant": quant, "indices": indices, "decoded": model.decode_code(indices, shape=(2, 8, 8, 8)),
                   "recon": model(image)[0]}
        gap = vq_code_gap(model, image)
    notes = notes_for(f"FoundationVision/LlamaGen at {UPSTREAM_PINS['LlamaGen'][1][:7]}", "llamagen_vq.pt",
                      [f"{indices.unique().numel()} distinct codes; smallest best-vs-second code distance gap "
                       f"{gap:.3g}", f"max |value|: {magnitudes(outputs)}"])
    return {"config": {**config, "ch": 32}, "weights": recipe, "inputs": {"image": image}, "outputs": outputs,
            "notes": notes}


# --- DnD-Transformer -------------------------------------------------------------------------------------------

DND_CONFIG = {**GPT_COMMON, "n_layer": 3, "num_classes": 10, "caption_dim": 2048, "model_type": "c2i",
              "cls_token_num": 1, "num_pred_heads": 2, "pred_head_positions": [1, 2], "share_prediction_heads": 0}


def dnd_generate(generate_module, model, cond, cfg_scale: float):
    with recording(generate_module, "sample_func", last_logits) as seen:
        codes = generate_module.generate(model, cond, 16, num_prediction_heads=2, cfg_scale=cfg_scale,
                                         cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0, sample_logits=False)
    return codes.long(), smallest_gap(torch.cat(seen))


def make_dnd(upstream: Path) -> dict:
    with upstream_modules(upstream / "DnD-Transformer" / "src"), torch.no_grad():
        from dnd_transformer import generate_multitoken_v3 as generate_module
        from dnd_transformer import gpt_multitoken_v3 as gpt
        torch.manual_seed(0)
        model = gpt.Transformer(gpt.ModelArgs(**DND_CONFIG)).eval()
        recipe = set_weights(model, gpt_init(model, gpt.RMSNorm, embedding_std=0.2))
        generator = torch.Generator().manual_seed(INPUT_SEED)
        inputs = {"codes": torch.randint(0, 64, (3, 16, 2), generator=generator), "cond_idx": torch.tensor([1, 5, 9])}
        model.train()
        with patched(model.cls_embedding, "dropout_prob", 0.0):
            logits, loss = model(cond_idx=inputs["cond_idx"], idx=inputs["codes"][:, :-1], targets=inputs["codes"])
        model.eval()
        greedy_cfg, gap_cfg = dnd_generate(generate_module, model, inputs["cond_idx"], 2.0)
        greedy_nocfg, gap_nocfg = dnd_generate(generate_module, model, inputs["cond_idx"], 1.0)
    outputs = {"logits": logits, "loss": loss, "greedy_cfg": greedy_cfg, "greedy_nocfg": greedy_nocfg}
    notes = notes_for(f"chenllliang/DnD-Transformer at {UPSTREAM_PINS['DnD-Transformer'][1][:7]}", "dnd.pt",
                      [f"smallest top-1 minus top-2 logit gap over the greedy decisions: with guidance "
                       f"{gap_cfg:.3g}, without {gap_nocfg:.3g}", f"max |value|: {magnitudes(outputs)}"])
    return {"config": DND_CONFIG, "weights": recipe, "inputs": inputs, "outputs": outputs, "notes": notes}


DND_RQVAE_CONFIG = {"embed_dim": 16, "n_embed": 64, "decay": 0.99, "loss_type": "mse", "latent_loss_weight": 0.25,
                    "bottleneck_type": "rq", "latent_shape": [4, 4, 16], "code_shape": [4, 4, 2],
                    "shared_codebook": True, "restart_unused_codes": True,
                    "ddconfig": {"double_z": False, "z_channels": 16, "resolution": 16, "in_channels": 3,
                                 "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1,
                                 "attn_resolutions": [4], "dropout": 0.0},
                    "checkpointing": False}
CODEBOOK = "quantizer.codebooks.0"


def rqvae_init(model):
    norms = keys_of(model, nn.GroupNorm)
    n_embed = DND_RQVAE_CONFIG["n_embed"]

    def init_of(key, tensor):
        if key.startswith("quantizer.codebooks."):
            field = key.rsplit(".", 1)[1]
            if field == "cluster_size_ema":
                return constant(1.0)
            if field == "embed_ema":
                return copy_of(f"{CODEBOOK}.weight", rows=(0, n_embed))
            return normal(1.0) if key == f"{CODEBOOK}.weight" else copy_of(f"{CODEBOOK}.weight")
        if key in norms:
            return normal(0.1, mean=1.0)
        if key.endswith(".bias"):
            return normal(0.02)
        fan_in = math.prod(tensor.shape[1:])
        return normal(1.5 / math.sqrt(fan_in))
    return init_of


def package_without_init(name: str, folder: Path):
    """Register package `name` (folder `folder`) without running its __init__.py."""
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    sys.modules[name] = package


def make_dnd_rqvae(upstream: Path) -> dict:
    src = upstream / "DnD-Transformer" / "src"
    with upstream_modules(src), torch.no_grad():
        # rqvae/models/__init__.py also imports the RQ-Transformer, whose config dataclasses fail on Python >= 3.11
        # (mutable defaults); the RQ-VAE itself does not need it
        import rqvae
        package_without_init("rqvae.models", src / "rqvae" / "models")
        from rqvae.models.rqvae.rqvae import RQVAE
        torch.manual_seed(0)
        model = RQVAE(**DND_RQVAE_CONFIG).eval()
        recipe = set_weights(model, rqvae_init(model))
        image = uniform_pixels(torch.Generator().manual_seed(INPUT_SEED), 2, 3, 16, 16)
        codebook = model.quantizer.codebooks[0]
        with recording(codebook, "compute_distances", lambda args, result: result.clone()) as distances:
            codes = model.get_codes(image)
        recon, commitment_loss, _ = model(image)
        outputs = {"codes": codes, "decoded": model.decode_code(codes), "recon": recon,
                   "commitment_loss": commitment_loss}
    gaps = ", ".join(f"{smallest_distance_gap(d):.3g}" for d in distances)
    notes = notes_for(f"chenllliang/DnD-Transformer at {UPSTREAM_PINS['DnD-Transformer'][1][:7]}", "dnd_rqvae.pt",
                      [f"smallest best-vs-second codeword distance gap per depth: {gaps}",
                       f"max |value|: {magnitudes(outputs)}"])
    return {"config": DND_RQVAE_CONFIG, "weights": recipe, "inputs": {"image": image}, "outputs": outputs,
            "notes": notes}


# --- Hugging Face LLaMA ----------------------------------------------------------------------------------------

HF_LLAMA_CONFIG = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
                   "max_position_embeddings": 64, "tie_word_embeddings": False, "attention_bias": False,
                   "mlp_bias": False}


def hf_llama_init(key, tensor):
    if key.endswith("norm.weight"):
        return normal(0.1, mean=1.0)
    return normal(0.2) if key == "model.embed_tokens.weight" else normal(0.05)


def make_hf_llama(upstream: Path) -> dict:
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_LLAMA_CONFIG,
                                                                   attn_implementation="eager")).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    recipe = set_weights(model, hf_llama_init)
    input_ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(INPUT_SEED))
    with torch.no_grad():
        logits = model(input_ids).logits
        run = model.generate(input_ids[:, :4], max_new_tokens=6, do_sample=False, use_cache=True,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    outputs = {"logits": logits, "greedy": run.sequences}
    assert run.sequences.shape == (2, 10), run.sequences.shape
    notes = notes_for(f"transformers {transformers.__version__} (LlamaForCausalLM, eager attention)",
                      "hf_llama.pt", [f"smallest top-1 minus top-2 gap over the greedy steps: "
                                      f"{smallest_gap(torch.stack(run.scores)):.3g}",
                                      f"max |value|: {magnitudes(outputs)}"])
    return {"config": HF_LLAMA_CONFIG, "weights": recipe, "inputs": {"input_ids": input_ids}, "outputs": outputs,
            "notes": notes}


# --- main ------------------------------------------------------------------------------------------------------

MAKERS = {
    "mar.pt": make_mar,
    "mar_vae.pt": make_mar_vae,
    "llamagen_c2i.pt": functools.partial(make_llamagen_gpt, config=LLAMAGEN_C2I_CONFIG, conditional=True),
    "llamagen_t2i.pt": functools.partial(make_llamagen_gpt, config=LLAMAGEN_T2I_CONFIG, conditional=False),
    "llamagen_vq.pt": make_llamagen_vq,
    "dnd.pt": make_dnd,
    "dnd_rqvae.pt": make_dnd_rqvae,
    "hf_llama.pt": make_hf_llama,
}

SOURCE_FOLDER = {"mar.pt": "mar", "mar_vae.pt": "mar", "llamagen_c2i.pt": "LlamaGen", "llamagen_t2i.pt": "LlamaGen",
                 "llamagen_vq.pt": "LlamaGen", "dnd.pt": "DnD-Transformer", "dnd_rqvae.pt": "DnD-Transformer",
                 "hf_llama.pt": None}


def detached(value):
    if isinstance(value, dict):
        return {key: detached(item) for key, item in value.items()}
    return value.detach().contiguous().clone() if torch.is_tensor(value) else value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=Path, default=ROOT.parent / "upstream",
                        help="folder holding the upstream clones (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=sorted(MAKERS), help="regenerate only these files")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the files (default: %(default)s)")
    args = parser.parse_args(argv)
    names = args.only or list(MAKERS)
    check_upstream(args.upstream.resolve(), {SOURCE_FOLDER[name] for name in names} - {None})
    check_packages()
    torch.set_num_threads(2)
    for name in names:
        data = detached(MAKERS[name](args.upstream.resolve()))
        torch.save(data, args.out / name)
        print(f"{name}: {(args.out / name).stat().st_size / 1024:.0f} KiB\n  " + data["notes"].replace("\n", "\n  "))


if __name__ == "__main__":
    main()
