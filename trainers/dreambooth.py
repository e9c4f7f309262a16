"""DreamBooth: fine-tune the whole UNet (optionally the text encoder) on the instance images.

Full fine-tuning on the shared loop, prior preservation on class images (drawn once by the base
model, or the user's folder; ``trainers/class_images.py``), the base model restored for the next
trial on a reused worker, exports in the diffusers layout and as one original-layout single file,
an EMA of the UNet (evaluated and exported when on), 8-bit AdamW refused loudly where it cannot run
(docs/METHODS.md, "DreamBooth"; measurements: docs/BENCHMARKS.md §7).

**Reused workers.** A trial changes every UNet weight of the worker's shared base model, so at
setup the trained modules' state is copied to the CPU (fp32, before anything changes) and
``restore_base_model`` copies it back into the same Parameter objects; after a trial that raised
too (the shared loop calls teardown). Cost per trial: one copy out and one copy back of the
trained modules; SD 1.5's UNet (3.44 GB) on the 2-core dev CPU: restore 0.21 s (memcpy speed),
snapshot 0.6 s (3.1-3.9 s on a worker's first trial: fresh pages), against 7.8-8.3 s for
reloading the UNet from disk (docs/BENCHMARKS.md §7.4); plus 3.4 GB of host RAM per worker.

**Prior preservation.** Each micro-batch draws ``train_batch_size`` instance and as many class
examples (their own seeded order), runs them through the UNet in one forward pass (the reference
script's concatenated batch), and splits the loss back: the instance term (min-SNR weighted when
``snr_gamma`` is set) + ``prior_loss_weight`` x the plain class term.

**Precision.** The trained weights stay fp32 whatever ``mixed_precision`` is (the UNet computes
under autocast); AdamW on bf16 weights would lose updates, and casting the shared base down
would train on rounded weights.

Exports: ``unet/`` (and ``text_encoder/`` when trained) in the diffusers layout, which
``StableDiffusionPipeline.from_pretrained(base, unet=...)`` loads beside the base model's other
components; ``export_files`` adds ``<run>-dreambooth.safetensors``, the whole model in the original
Stable Diffusion layout (AUTOMATIC1111 / ComfyUI / kohya), with sdsweep's provenance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from transformers import CLIPTextModel

from trainers.base import Trainer
from trainers.config import DreamBoothSettings, TrainConfig
from trainers.latents import CachedDataset
from trainers.tensor_files import atomic_write_text

UNET_DIR, TEXT_ENCODER_DIR = "unet", "text_encoder"
_CLASS_SALT = 1_000_000_007  # separates the class images' epoch orders from the instance images'
INFO_FILE = "sdsweep_dreambooth.json"  # provenance beside the diffusers folders


class DreamBoothTrainer(Trainer):
    """Full fine-tuning of a base model's UNet (and optionally its text encoder)."""

    method = "dreambooth"

    def __init__(self, model: Any, data: CachedDataset, cfg: TrainConfig, db: DreamBoothSettings,
                 output_dir: str | Path, validation_data: CachedDataset | None = None,
                 extra: dict[str, CachedDataset] | None = None) -> None:
        self.db = db
        self._pristine: dict[str, dict[str, torch.Tensor]] = {}
        self.ema: EMAModel | None = None
        super().__init__(model, data, cfg, output_dir, validation_data, extra)

    memory_keys = (*Trainer.memory_keys, "dreambooth.prior_loss_weight", "dreambooth.train_text_encoder",
                   "dreambooth.use_ema", "dreambooth.optimizer")
    init_steps = 600

    @classmethod
    def init_lines(cls, token: str, class_prompt: str | None) -> tuple[list[str], list[str]]:
        if class_prompt:  # the shipped space searches the prior's weight and class-image count
            return (["  dreambooth:",
                     "    prior_loss_weight: 1.0         # prior preservation: class images keep the class",
                     f"    class_prompt: {json.dumps(class_prompt)}",
                     "    num_class_images: 100"], super().init_lines(token, class_prompt)[1])
        return (["  dreambooth:", "    prior_loss_weight: 0.0         # no --class-prompt: no prior preservation"],
                ["    - method: dreambooth         # the shipped space without prior preservation",
                 "      params:",
                 "        train.learning_rate: {type: float, low: 1.0e-6, high: 2.0e-5, log: true, default: 5.0e-6}",
                 "        dreambooth.train_text_encoder: {type: categorical, choices: [false, true], default: false}"])

    @classmethod
    def memory_profile(cls, settings: DreamBoothSettings) -> dict[str, Any]:
        return {"train_unet": True, "train_text_encoder": settings.train_text_encoder, "optimizer": settings.optimizer,
                "ema": settings.use_ema, "batch_factor": 2 if settings.prior_preservation else 1}

    @classmethod
    def memory_savers(cls, settings: DreamBoothSettings) -> list[str]:
        return [*super().memory_savers(settings), "dreambooth.optimizer: adamw_8bit"]

    @classmethod
    def caches_text(cls, settings: DreamBoothSettings) -> bool:
        return not settings.train_text_encoder

    @property
    def trains_text_encoder(self) -> bool:
        return self.db.train_text_encoder

    @classmethod
    def base_dtypes(cls, settings: DreamBoothSettings, weight_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
        return torch.float32, torch.float32 if settings.train_text_encoder else weight_dtype

    @property
    def unet_dtype(self) -> torch.dtype:
        return self.base_dtypes(self.db, self.weight_dtype)[0]

    @property
    def text_encoder_dtype(self) -> torch.dtype:
        return self.base_dtypes(self.db, self.weight_dtype)[1]

    @property
    def examples_per_step(self) -> int:
        # With prior preservation each instance example has a class example beside it in the batch.
        return super().examples_per_step * (2 if self.db.prior_preservation else 1)

    # ----- prior preservation ---------------------------------------------------------------------

    extra_data_keys = ("dreambooth.prior_loss_weight", "dreambooth.num_class_images")
    fixed_keys = {f"dreambooth.{k}": "a sweep draws (or reads) its class images once, from the base section's "
                                     "settings, for every trial; set it under base.dreambooth, or run one sweep "
                                     "per value"
                  for k in ("class_prompt", "class_data_path", "class_sampler", "class_steps",
                            "class_guidance_scale", "class_seed")}
    dtype_keys = ("dreambooth.train_text_encoder",)  # the text encoder samples in fp32 when trained

    @classmethod
    def extra_data_summary(cls, cfg: Any) -> list[str]:
        db: DreamBoothSettings = cfg.settings
        if not db.prior_preservation or db.class_data_path is not None:
            return []
        return [f"class images drawn once by the base model (prior preservation): {db.num_class_images}"]

    @classmethod
    def prepare_extra(cls, cfg: Any, model: Any, device: torch.device | str) -> tuple[dict[str, CachedDataset],
                                                                                      dict[str, Any]]:
        """The class images (prior preservation), latent-cached like the instance images: drawn
        once by the base model for ``class_prompt`` (``trainers.class_images``), or the user's
        ``class_data_path`` folder, preflighted the same way. Nothing without prior preservation."""
        from trainers.class_images import ensure_class_images
        from trainers.data import DatasetError, Problem, preflight
        from trainers.latents import build_latent_cache
        from trainers.run import latent_cache_root

        db: DreamBoothSettings = cfg.settings
        if not db.prior_preservation:
            return {}, {}
        cache = Path(cfg.cache_dir) if cfg.cache_dir else None
        if db.class_data_path is not None:
            folder, drawn = Path(db.class_data_path), 0
        else:
            made = ensure_class_images(model, db, db.num_class_images, cfg.data.resolution, device,
                                       root=cache / "class_images" if cache else None)
            folder, drawn = made.folder, made.generated
        ccfg = cfg.data.model_copy(update={"path": str(folder), "validation_split": 0.0, "validation_path": None,
                                           "random_flip": False, "caption_source": "auto", "instance_prompt": None})
        records = preflight(ccfg, require_captions=True)
        if len(records) < db.num_class_images:
            raise DatasetError(folder, [Problem(str(folder), f"{len(records)} class images, but "
                                                             f"dreambooth.num_class_images is {db.num_class_images}: "
                                                             "add images or lower num_class_images")])
        data = build_latent_cache(records, ccfg, model, root=latent_cache_root(cfg), cache_text=True, device=device)
        return {"class": data}, {"class_images": len(data), "class_images_drawn": drawn, "class_folder": str(folder),
                                 "class_cache_key": data.key}

    @property
    def class_data(self) -> CachedDataset | None:
        """The first ``num_class_images`` class images (None without prior preservation)."""
        if not self.db.prior_preservation:
            return None
        if "class" not in self.extra:
            raise ValueError("dreambooth.prior_loss_weight > 0, but no class images were prepared "
                             "(DreamBoothTrainer.prepare_extra builds them; sdsweep train and sweeps call it)")
        return self.extra["class"].head(self.db.num_class_images)

    def _class_indices(self, micro_step: int) -> torch.Tensor:
        """Class images of micro-batch ``micro_step``: its own shuffled order per epoch, seeded by
        (seed, epoch), so a resumed run needs no RNG state (like the instance order)."""
        data = self.class_data
        assert data is not None
        b, n = self.cfg.train_batch_size, len(data)
        out = []
        for pos in range(micro_step * b, (micro_step + 1) * b):
            g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + pos // n + _CLASS_SALT)
            out.append(int(torch.randperm(n, generator=g)[pos % n]))
        return torch.tensor(out)

    def compute_loss(self, micro_step: int) -> torch.Tensor:
        """With prior preservation: instance and class examples in one forward pass (the
        reference script's concatenated batch), the loss split back into the instance term
        (min-SNR weighted if configured) + ``prior_loss_weight`` x the class term (unweighted)."""
        data = self.class_data
        if data is None:
            return super().compute_loss(micro_step)
        gen = self._generator(micro_step)
        idx, latents, noise, t = self.draw(self.data, *self.batch_indices(micro_step), gen)
        cidx = self._class_indices(micro_step)
        _, clat, cnoise, ct = self.draw(data, cidx, torch.zeros(len(cidx), dtype=torch.bool), gen)
        hidden = torch.cat([self.encoder_hidden_states(idx), self.encoder_hidden_states(cidx, data)])
        per = self.per_sample_loss(torch.cat([latents, clat]), torch.cat([noise, cnoise]), torch.cat([t, ct]), hidden)
        instance, prior = per[: len(idx)], per[len(idx):]
        if self.cfg.snr_gamma is not None:
            instance = instance * self._snr_weights(t).to(self.device)
        return instance.mean() + self.db.prior_loss_weight * prior.mean()

    # ----- what trains ---------------------------------------------------------------------------

    def _trained(self) -> dict[str, torch.nn.Module]:
        out: dict[str, torch.nn.Module] = {"unet": self.model.unet}
        if self.db.train_text_encoder:
            out["text_encoder"] = self.model.text_encoder
        return out

    def configure_trainable(self) -> list[dict[str, Any]]:
        for name, module in self._trained().items():  # before anything changes them
            self._pristine[name] = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        unet = self.model.unet.requires_grad_(True)
        groups = [{"params": list(unet.parameters()), "lr": self.cfg.learning_rate}]
        if self.db.use_ema:  # fp32 shadow weights beside the UNet, on its device
            self.ema = EMAModel(unet.parameters(), decay=self.db.ema_decay, use_ema_warmup=True)
        if self.db.train_text_encoder:
            te = self.model.text_encoder.requires_grad_(True)
            groups.append({"params": list(te.parameters()), "lr": self.db.text_encoder_lr or self.cfg.learning_rate})
        return groups

    def make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if self.db.optimizer == "adamw":
            return super().make_optimizer(groups)
        if self.device.type != "cuda":
            raise ValueError(f"dreambooth.optimizer adamw_8bit needs a CUDA GPU (bitsandbytes); this run is on "
                             f"{self.device}: use dreambooth.optimizer: adamw")
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError:
            raise ValueError("dreambooth.optimizer adamw_8bit needs bitsandbytes: pip install 'sdsweep[bnb]', "
                             "or use dreambooth.optimizer: adamw") from None
        cfg = self.cfg
        return bnb.optim.AdamW8bit(groups, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                   weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)

    # ----- EMA ---------------------------------------------------------------------------------

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.step(self.model.unet.parameters())

    @contextlib.contextmanager
    def _ema_weights(self) -> Iterator[None]:
        """The UNet carries the EMA weights for the duration (a no-op without EMA)."""
        if self.ema is None:
            yield
            return
        params = list(self.model.unet.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    @contextlib.contextmanager
    def evaluation_model(self) -> Iterator[Any]:
        """The live model, with the EMA weights in the UNet when ``use_ema`` (what is exported)."""
        with self._ema_weights(), super().evaluation_model() as model:
            yield model

    def extra_state(self) -> dict[str, torch.Tensor]:
        if self.ema is None:
            return {}
        out = {f"ema.{i}": t for i, t in enumerate(self.ema.shadow_params)}
        out["ema.optimization_step"] = torch.tensor(self.ema.optimization_step)
        return out

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.ema is None:
            return
        if len(tensors) != len(self.ema.shadow_params) + 1:
            raise ValueError("the checkpoint's EMA state does not match this run's (was dreambooth.use_ema changed?)")
        with torch.no_grad():
            for i, t in enumerate(self.ema.shadow_params):
                t.copy_(tensors[f"ema.{i}"])
        self.ema.optimization_step = int(tensors["ema.optimization_step"])

    # ----- weights -------------------------------------------------------------------------------

    def export_weights(self, directory: Path) -> Path:
        """Write ``unet/`` (and ``text_encoder/``) in the diffusers layout plus the provenance; the
        UNet's EMA weights when ``use_ema``."""
        directory = Path(directory)
        with self._ema_weights():
            for name, module in self._trained().items():
                module.save_pretrained(str(directory / name), safe_serialization=True)
        info = {"method": self.method, "base_model": self.model.source,
                "base_model_spec": self.model.load_spec, "base_model_identity": self.model.identity, "step": self.global_step,
                "prediction_type": self.prediction_type, "dataset_key": self.data.key,
                "trained": sorted(self._trained()), "train": self.cfg.model_dump(mode="json"),
                "dreambooth": self.db.model_dump(mode="json")}
        atomic_write_text(directory / INFO_FILE, json.dumps(info, indent=1, sort_keys=True))
        return directory / UNET_DIR

    def tensors_in_export(self, directory: Path) -> dict[str, tuple[str, str]]:
        """The export holds every trained weight in fp32 under its own name: the UNet's is the EMA
        (``extra.ema.<i>``, the i-th UNet parameter) when ``use_ema``, else the trained UNet
        (``param.unet.<name>``); the text encoder's is always the trained one. So a checkpoint
        stores each of them once; with EMA the live UNet weights stay in the resume state."""
        out: dict[str, tuple[str, str]] = {}
        for sub, module in self._trained().items():
            held: dict[str, str] = {}  # key -> file (save_pretrained may shard a large module)
            for file in sorted((Path(directory) / sub).glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    held.update({k: f"{sub}/{file.name}" for k in f.keys()})
            for i, (name, _) in enumerate(module.named_parameters()):
                if name in held:
                    key = f"extra.ema.{i}" if sub == UNET_DIR and self.ema is not None else f"param.{sub}.{name}"
                    out[key] = (held[name], name)
        return out

    @classmethod
    def _load_into(cls, model: Any, checkpoint: Path) -> Any:
        """``model`` with the checkpoint's fine-tuned modules, loaded with diffusers' and
        transformers' own ``from_pretrained``, on the base modules' device and dtype."""
        checkpoint = Path(checkpoint)
        unet_p = next(model.unet.parameters())
        swap: dict[str, Any] = {"unet": UNet2DConditionModel.from_pretrained(str(checkpoint / UNET_DIR)).to(
            unet_p.device, unet_p.dtype)}
        if (checkpoint / TEXT_ENCODER_DIR).is_dir():
            te_p = next(model.text_encoder.parameters())
            swap["text_encoder"] = CLIPTextModel.from_pretrained(str(checkpoint / TEXT_ENCODER_DIR)).to(
                te_p.device, te_p.dtype)
        for module in swap.values():
            module.requires_grad_(False).eval()
        return dataclasses.replace(model, **swap)

    @classmethod
    @contextlib.contextmanager
    def loaded_for_evaluation(cls, model: Any, checkpoint: Path) -> Iterator[Any]:
        """The base model with the checkpoint's fine-tuned UNet (and text encoder) in place of its
        own, loaded the way users load them; ``model`` itself is never changed."""
        yield cls._load_into(model, checkpoint)

    @classmethod
    def export_files(cls, checkpoint: Path, dest: Path, name: str, provenance: dict[str, Any]) -> list[str]:
        """``unet/`` (+ ``text_encoder/``) as saved, and ``<name>-dreambooth.safetensors``: the base
        model with them, in the original single-file layout, provenance in its metadata."""
        from trainers.models import load_model
        from trainers.single_file import save_single_file

        checkpoint, dest = Path(checkpoint), Path(dest)
        info = json.loads((checkpoint / INFO_FILE).read_text())
        files = []
        for sub in (UNET_DIR, TEXT_ENCODER_DIR):
            if (checkpoint / sub).is_dir():
                shutil.copytree(checkpoint / sub, dest / sub, dirs_exist_ok=True)
                files.append(sub)
        shutil.copy2(checkpoint / INFO_FILE, dest / INFO_FILE)
        # Loaded the way the trial loaded it (single_file_config, allow_pickle, revision travel with it).
        base = load_model(info.get("base_model_spec") or {"source": info["base_model"]})
        if base.identity != info["base_model_identity"]:
            raise ValueError(f"{checkpoint}: trained on base model {info['base_model_identity'][:12]}, but "
                             f"{info['base_model']} now has identity {base.identity[:12]}; export from the same weights")
        single = f"{name}-dreambooth.safetensors"
        save_single_file(cls._load_into(base, checkpoint), dest / single, {
            "sdsweep": json.dumps(info, sort_keys=True), "sdsweep_best": json.dumps(provenance, sort_keys=True,
                                                                                   default=str)})
        return [*files, INFO_FILE, single]

    def restore_base_model(self) -> None:
        """Copy the pristine weights back into the same Parameters (exact: fp32 on both sides);
        a no-op for a module whose snapshot was never taken (setup failed before it)."""
        with torch.no_grad():
            for name, state in self._pristine.items():
                module = getattr(self.model, name)
                module.load_state_dict(state, strict=True)
                module.requires_grad_(False)
        self._pristine.clear()
        self.ema = None
