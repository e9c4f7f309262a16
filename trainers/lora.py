"""LoRA: low-rank adapters (peft) on the UNet attention projections (and any other UNet module named
in ``lora.target_modules``, e.g. the ResNet convolutions), optionally the text encoder.

Saved as ``pytorch_lora_weights.safetensors`` in the diffusers layout (``unet.*`` and
``text_encoder.*`` keys, the adapter configs under the ``lora_adapter_metadata`` metadata key that
``load_lora_weights`` reads, so alpha != rank loads with the right scale), plus sdsweep's own
metadata: base model, hyperparameters, step.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers.utils import convert_state_dict_to_diffusers, recurse_remove_peft_layers
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from trainers.base import Trainer
from trainers.config import LoraSettings, TrainConfig
from trainers.latents import CachedDataset
from trainers.tensor_files import atomic_save_safetensors

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER = "sdsweep"
EVAL_ADAPTER = "sdsweep-eval"
# kohya-ss / AUTOMATIC1111 / ComfyUI name modules by their diffusers path with "_" for "." under
# these prefixes; the SD 1.x text encoder's path starts at text_model (transformers 5 drops it).
# diffusers' converter renames attention projections' peft keys (lora_A/B -> lora.down/up) but
# leaves other modules (the ResNet convolutions) in peft's naming; both mean the same matrices.
_DIFFUSERS_LORA_KEY = re.compile(
    r"^(unet|text_encoder)\.(.+)\.(?:(?:lora|lora_linear_layer)\.(down|up)|lora_(A|B))\.weight$"
)
_PEFT_KIND = {"A": "down", "B": "up"}
_KOHYA_PREFIX = {"unet": ("lora_unet_", ""), "text_encoder": ("lora_te_", "text_model_")}


def _config_metadata(cfg: LoraConfig, prefix: str) -> dict[str, Any]:
    """The adapter config as diffusers stores it: JSON-able values, keys prefixed by component.

    ``lora_dropout`` is written as 0: dropout is a training setting, and diffusers' loader builds
    the adapter's dropout modules in train mode inside an eval-mode pipeline, so a non-zero value
    would drop activations at every inference a user runs (measured: up to 12 levels of 255 on
    the toy world with dropout 0.1). The trained value stays in the ``sdsweep`` metadata.
    """
    out = {}
    for k, v in cfg.to_dict().items():
        out[f"{prefix}.{k}"] = sorted(v) if isinstance(v, set) else v
    out[f"{prefix}.lora_dropout"] = 0.0
    return out


def kohya_state_dict(diffusers_sd: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """Convert our diffusers-layout LoRA to the kohya layout A1111 and ComfyUI load.

    ``alphas`` maps component ("unet", "text_encoder") to its LoRA alpha. Each module gets an
    ``.alpha`` tensor holding the real alpha (diffusers' own converter writes alpha = rank, which
    silently rescales any LoRA trained with alpha != rank).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in diffusers_sd.items():
        m = _DIFFUSERS_LORA_KEY.match(key)
        if m is None:
            raise ValueError(f"not a diffusers LoRA key: {key!r}")
        component, module, kind, peft_kind = m.groups()
        kind = kind or _PEFT_KIND[peft_kind]
        prefix, inner = _KOHYA_PREFIX[component]
        name = prefix + inner + module.replace(".", "_")
        out[f"{name}.lora_{kind}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alphas[component]))
    return out


class LoraTrainer(Trainer):
    """peft LoRA on the UNet (and optionally the text encoder) of a frozen base model."""

    method = "lora"

    def __init__(self, model: Any, data: CachedDataset, cfg: TrainConfig, lora: LoraSettings,
                 output_dir: str | Path, validation_data: CachedDataset | None = None,
                 extra: dict[str, CachedDataset] | None = None) -> None:
        self.lora = lora
        self._configs: dict[str, LoraConfig] = {}
        super().__init__(model, data, cfg, output_dir, validation_data, extra)

    memory_keys = (*Trainer.memory_keys, "lora.rank", "lora.train_text_encoder", "lora.target_modules",
                   "lora.text_encoder_target_modules")

    @classmethod
    def memory_profile(cls, settings: LoraSettings) -> dict[str, Any]:
        return {"lora_rank": settings.rank, "lora_targets": tuple(settings.target_modules),
                "train_text_encoder": settings.train_text_encoder,
                "lora_text_targets": tuple(settings.text_encoder_target_modules) if settings.train_text_encoder else ()}

    @classmethod
    def memory_savers(cls, settings: LoraSettings) -> list[str]:
        return [*super().memory_savers(settings), "a smaller lora.rank"]

    @classmethod
    def caches_text(cls, settings: LoraSettings) -> bool:
        return not settings.train_text_encoder

    @property
    def trains_text_encoder(self) -> bool:
        return self.lora.train_text_encoder

    def configure_trainable(self) -> list[dict[str, Any]]:
        s = self.lora
        # peft's gaussian init (std 1/r on A, zeros on B) is what diffusers' LoRA scripts use.
        init: Any = "gaussian" if s.init == "gaussian" else True
        torch.manual_seed(self.cfg.seed)  # adapter initialisation is part of the recipe
        unet_cfg = LoraConfig(r=s.rank, lora_alpha=s.lora_alpha, lora_dropout=s.dropout,
                              init_lora_weights=init, target_modules=list(s.target_modules))
        try:
            self.model.unet.add_adapter(unet_cfg, adapter_name=ADAPTER)
        except ValueError as err:
            raise ValueError(f"lora.target_modules {list(s.target_modules)}: {err} Use attention "
                             "projection names such as to_q, to_k, to_v, to_out.0") from None
        self._configs["unet"] = unet_cfg
        groups = [{"params": [p for p in self.model.unet.parameters() if p.requires_grad],
                   "lr": self.cfg.learning_rate}]
        if s.train_text_encoder:
            te_cfg = LoraConfig(r=s.rank, lora_alpha=s.lora_alpha, lora_dropout=s.dropout,
                                init_lora_weights=init, target_modules=list(s.text_encoder_target_modules))
            try:
                self.model.text_encoder.add_adapter(te_cfg, adapter_name=ADAPTER)
            except ValueError as err:
                raise ValueError(f"lora.text_encoder_target_modules {list(s.text_encoder_target_modules)}: {err} "
                                 "Use the CLIP text encoder's q_proj, k_proj, v_proj, out_proj") from None
            self._configs["text_encoder"] = te_cfg
            groups.append({"params": [p for p in self.model.text_encoder.parameters() if p.requires_grad],
                           "lr": s.text_encoder_lr or self.cfg.learning_rate})
        return groups

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter weights with diffusers' key names (``unet.…`` / ``text_encoder.…``)."""
        out: dict[str, torch.Tensor] = {}
        for prefix, module in (("unet", self.model.unet), ("text_encoder", self.model.text_encoder)):
            if prefix in self._configs:
                sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(module, adapter_name=ADAPTER))
                out.update({f"{prefix}.{k}": v.detach().float().cpu() for k, v in sd.items()})
        return out

    def export_weights(self, directory: Path) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` that ``pipeline.load_lora_weights`` loads."""
        adapter_meta: dict[str, Any] = {}
        for prefix, cfg in self._configs.items():
            adapter_meta.update(_config_metadata(cfg, prefix))
        info = {"method": self.method, "base_model": self.model.source,
                "base_model_identity": self.model.identity, "step": self.global_step,
                "prediction_type": self.prediction_type,  # what a sampler must use with these weights
                "dataset_key": self.data.key, "train": self.cfg.model_dump(mode="json"),
                "lora": self.lora.model_dump(mode="json")}
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter_meta, sort_keys=True),
                "sdsweep": json.dumps(info, sort_keys=True)}
        path = Path(directory) / LORA_WEIGHTS
        atomic_save_safetensors(self.lora_state_dict(), path, meta)
        return path

    @classmethod
    @contextlib.contextmanager
    def loaded_for_evaluation(cls, model: Any, checkpoint: Path) -> Iterator[Any]:
        """``checkpoint``'s LoRA on ``model`` through ``pipeline.load_lora_weights`` (what users
        call), unloaded on exit (``unload_lora_weights`` unwraps every peft layer)."""
        pipe = model.pipeline()
        pipe.load_lora_weights(str(checkpoint), weight_name=LORA_WEIGHTS, adapter_name=EVAL_ADAPTER)
        try:
            yield model
        finally:
            pipe.unload_lora_weights()

    @classmethod
    def export_files(cls, checkpoint: Path, dest: Path, name: str, provenance: dict[str, Any]) -> list[str]:
        """The diffusers LoRA file as saved, plus the kohya layout (AUTOMATIC1111 / ComfyUI /
        kohya) as ``<name>-lora.safetensors`` with ``provenance`` under ``sdsweep_best``."""
        src = Path(checkpoint) / LORA_WEIGHTS
        shutil.copy2(src, Path(dest) / LORA_WEIGHTS)
        with safe_open(str(src), framework="pt") as f:
            meta = f.metadata() or {}
        adapter = json.loads(meta.get("lora_adapter_metadata", "{}"))
        alphas = {c: adapter.get(f"{c}.lora_alpha") for c in ("unet", "text_encoder") if f"{c}.lora_alpha" in adapter}
        kohya = kohya_state_dict(load_file(str(src)), alphas)
        single = f"{name}-lora.safetensors"
        atomic_save_safetensors(kohya, Path(dest) / single, {
            "format": "pt", "sdsweep": meta.get("sdsweep", "{}"), "ss_network_module": "networks.lora",
            "sdsweep_best": json.dumps(provenance, sort_keys=True, default=str)})
        return [LORA_WEIGHTS, single]

    def restore_base_model(self) -> None:
        """Unwrap every peft layer and drop the adapter registry, so the UNet and text encoder are
        module for module (and state-dict key for key) the ones that were loaded.

        peft's ``delete_adapter`` alone leaves each wrapped layer in place (its weight then sits at
        ``to_q.base_layer.weight``), so a reused worker's model would drift from a fresh one. Works
        after a setup that failed half-way (the UNet adapter added, then the text encoder's target
        modules missing): whatever peft injected is removed. A base model never carries adapters
        of its own in sdsweep (it is loaded from weights), so everything peft added is ours.
        """
        for module in (self.model.unet, self.model.text_encoder):
            if any(isinstance(m, BaseTunerLayer) for m in module.modules()):
                recurse_remove_peft_layers(module)
            module.__dict__.pop("peft_config", None)
            module.__dict__.pop("_hf_peft_config_loaded", None)  # back to the class default
        self._configs.clear()
