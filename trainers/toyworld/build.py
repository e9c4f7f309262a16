"""Build the toy world: render scenes, pretrain checker, VAE, CLIP and UNet, write and measure.

The output directory is a standard diffusers Stable Diffusion directory (``model_index.json``,
``unet/ vae/ text_encoder/ tokenizer/ scheduler/``) that ``trainers.models.load_base_model``
loads like any real model, plus ``clip/`` (transformers layout, for ``load_clip``),
``checker/`` (safetensors + config) and ``manifest.json`` (sha256 of every file, the recipe,
timings and the measured quality gates).

Deterministic by construction: every data set comes from its own numpy seed, every training
stage seeds torch and draws batches from its own ``torch.Generator``, deterministic algorithms
are on, and the build runs on a fixed number of threads (1 by default: CPU reductions may split
work differently with another count, so hashes are only promised for the same torch build and
thread count). The directory is built in a temporary sibling and renamed into place, so a
crashed build never leaves a half-written world behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from trainers.tensor_files import atomic_write_text, temp_beside
from trainers.tiny import SCHEDULER_CONFIG, char_tokenizer
from trainers.toyworld import checker as chk
from trainers.toyworld import clip as tw_clip
from trainers.toyworld import gates
from trainers.toyworld.manifest import write_manifest
from trainers.toyworld.scenes import HELD_OUT_SHAPE, SceneSet, make_scenes, to_tensor_range, training_shapes
from trainers.toyworld.unet import encode_prompts, train_unet, unet_config
from trainers.toyworld.vae import encode_posteriors, reconstruct, train_vae

T = TypeVar("T")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the built weights. ``*_scenes`` are images per caption."""

    seed: int = 0
    checker_scenes: int = 60
    checker_steps: int = 300
    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels: 4x downsampling, 32 px <-> 8x8 latents
    vae_scenes: int = 60
    vae_steps: int = 2000
    vae_batch: int = 16
    clip_scenes: int = 40
    clip_steps: int = 1500
    unet_channels: tuple[int, ...] = (32, 64)
    unet_scenes: int = 80
    unet_steps: int = 1700
    unet_batch: int = 64
    eval_scenes: int = 2
    gate_seeds: tuple[int, ...] = (0, 1, 2, 3)


FULL = Recipe()
# CI's shortened build: every stage and every file, a few steps each (no gate is expected to pass).
QUICK = Recipe(
    checker_scenes=4, checker_steps=10, vae_scenes=2, vae_steps=4, clip_scenes=2, clip_steps=4,
    unet_scenes=2, unet_steps=4, eval_scenes=1, gate_seeds=(0,),
)  # fmt: skip


def _timed(timings: dict[str, float], name: str, fn: Callable[[], T]) -> T:
    t0 = time.perf_counter()
    out = fn()
    timings[name] = round(time.perf_counter() - t0, 1)
    print(f"[build] {name}: {timings[name]:.1f}s", flush=True)
    return out


def _data(recipe: Recipe) -> dict[str, SceneSet]:
    """Every data set, each from its own seed so changing one size never changes another set."""
    s = recipe.seed * 100
    return {
        "checker": make_scenes(recipe.checker_scenes, s + 1),
        "vae": make_scenes(recipe.vae_scenes, s + 2),
        "clip": make_scenes(recipe.clip_scenes, s + 3),
        "unet": make_scenes(recipe.unet_scenes, s + 4, training_shapes()),  # never the star
        "eval": make_scenes(recipe.eval_scenes, s + 5),  # unseen by every stage: measurements only
    }


def _write_pipeline(out: Path, vae: Any, text_encoder: Any, unet: Any) -> None:
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=char_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),  # SD 1.x's schedule; sampled with DDIM
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def _train_all(recipe: Recipe, out: Path, timings: dict[str, float]) -> dict[str, Any]:
    """Run every stage, writing components into ``out``; return the in-build measurements."""
    data = _timed(timings, "render", lambda: _data(recipe))
    seed = recipe.seed * 100
    checker = _timed(timings, "checker", lambda: chk.train_checker(data["checker"], recipe.checker_steps, seed + 11))
    measured: dict[str, Any] = {"checker_accuracy_on_renders": chk.accuracy(checker, data["eval"])}
    chk.save_checker(checker, out / "checker", dataclasses.asdict(recipe))

    vae: Any = _timed(timings, "vae", lambda: train_vae(
        data["vae"], recipe.vae_channels, recipe.vae_steps, seed + 12, batch=recipe.vae_batch))  # fmt: skip
    eval_x = torch.from_numpy(to_tensor_range(data["eval"].images))
    recon = reconstruct(vae, eval_x)
    truth = torch.from_numpy(data["eval"].shape), torch.from_numpy(data["eval"].colour), torch.from_numpy(data["eval"].background)
    pred = torch.from_numpy(chk.predict(checker, recon))
    hit = torch.stack([pred[:, i] == truth[i] for i in range(3)], dim=1)
    measured["vae"] = {
        "reconstruction_mse": float(((recon - eval_x) ** 2).mean()),
        "checker_all_correct_on_reconstructions": float(hit.all(dim=1).float().mean()),
        "scaling_factor": float(vae.config.scaling_factor),
    }

    clip = _timed(timings, "clip", lambda: tw_clip.train_clip(data["clip"], recipe.clip_steps, seed + 13))
    tw_clip.save_clip(clip, out / "clip")
    text_encoder = tw_clip.text_encoder_from(clip)

    def unet_stage() -> Any:
        x = torch.from_numpy(to_tensor_range(data["unet"].images))
        mean, std = encode_posteriors(vae, x)
        sf = float(vae.config.scaling_factor)
        captions = sorted(set(data["unet"].captions))
        caption_ids = torch.tensor([captions.index(c) for c in data["unet"].captions])
        embeds = encode_prompts(text_encoder, char_tokenizer(), captions + [""])  # last row: CFG's empty prompt
        latent_size = x.shape[-1] // 2 ** (len(recipe.vae_channels) - 1)
        config = unet_config(tw_clip.TEXT_HIDDEN, latent_size, recipe.unet_channels)
        return train_unet(mean * sf, std * sf, caption_ids, embeds, len(captions), config,
                          recipe.unet_steps, seed + 14, batch=recipe.unet_batch)  # fmt: skip

    unet = _timed(timings, "unet", unet_stage)
    _write_pipeline(out, vae, text_encoder, unet)
    return measured


def measure_gates(root: Path, seeds: tuple[int, ...], eval_scenes: SceneSet) -> dict[str, Any]:
    """Load ``root`` through the project's loaders and measure every quality gate."""
    from trainers.models import load_base_model
    from trainers.scoring_models import load_clip

    model = load_base_model(str(root))
    checker = chk.load_checker(root / "checker")
    clip_model, tokenizer, processor = load_clip(str(root / "clip"))
    trained = gates.prompt_accuracy(model, checker, gates.trained_prompts(), seeds)
    held_out = gates.prompt_accuracy(model, checker, gates.held_out_prompts(), seeds)
    aucs = gates.clip_auc(clip_model, tokenizer, processor, eval_scenes)
    return {
        "sampler": f"ddim, {gates.GATE_STEPS} steps, guidance {gates.GATE_GUIDANCE}, 32 px",
        "seeds": list(seeds),
        "prompt_accuracy_trained_shapes": trained.as_dict(),
        f"prompt_accuracy_held_out_{HELD_OUT_SHAPE}": held_out.as_dict(),
        "clip_auc_true_vs_swapped": aucs,
        "passed": {
            "prompt_accuracy >= 0.90": trained.all_correct >= gates.PROMPT_ACCURACY_GATE,
            "clip_auc >= 0.95 (every attribute)": min(aucs.values()) >= gates.CLIP_AUC_GATE,
        },
    }


def build(out: Path, recipe: Recipe = FULL, threads: int = 1, overwrite: bool = False) -> dict[str, Any]:
    """Build the toy world into ``out``; return its manifest. ``out`` must not exist unless
    ``overwrite`` (it is then replaced only once the new build has succeeded)."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it (the old copy stays until the build succeeds)")
    # Global torch state, restored afterwards: a caller (a test process) keeps its own settings.
    old_threads, old_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(out, directory=True)  # 0o777 & ~umask, not mkdtemp's 0700
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        measured = _train_all(recipe, tmp, timings)
        timings["pretraining_total"] = round(time.perf_counter() - t0, 1)
        eval_scenes = make_scenes(recipe.eval_scenes, recipe.seed * 100 + 5)
        measured["gates"] = _timed(timings, "gates", lambda: measure_gates(tmp, recipe.gate_seeds, eval_scenes))
        # Only deterministic facts go into a hashed file; timings and the machine live in the
        # manifest (which is not hashed), so two identical builds hash identically.
        info = {
            "name": "toyworld",
            "producer": "sdsweep trainers.toyworld.build",
            "recipe": dataclasses.asdict(recipe),
            "threads": threads,
            "torch": torch.__version__,
            "held_out_shape": HELD_OUT_SHAPE,
        }
        atomic_write_text(tmp / "sdsweep_builtin.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
        machine = f"{platform.system()} {platform.machine()} {platform.processor()}".strip()
        manifest = write_manifest(tmp, {**info, "machine": machine, "timings_s": timings, "measured": measured})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_deterministic)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest
