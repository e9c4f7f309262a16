"""A trainer's resume state: exact trainable tensors, AdamW state, LR schedule, grad scaler, step.

Written beside the method's exported weights in every ``checkpoint-N`` (``Trainer.save_checkpoint``)
and read back by ``Trainer.load_checkpoint``; with the step-seeded randomness of the training loop
(trainers/base.py) this is all a bit-exact resume needs. Tensors go to one safetensors file,
everything else to JSON; both are written atomically.

**No tensor twice.** The export written into the same directory just before may hold some of the
resume tensors exactly (DreamBooth without EMA: its ``unet/`` *is* the trained UNet; with EMA it
is the EMA weights). The method names them (``Trainer.tensors_in_export``: resume-state name ->
file and key of its export); they are left out of ``trainer_state.safetensors``, listed under
``from_export`` in the JSON, and read back from the export on resume. Each named file entry is
checked against the tensor's dtype and shape before the state is written (a wrong map is an error
here, not a silent non-exact resume); the values are the export's own bytes of the same tensor
(tests compare resumed runs with straight ones bit for bit). At SD 1.5 this saves 3.44 GB per
DreamBooth checkpoint (docs/METHODS.md, "What a checkpoint holds").

**Optimizer state only where training can continue.** ``optimizer_state=False`` writes everything
but the optimizer's per-parameter state (AdamW's two moments: 2x the trainable weights): a sweep
asks for it in a trial's last checkpoint (``max_train_steps`` reached), from which nothing is ever
trained again. Reading such a checkpoint into a trainer with steps left is an error naming the file.

Why not accelerate's ``Accelerator.save_state``/``load_state`` (accelerate 1.15.0, read in
``accelerator.py`` and ``checkpointing.py``, and run on the tiny UNet with a LoRA):

* it pickles: the optimizer (``optimizer.bin``), the LR scheduler (``scheduler.bin``), the RNG
  states (``random_states_0.pkl``) and the grad scaler (``scaler.pt``) are ``torch.save`` files, and
  objects registered with ``register_for_checkpointing`` are read back with
  ``torch.load(weights_only=False)``. A resume state here is one safetensors file plus JSON, never
  a pickle (docs/DEVELOPING.md);
* it saves each prepared model's whole ``state_dict``: with the LoRA UNet prepared it wrote 272
  tensors for 64 trainable ones (the frozen base weights too: ~3.4 GB per checkpoint at SD 1.5).
  Our trainers prepare only the optimizer, and then it saves no weights at all;
* it writes each file in place into the folder (no temp + rename; ``model.safetensors`` 0600), so
  a crash leaves a half-written checkpoint; ours go through ``atomic_directory`` and the
  ``trainers.tensor_files`` writers;
* it saves RNG states a step-seeded loop does not need, and ``load_state`` carries on silently
  (an info-level log) when they fail to load; its layout is accelerate's own files, not the
  method's export + ``trainer_state.*`` that every method shares here.

Why not diffusers' LoRA writer (``StableDiffusionLoraLoaderMixin.save_lora_weights``, diffusers
0.42.1, ``loaders/lora_base.py: write_lora_layers``) for ``pytorch_lora_weights.safetensors``: it
would keep alpha (given ``unet_lora_adapter_metadata`` it writes the same
``lora_adapter_metadata`` header ``trainers/lora.py`` writes), but it calls
``safetensors.torch.save_file`` on the final path (not atomic; the file comes out 0600), its
header holds only ``format`` and ``lora_adapter_metadata`` (no room for the ``sdsweep`` provenance
header: base model, step, prediction type, settings), and a custom ``save_function`` receives only
``(weights, filename)`` -- the adapter metadata is then dropped (checked), so keeping alpha would
mean rewriting its writer. What remains of it is prefixing keys with ``unet.``/``text_encoder.``,
which ``LoraTrainer.lora_state_dict`` does. It is LoRA-only, too; this module serves every method.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainers.tensor_files import atomic_save_safetensors, atomic_write_text

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


# safetensors' header names of the dtypes a trainer's tensors come in
_HEADER_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                  torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8"}


def _check_in_export(directory: Path, tensors: dict[str, torch.Tensor], from_export: dict[str, tuple[str, str]]) -> None:
    """Each ``from_export`` entry (name -> file relative to ``directory``, key) must hold a tensor of
    that resume tensor's dtype and shape."""
    for file in sorted({f for f, _ in from_export.values()}):
        with safe_open(str(directory / file), framework="pt") as f:
            keys = set(f.keys())
            for name, (_, key) in ((n, w) for n, w in from_export.items() if w[0] == file):
                t, held = tensors[name], f.get_slice(key) if key in keys else None
                if held is None or held.get_dtype() != _HEADER_DTYPES.get(t.dtype) or \
                        tuple(held.get_shape()) != tuple(t.shape):
                    raise RuntimeError(f"{directory / file}: {key!r} is not the resume tensor {name!r} "
                                       f"({t.dtype}, {tuple(t.shape)}); the method's tensors_in_export is wrong")


def write_trainer_state(trainer: Any, directory: Path, *, optimizer_state: bool = True) -> None:
    """Write ``trainer``'s resume state into ``directory``, which already holds its export.
    Without ``optimizer_state`` the optimizer's per-parameter state is left out (a last checkpoint)."""
    opt = trainer.optimizer.state_dict()
    tensors = {f"param.{n}": p.detach() for n, p in trainer.named_trainable.items()}
    slots: dict[str, list[str]] = {}
    if optimizer_state:
        for idx, st in opt["state"].items():
            slots[str(idx)] = sorted(st)
            for name, value in st.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value)
    tensors.update({f"extra.{k}": v.detach() for k, v in trainer.extra_state().items()})
    from_export = {k: tuple(v) for k, v in trainer.tensors_in_export(directory).items() if k in tensors}
    _check_in_export(directory, tensors, from_export)
    for name in from_export:
        del tensors[name]
    meta = {"producer": f"sdsweep.trainers.{trainer.method}", "step": str(trainer.global_step)}
    atomic_save_safetensors(tensors, directory / STATE_TENSORS, meta)
    scaler = trainer.accelerator.scaler.state_dict() if trainer.accelerator.scaler is not None else None
    state = {"step": trainer.global_step, "method": trainer.method, "param_groups": opt["param_groups"],
             "optimizer_state": optimizer_state, "optimizer_slots": slots,
             "from_export": {k: list(v) for k, v in sorted(from_export.items())},
             "lr_scheduler": trainer.lr_scheduler.state_dict(),
             "grad_scaler": scaler, "spent": {"train_seconds": trainer.train_seconds, "images_seen": trainer.images_seen},
             "config": trainer.cfg.model_dump(mode="json"),
             "dataset_key": trainer.data.key, "base_model": trainer.model.identity}
    atomic_write_text(directory / STATE_JSON, json.dumps(state, indent=1, default=str))


def _read_tensors(directory: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The resume tensors: ``trainer_state.safetensors`` plus those the export holds."""
    tensors = load_file(str(directory / STATE_TENSORS))
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, (file, key) in (state.get("from_export") or {}).items():
        by_file.setdefault(file, []).append((name, key))
    for file, entries in by_file.items():
        if not (directory / file).is_file():
            raise FileNotFoundError(f"{directory / file}: missing; the checkpoint's resume state reads its "
                                    "weights from its export")
        with safe_open(str(directory / file), framework="pt") as f:
            for name, key in entries:
                tensors[name] = f.get_tensor(key)
    return tensors


def read_trainer_state(trainer: Any, directory: Path) -> None:
    """Restore the state :func:`write_trainer_state` wrote into a trainer of the same method and
    settings; a missing file, another method or a shape mismatch is an error naming the file."""
    for f in (STATE_JSON, STATE_TENSORS):
        if not (directory / f).is_file():
            raise FileNotFoundError(f"{directory / f}: missing; not a complete sdsweep checkpoint")
    state = json.loads((directory / STATE_JSON).read_text())
    if state["method"] != trainer.method:
        raise ValueError(f"{directory}: checkpoint of method {state['method']!r}, not {trainer.method!r}")
    has_optimizer = state.get("optimizer_state", True)  # checkpoints written before the flag had it
    if not has_optimizer and int(state["step"]) < trainer.cfg.max_train_steps:
        raise ValueError(f"{directory}: the last checkpoint of a finished run (step {state['step']}), written "
                         "without optimizer state; it can be scored and exported but not trained on to "
                         f"max_train_steps {trainer.cfg.max_train_steps}")
    tensors = _read_tensors(directory, state)
    with torch.no_grad():
        for name, p in trainer.named_trainable.items():
            key = f"param.{name}"
            if key not in tensors or tensors[key].shape != p.shape:
                raise ValueError(f"{directory}: {key} is missing or has another shape; "
                                 "the checkpoint was made with different settings")
            p.copy_(tensors[key])
    if has_optimizer:
        opt_state = {int(i): {n: tensors[f"optim.{i}.{n}"].to(trainer.device) if n != "step"
                              else tensors[f"optim.{i}.{n}"] for n in names}
                     for i, names in state["optimizer_slots"].items()}
        trainer.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    trainer.load_extra_state({k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state.get("grad_scaler") and trainer.accelerator.scaler is not None:
        trainer.accelerator.scaler.load_state_dict(state["grad_scaler"])
    trainer.global_step = int(state["step"])
    spent = state.get("spent") or {}  # checkpoints written before trainers counted their spend lack it
    trainer.train_seconds = float(spent.get("train_seconds", 0.0))
    trainer.images_seen = int(spent.get("images_seen", trainer.global_step * trainer.examples_per_step))
