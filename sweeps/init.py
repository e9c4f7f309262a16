"""``sdsweep init``: from a folder of your images to a sweep file you can run.

    sdsweep init --data photos/ [--model SRC] [--method lora|textual_inversion|dreambooth|all]
                 [--token WORD] [--class-prompt TEXT] [--out FILE]

Checks the folder with the same preflight a sweep runs (every unreadable image, missing caption
or bad caption file is named), reads the base model's architecture (its training resolution and
a memory estimate; no weights are loaded), and writes a commented sweep file: the data (captions
from the folder, or an instance prompt built around the token when it has none), evaluation
prompts built around the token, the method's search space (several methods: one space each),
per-trial resources from what a local Ray would see on this machine, a scheduler and a held-out
confirmation. The file is checked before it is written, as ``sdsweep run`` will read and check it
(``sweep_from_mapping``, ``sweeps.preflight``): a problem names the key and nothing is written. Then it prints what the sweep will cost (trials x steps, images generated for
evaluation, GPU memory per trial) and the command that runs it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from sweeps.errors import SweepError

EVALUATIONS_PER_TRIAL = 4
PROMPTS = ("a photo of {token}", "{token} on a beach", "a watercolor painting of {token}",
           "{token} in front of a city skyline at night")
# Prompts without the token, for drift (what the model drew before it should still draw so); the
# class prompt, when given, comes first: that is what prior preservation protects.
DRIFT_PROMPTS = ("a photo of a city street at night",)
# The composite chosen out of sample on the toy world (docs/BENCHMARKS.md §12.1: mean Spearman
# +0.43 with held-out truth over 6 unseen sweeps, against +0.28 for 0.2 CLIP-T + 0.8 CLIP-I); real
# sweeps weight DINO-space drift as the toy world weights CLIP-space drift (docs/EVALUATION.md).
WEIGHTS = "{clip_t: 0.55, clip_i: 0.05, %s: 0.40}"


def add_command(sub: Any) -> None:
    """The ``sdsweep init`` subcommand (registered by sweeps/cli.py)."""
    init = sub.add_parser("init", help="write a sweep file for a folder of your images")
    init.add_argument("--data", required=True, help="folder of training images (captions: .txt beside each, "
                      "or metadata.jsonl; without them an instance prompt is used)")
    init.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                      help="base model: a diffusers directory, a .safetensors file, a Hub id, or builtin:tiny-sd")
    from trainers import TRAINERS  # the registry only: no trainer module is imported for --help

    init.add_argument("--method", choices=[*TRAINERS, "all"], default="lora")
    init.add_argument("--token", default=None, help="the word that names your concept in captions and prompts "
                      "(default: sks, or <sks> when textual inversion is searched: it must be new to the tokenizer)")
    init.add_argument("--class-prompt", default=None, metavar="TEXT",
                      help="what the concept is, e.g. 'a photo of a dog': DreamBooth's prior preservation draws "
                      "class images from it; textual inversion starts from its last word")
    init.add_argument("--instance-prompt", default=None, metavar="TEXT",
                      help="caption for every image when the folder has no captions (default: 'a photo of TOKEN')")
    init.add_argument("--trials", type=int, default=None, help="trials in the sweep (default: 8 per method)")
    init.add_argument("--steps", type=int, default=None, help="training steps per trial (default: per method)")
    init.add_argument("--out", default=None, help="the sweep file to write (default: sweep-<folder>.yaml)")
    init.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    init.set_defaults(func=_cmd_init)


def _cmd_init(args: Any) -> int:
    out = Path(args.out or f"sweep-{_slug(Path(args.data).resolve().name)}.yaml")
    if out.exists() and not args.force:
        raise SweepError(f"{out} exists; choose another --out or pass --force to overwrite it")
    text, facts = write_sweep_text(args)
    from sweeps.config import sweep_from_mapping
    from sweeps.preflight import preflight_sweep
    from trainers.config import yaml_load
    from trainers.tensor_files import atomic_write_text

    # Checked as `sdsweep run` will read and check it before the file exists: a problem names the
    # key, and nothing is written.
    cfg = sweep_from_mapping(yaml_load(text), str(out))
    preflight_sweep(cfg, source=str(out))
    atomic_write_text(out, text)
    print(f"wrote {out}: {', '.join(facts['methods'])} on {facts['images']} images from {facts['data']} "
          f"({facts['caption_note']}), {facts['resolution']} px for {args.model}")
    for line in cost_lines(cfg):
        print(line)
    print(f"\nrun it:\n  sdsweep run {out}")
    return 0


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "sweep"


def _machine_resources() -> tuple[int, int]:
    """(CPUs, GPUs) a local Ray would see on this machine (its defaults: os.cpu_count, CUDA devices)."""
    import torch

    return os.cpu_count() or 1, torch.cuda.device_count() if torch.cuda.is_available() else 0


def write_sweep_text(args: Any) -> tuple[str, dict[str, Any]]:
    """The commented sweep file for ``args`` (see :func:`add_command`), and the facts it is built on."""
    from trainers import TRAINERS, get_trainer_class
    from trainers.config import ModelSpec
    from trainers.data import DataConfig, preflight
    from trainers.model_configs import native_resolution

    methods = list(TRAINERS) if args.method == "all" else [args.method]
    trainers = [get_trainer_class(m) for m in methods]
    # CLIP's vocabulary has "sks": a method that adds its token to the tokenizer needs a new one
    token = args.token or ("<sks>" if any(t.needs_new_token for t in trainers) else "sks")
    data_path = str(Path(args.data).resolve())
    resolution = native_resolution(ModelSpec(source=args.model))  # what data.resolution defaults to
    records = preflight(DataConfig(path=data_path, resolution=resolution), require_captions=False)
    captioned = sum(1 for r in records if r.caption)
    if captioned and captioned < len(records):
        missing = [r.id for r in records if not r.caption][:5]
        raise SweepError(f"{data_path}: {captioned} of {len(records)} images have captions, these do not: {missing}; "
                         "caption all of them, or none (then --instance-prompt captions every image)")
    instance = None
    if not captioned:
        instance = args.instance_prompt or f"a photo of {token}"
        caption_note = f"no captions: every image is '{instance}'"
    else:
        without = sum(1 for r in records if token not in r.caption)
        caption_note = f"captions from the folder{f'; {without} do not name {token!r}' if without else ''}"
    if instance is not None and token not in instance:
        raise SweepError(f"--instance-prompt {instance!r} does not contain the token {token!r}: the model learns "
                         "the concept under that word; put it in the prompt")
    cpus, gpus = _machine_resources()
    steps = args.steps or max(t.init_steps for t in trainers)
    trials = args.trials or 8 * len(methods)
    every = max(1, steps // EVALUATIONS_PER_TRIAL)
    builtin = args.model.startswith("builtin:")
    sections = [t.init_lines(token, args.class_prompt) for t in trainers]

    lines = [
        f"# Written by `sdsweep init` for {data_path} ({len(records)} images).",
        "# Run it with `sdsweep run THIS_FILE`; every key is documented in docs/SWEEPS.md.",
        f"name: {_slug(Path(data_path).name)}-{'mixed' if len(methods) > 1 else methods[0]}",
        "base:                            # shared by every trial",
        f"  model: {_yaml(args.model)}",
        "  data:",
        f"    path: {_yaml(data_path)}",
        f"    resolution: {resolution}                 # the model's own training resolution",
        "    random_flip: true              # drop it for asymmetric subjects (text, logos)",
    ]
    if instance is not None:
        lines += ["    caption_source: instance       # the folder has no captions",
                  f"    instance_prompt: {_yaml(instance)}"]
    lines += [f"  method: {methods[0]}", "  train:",
              f"    max_train_steps: {steps}",
              "    train_batch_size: 1",
              "    lr_warmup_steps: 0",
              "    gradient_checkpointing: false  # true: less GPU memory, ~25% slower steps",
              "    mixed_precision: auto          # bf16 on GPUs that have it, else fp16; fp32 on a CPU"]
    lines += [line for section, _ in sections for line in section]
    lines += ["search:", "  spaces:"]
    lines += [line for _, space in sections for line in space]
    lines += [f"  num_samples: {trials}",
              f"  max_concurrent_trials: {max(1, gpus) if gpus else min(2, cpus)}"
              f"   # {gpus} GPU(s), {cpus} CPUs on this machine",
              "  warm_start: true               # each method's known-good defaults first",
              "scheduler: {type: asha}          # stops weak trials at each evaluation",
              "evaluation:",
              f"  every: {every}                     # evaluate + checkpoint every {every} steps",
              "  images:",
              "    generation:",
              "      prompts:                   # {token} is the concept's word",
              *[f"        - {_yaml(p)}" for p in PROMPTS],
              "        # without the token: drift compares these with the base model's own images",
              *[f"        - {_yaml(p)}" for p in ([args.class_prompt] if args.class_prompt else []) + list(DRIFT_PROMPTS)],
              f"      token: {_yaml(token)}",
              "      seeds: [0, 1]",
              "      steps: 25"]
    if builtin:
        lines += ["    metrics: [clip_t, clip_i, drift]   # prompt fidelity, likeness to your images, what else changed",
                  "    clip: builtin:tiny-clip      # a test model; real sweeps use the default CLIP ViT-L/14",
                  f"    weights: {WEIGHTS % 'drift'}"]
    else:
        lines += ["    # prompt fidelity (CLIP ViT-L/14), likeness to your images (CLIP, DINOv2) and what else",
                  "    # changed (drift in DINOv2's space; docs/EVALUATION.md, 'Scoring models for real sweeps')",
                  "    metrics: [clip_t, clip_i, dino, drift_dino]",
                  "    vision_model: facebook/dinov2-base",
                  f"    weights: {WEIGHTS % 'drift_dino'}   # dino is reported beside them"]
    lines += ["  confirm:                       # the top 3 again on seeds never used (the best there is exported),",
              "                                 # then with the base model on more seeds, for the margins",
              "    top_k: 3",
              f"resources: {{cpu: {1 if gpus else max(1, cpus // 2)}, gpu: {1 if gpus else 0}}}"
              "   # per trial; a fraction of a GPU packs trials (`sdsweep plan`)",
              "checkpoints_to_keep: 2",
              "storage_path: runs",
              "tracking: {wandb: true, mode: auto}   # offline without a W&B login"]
    facts = {"methods": methods, "images": len(records), "data": data_path, "caption_note": caption_note,
             "resolution": resolution}
    return "\n".join(lines) + "\n", facts


def _yaml(value: str) -> str:
    """A YAML scalar for ``value``: plain when that reads back as the same string, else quoted."""
    import json

    from trainers.config import yaml_load

    try:
        if isinstance(yaml_load(value), str) and yaml_load(value) == value and not value.startswith(("<", "{")):
            return value
    except Exception:  # noqa: BLE001 - not valid plain YAML: quote it
        pass
    return json.dumps(value)


def extra_data_lines(cfg: Any) -> list[str]:
    """What each method builds once per sweep besides the latent cache, at the largest values its
    space can ask for (what the cache task builds: ``Trainer.extra_data_keys``), e.g. DreamBooth's
    class images."""
    from sweeps.config import extra_data_run_config
    from trainers import get_trainer_class

    return [f"  {line}" for method in cfg.search_space().methods
            for line in get_trainer_class(method).extra_data_summary(extra_data_run_config(cfg, method))]


def cost_lines(cfg: Any) -> list[str]:
    """What a sweep will cost: steps, images generated for evaluation, GPU memory per trial."""
    from sweeps.plan import plan_sweep

    from sweeps.searched import largest_value

    n, steps, every = cfg.search.num_samples, largest_value(cfg, "train.max_train_steps"), cfg.evaluation.every
    out = [f"cost: {n} trials x up to {steps} steps = {n * steps} steps at most (ASHA stops weak trials early)"]
    images = cfg.evaluation.images
    if images is not None:
        per_eval = len(images.generation.prompts) * len(images.generation.seeds)
        evals = n * (steps // every)
        confirm = cfg.evaluation.confirm
        held = 0
        if confirm is not None:
            prompts = confirm.prompts or images.generation.prompts
            pick, report = confirm.seed_sets()
            held = len(prompts) * (confirm.top_k * len(pick) + (confirm.top_k + 1) * len(report))
        out.append(f"  images generated for evaluation: up to {evals * per_eval} ({evals} evaluations x {per_eval}), "
                   f"+{per_eval} for the baseline, +{held} for the held-out confirmation")
    out += extra_data_lines(cfg)
    plan = plan_sweep(cfg)
    for m in plan.methods:
        out.append(f"  GPU memory per {m.method} trial: ~{m.estimate.total_gib:.1f} GiB ({m.estimate.shape.describe()})")
    if plan.gpu_memory_gib is not None:
        out.append(f"  this machine's GPU: {plan.gpu_memory_gib:.1f} GiB, {plan.fits} such trial(s) fit")
    return out
