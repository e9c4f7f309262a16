"""The baseline: the base model, without any adapter, scored by the sweep's evaluator, once per
sampling placement the sweep's trials use.

A trial's gain over the base model must never be a precision shift. Trials of different methods
sample in different precisions on a GPU: a LoRA trial keeps the frozen UNet and text encoder in
the weight dtype (bf16), a DreamBooth trial samples its fp32 UNet (and fp32 text encoder when it
trains it), a textual-inversion trial its fp32 text encoder (``Trainer.base_dtypes``), and a
searched ``train.mixed_precision`` changes the weight dtype itself. So the cache task scores the
base model once for every placement (device type, UNet / text-encoder / VAE dtypes, autocast:
``trainers.devices.placement_key``) a trial of the sweep can sample with, enumerated from the
search space over the keys that decide it (``train.mixed_precision`` and each method's
``Trainer.dtype_keys``). Every evaluation records the placement it actually sampled with
(``trainers.devices.sampled_placement``) and the leaderboard compares it with the baseline of that
key. On a CPU every module is fp32 and there is one baseline.

``sweep.json`` keeps the base method's own placement under ``baseline`` (what the report shows
as the base model) and every placement under ``baselines``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path
from typing import Any

from sweeps.config import SweepConfig, trial_run_config

BASELINE_DIR = "baseline"


def trial_placements(cfg: SweepConfig) -> dict[str, tuple[Any, tuple[Any, Any]]]:
    """Every placement a trial of ``cfg`` samples with: ``{placement key: (Placement, (UNet dtype,
    text-encoder dtype))}``, the base method's own (with the base settings) first."""
    from trainers import get_trainer_class
    from trainers.devices import placement_key, run_placement

    space = cfg.search_space()
    out: dict[str, tuple[Any, tuple[Any, Any]]] = {}
    methods = [cfg.base.method, *(m for m in space.methods if m != cfg.base.method)]
    for method in methods:
        cls = get_trainer_class(method)
        searched = space.candidates(method)
        keys = [k for k in ("train.mixed_precision", *cls.dtype_keys) if k in searched]
        combos = [dict(zip(keys, values)) for values in itertools.product(*(searched[k] for k in keys))]
        if method == cfg.base.method:
            combos.insert(0, {})  # the base settings first: the report's "base model"
        for combo in combos:
            params = {"method": method, **combo}
            run = trial_run_config(cfg, params, source=f"{method} baseline placement")
            where = run_placement(run.train.device, run.train.mixed_precision)
            dtypes = cls.base_dtypes(run.settings, where.weight_dtype)
            key = placement_key(where.device, dtypes[0], dtypes[1], where.weight_dtype, where.autocast_dtype)
            out.setdefault(key, (where, dtypes))
    return out


def placed_model(model: Any, where: Any, dtypes: tuple[Any, Any]) -> Any:
    """``model`` as a trial with placement ``where`` and (UNet, text-encoder) ``dtypes`` samples it:
    each module on the trial's device in its dtype. A module already in that dtype is moved in
    place; one that must be cast down is a cast copy, so the loaded fp32 weights stay exact for
    the next placement (casting down and back up would round them)."""
    from trainers.devices import place

    swap = {}
    for name, dtype in (("unet", dtypes[0]), ("text_encoder", dtypes[1]), ("vae", where.weight_dtype)):
        module = getattr(model, name)
        if next(module.parameters()).dtype != dtype:
            module = copy.deepcopy(module)
        place(module, where.device, dtype)
        swap[name] = module
    return dataclasses.replace(model, **swap)


def score_baselines(cfg: SweepConfig, model: Any) -> dict[str, Any]:
    """Generate and score the base model exactly as trials' evaluations do, once per placement
    (:func:`trial_placements`), scoring on the trials' device; only the adapter is missing.
    Returns ``{"primary": key, "by_key": {key: scores, rows, identity, files, placement}}``."""
    from sweeps.trial import score_to_files, worker_evaluator

    by_key: dict[str, Any] = {}
    for where, dtypes in trial_placements(cfg).values():
        evaluator = worker_evaluator(cfg, where.device)
        assert evaluator is not None
        out = score_to_files(evaluator, placed_model(model, where, dtypes), where, {"trial_id": "baseline", "step": 0},
                             as_base=True)
        del out["rows"]
        key = out["placement_key"]  # as sampled (the same string trial_placements predicted)
        out["placement"] = {"device": str(where.device), "weight_dtype": _name(where.weight_dtype),
                            "autocast": _name(where.autocast_dtype) if where.autocast_dtype else None,
                            "unet": _name(dtypes[0]), "text_encoder": _name(dtypes[1]), "key": out["placement_key"]}
        by_key[key] = out
    return {"primary": next(iter(by_key)), "by_key": by_key}


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def save_baselines(run_dir: Path, baselines: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write each baseline's images and scores.json (the primary under ``run_dir/baseline``, the
    others under ``baseline-2`` ...); return (the primary's entry, {key: entry}) for sweep.json."""
    entries = {}
    for i, (key, b) in enumerate(baselines["by_key"].items(), 1):
        name = BASELINE_DIR if key == baselines["primary"] else f"{BASELINE_DIR}-{i}"
        out = run_dir / name
        out.mkdir(parents=True, exist_ok=True)
        for file, data in b["files"].items():
            (out / file).write_bytes(data)
        entries[key] = {"scores": b["scores"], "identity": b["identity"], "dir": name, "eval_s": b["eval_s"],
                        "placement": b["placement"]}
        if b.get("base_embeddings"):
            save_base_embeddings(out / BASE_EMBEDDINGS, b["base_embeddings"])
            entries[key]["base_embeddings"] = BASE_EMBEDDINGS
    return entries[baselines["primary"]], entries


BASE_EMBEDDINGS = "base_embeddings.safetensors"  # beside a baseline's images: what drift compares with


def save_base_embeddings(path: Path, emb: dict[str, dict[tuple[str, int], Any]]) -> None:
    """The base model's drift embeddings (``EvalRecord.base_embeddings``) as one safetensors file,
    each tensor under the key ``[metric, prompt, seed]`` (JSON)."""
    import json

    from trainers.tensor_files import atomic_save_safetensors

    atomic_save_safetensors({json.dumps([metric, prompt, seed]): t for metric, table in emb.items()
                             for (prompt, seed), t in table.items()}, path, {"what": "sdsweep base-model drift embeddings"})


def load_base_embeddings(run_dir: Path, state: dict[str, Any]) -> dict[str, dict[str, dict[tuple[str, int], Any]]]:
    """Every baseline's drift embeddings, by placement key, for ``Evaluator.set_base``; empty
    when the sweep scores no drift."""
    import json

    from safetensors.torch import load_file

    out: dict[str, dict[str, dict[tuple[str, int], Any]]] = {}
    for key, entry in (state.get("baselines") or {}).items():
        if entry.get("base_embeddings"):
            table = out.setdefault(key, {})
            for name, t in load_file(str(Path(run_dir) / entry["dir"] / entry["base_embeddings"])).items():
                metric, prompt, seed = json.loads(name)
                table.setdefault(metric, {})[(prompt, int(seed))] = t
    return out
