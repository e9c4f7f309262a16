"""The Trainer base class: the training loop every method shares.

A method subclass says *what* is trainable (``configure_trainable``), how text conditioning is
computed when the text encoder is not frozen, how its weights are exported, and how the base model
is restored afterwards (``teardown``). Everything else lives here: noise and timestep sampling,
epsilon / v-prediction targets, min-SNR-gamma weighting, noise offset, AdamW with an LR schedule and
warm-up, gradient accumulation and clipping, accelerate for device and mixed precision, gradient
checkpointing, and bit-exact checkpoint/resume.

Determinism: every random draw of micro-step ``m`` (data order aside) comes from a generator seeded
with ``(seed, m)``, and the data order of epoch ``e`` from one seeded with ``(seed, e)``. A resumed
run therefore needs no RNG state beyond the step counter, and N straight steps equal k steps +
save + resume + (N-k) steps bit for bit.

Training reads latents from a :class:`~trainers.latents.CachedDataset` and never calls the VAE.
"""

from __future__ import annotations

import abc
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from trainers.config import TrainConfig
from trainers.latents import CachedDataset, tokenize
from trainers.tensor_files import atomic_directory, atomic_save_safetensors, atomic_write_text

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
# Large odd multipliers keep the (seed, counter) -> generator-seed map collision-free in practice.
_STEP_MIX, _EPOCH_MIX = 1_000_003, 7_919


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing from that step was applied or saved."""


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step produced."""

    step: int
    loss: float
    lr: float
    grad_norm: float | None


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """Map the config's precision to accelerate's: "auto" is bf16/fp16 on CUDA and fp32 on CPU."""
    if device.type != "cuda":
        if requested in ("fp16", "bf16"):
            raise ValueError(
                f"train.mixed_precision={requested} needs a CUDA GPU, but training runs on {device}; "
                "use mixed_precision: auto or no"
            )
        return "no"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


class Trainer(abc.ABC):
    """Shared training loop. Subclasses implement the abstract hooks below."""

    method: ClassVar[str]

    def __init__(self, model: Any, data: CachedDataset, cfg: TrainConfig, output_dir: str | Path) -> None:
        self.model, self.data, self.cfg = model, data, cfg
        self.output_dir = Path(output_dir)
        device = torch.device(cfg.device) if cfg.device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        precision = resolve_mixed_precision(cfg.mixed_precision, device)
        self.accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        self.prediction_type = cfg.prediction_type or model.scheduler_config.get("prediction_type", "epsilon")
        self.noise_scheduler = model.noise_scheduler
        self.global_step = 0
        self._epoch_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._setup()

    # ----- hooks for method subclasses -------------------------------------------------------

    @abc.abstractmethod
    def configure_trainable(self) -> list[dict[str, Any]]:
        """Make the method's parameters trainable; return AdamW param groups (``params``, ``lr``)."""

    @abc.abstractmethod
    def export_weights(self, directory: Path) -> Path:
        """Write the method's deliverable weights (the format people load) into ``directory``."""

    @abc.abstractmethod
    def teardown(self) -> None:
        """Restore the base model to how it was before this trainer (remove adapters etc.)."""

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the text encoder's output changes during training (then it is not cached)."""
        return False

    # ----- setup -------------------------------------------------------------------------------

    def _setup(self) -> None:
        m, cfg = self.model, self.cfg
        for module in (m.unet, m.vae, m.text_encoder):
            module.requires_grad_(False)
        self._place(m.unet)
        if self.trains_text_encoder or self.data.text_embeds is None:
            self._place(m.text_encoder)
        groups = self.configure_trainable()
        self.trainable = [p for g in groups for p in g["params"]]
        if not self.trainable:
            raise RuntimeError(f"{type(self).__name__}.configure_trainable returned no parameters")
        for p in self.trainable:
            # Trainable weights stay fp32 under mixed precision (AdamW on bf16 weights loses updates).
            p.data = p.data.float()
        if cfg.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
            if self.trains_text_encoder:
                m.text_encoder.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        self.optimizer = self.accelerator.prepare(optimizer)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=cfg.max_train_steps)
        self.named_trainable = self._named_trainable()

    def prepare_for_sampling(self) -> None:
        """Put the VAE and text encoder beside the UNet (sampling needs both; training with a
        latent cache never moved them). A no-op on CPU."""
        self._place(self.model.vae)
        self._place(self.model.text_encoder)

    def _place(self, module: torch.nn.Module) -> None:
        """Move a frozen module to the training device and weight dtype (only what differs)."""
        p = next(module.parameters())
        if p.device != self.device:
            module.to(self.device)
        if p.dtype != self.weight_dtype:
            # diffusers' ModelMixin.to(dtype) logs a spurious float32 warning even when nothing
            # changes, so the cast is only issued when it does something.
            module.to(self.weight_dtype)

    def _named_trainable(self) -> dict[str, torch.nn.Parameter]:
        ids = {id(p) for p in self.trainable}
        named: dict[str, torch.nn.Parameter] = {}
        for prefix, module in (("unet", self.model.unet), ("text_encoder", self.model.text_encoder)):
            for name, p in module.named_parameters():
                if id(p) in ids:
                    named[f"{prefix}.{name}"] = p
        if len(named) != len(ids):
            raise RuntimeError("some trainable parameters are outside the UNet and text encoder")
        return named

    # ----- data and randomness -----------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shuffled image order and per-image flip decisions of one epoch (seeded by epoch)."""
        if epoch not in self._epoch_cache:
            g = torch.Generator().manual_seed(self.cfg.seed * _EPOCH_MIX + epoch)
            n = len(self.data)
            perm = torch.randperm(n, generator=g)
            flips = torch.rand(n, generator=g) < 0.5
            if self.data.flip_mean is None:
                flips = torch.zeros(n, dtype=torch.bool)
            self._epoch_cache = {epoch: (perm, flips)}  # only the current epoch is ever needed
        return self._epoch_cache[epoch]

    def batch_indices(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image indices and flip flags of micro-batch ``micro_step`` (a pure function of it)."""
        b, n = self.cfg.train_batch_size, len(self.data)
        idx, flip = [], []
        for pos in range(micro_step * b, (micro_step + 1) * b):
            perm, flips = self._epoch_order(pos // n)
            i = int(perm[pos % n])
            idx.append(i)
            flip.append(bool(flips[i]))
        return torch.tensor(idx), torch.tensor(flip)

    def _generator(self, micro_step: int) -> torch.Generator:
        seed = self.cfg.seed * _STEP_MIX + micro_step
        torch.manual_seed(seed)  # dropout inside adapters draws from the global RNG
        return torch.Generator().manual_seed(seed)

    # ----- the step ----------------------------------------------------------------------------

    def encoder_hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Text conditioning for images ``idx``: cached when frozen, else a text-encoder forward."""
        if not self.trains_text_encoder and self.data.text_embeds is not None:
            rows = self.data.text_embeds[self.data.caption_index[idx]]
            return rows.to(self.device, self.weight_dtype)
        ids = tokenize(self.model.tokenizer, [self.data.captions[int(i)] for i in idx])
        return self.model.text_encoder(ids.to(self.device))[0]

    def compute_loss(self, micro_step: int) -> torch.Tensor:
        """Diffusion loss of one micro-batch (mean over the batch, SNR-weighted if configured)."""
        idx, flip = self.batch_indices(micro_step)
        gen = self._generator(micro_step)
        latents = self.data.sample_latents(idx, flip, gen)
        noise = torch.randn(latents.shape, generator=gen)
        if self.cfg.noise_offset:
            # Offset noise (Guttenberg 2023): lets the model shift an image's mean brightness.
            noise = noise + self.cfg.noise_offset * torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=gen)
        sched = self.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        hidden = self.encoder_hidden_states(idx)
        with self.accelerator.autocast():
            pred = self.model.unet(noisy.to(self.device, self.weight_dtype), t.to(self.device), hidden).sample
        per_sample = F.mse_loss(pred.float(), target.to(self.device), reduction="none").mean(dim=(1, 2, 3))
        if self.cfg.snr_gamma is not None:
            per_sample = per_sample * self._snr_weights(t).to(self.device)
        return per_sample.mean()

    def _snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights: min(SNR, g)/SNR for epsilon, min(SNR, g)/(SNR+1) for v."""
        ac = self.noise_scheduler.alphas_cumprod[t].float()
        snr = ac / (1 - ac)
        clipped = torch.clamp(snr, max=self.cfg.snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr

    def train_step(self) -> StepStats:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        accum = self.cfg.gradient_accumulation_steps
        self.model.unet.train()
        total = 0.0
        for k in range(accum):
            micro = self.global_step * accum + k
            loss = self.compute_loss(micro)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(self._nonfinite_message(float(loss.detach()), micro))
            self.accelerator.backward(loss / accum)
            total += float(loss.detach()) / accum
        grad_norm = None
        if self.cfg.max_grad_norm is not None:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm))
            if self.weight_dtype != torch.float16 and not torch.isfinite(torch.tensor(grad_norm)):
                # fp16 is exempt: its grad scaler skips such steps by design.
                raise NonFiniteLossError(self._nonfinite_message(grad_norm, None, what="gradient norm"))
        lr = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return StepStats(step=self.global_step, loss=total, lr=lr, grad_norm=grad_norm)

    def _nonfinite_message(self, value: float, micro: int | None, what: str = "loss") -> str:
        lr = self.lr_scheduler.get_last_lr()[0]
        where = f"step {self.global_step + 1}" + (f" (micro-batch {micro})" if micro is not None else "")
        return (
            f"{self.method}: the {what} became {value} at {where}; training stopped and no checkpoint "
            f"was written from this step. Likely cause: learning rate {lr:g} is too high for this "
            f"method (lower train.learning_rate or add lr_warmup_steps), or fp16 overflow "
            f"(use mixed_precision: bf16 or no). Last good step: {self.global_step}."
        )

    @torch.no_grad()
    def validation_loss(self, timesteps: int = 4, seed: int = 20_231_123) -> float:
        """Deterministic loss: every image (unflipped) x ``timesteps`` evenly spaced timesteps,
        noise from fixed per-image seeds independent of the trial's seed and batch size,
        unweighted MSE.

        Identical inputs for every trial of a sweep, so values are comparable across trials (min-SNR
        weighting is deliberately not applied: it would make trials with different snr_gamma
        incomparable). Adapter dropout is off (eval mode).
        """
        n = len(self.data)
        t_grid = torch.linspace(0, self.noise_scheduler.config.num_train_timesteps - 1, timesteps + 2)[1:-1].long()
        no_flip = torch.zeros(1, dtype=torch.bool)
        latents, noise = [], []
        for i in range(n):  # image i's draws depend on (seed, i) only
            gen = torch.Generator().manual_seed(seed + i)
            lat = self.data.sample_latents(torch.tensor([i]), no_flip, gen)[0]
            latents.append(lat)
            noise.append(torch.randn((timesteps, *lat.shape), generator=gen))
        was_training = self.model.unet.training
        self.model.unet.eval()
        total, count = 0.0, 0
        for start in range(0, n, self.cfg.train_batch_size):
            idx = torch.arange(start, min(n, start + self.cfg.train_batch_size))
            lat = torch.stack([latents[int(i)] for i in idx])
            hidden = self.encoder_hidden_states(idx)
            for k, t_val in enumerate(t_grid):
                t = t_val.repeat(len(idx))
                eps = torch.stack([noise[int(i)][k] for i in idx])
                noisy = self.noise_scheduler.add_noise(lat, eps, t)
                target = eps if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(lat, eps, t)
                with self.accelerator.autocast():
                    pred = self.model.unet(noisy.to(self.device, self.weight_dtype), t.to(self.device), hidden).sample
                total += F.mse_loss(pred.float(), target.to(self.device), reduction="sum").item()
                count += target.numel()
        self.model.unet.train(was_training)
        return total / count

    # ----- the loop ----------------------------------------------------------------------------

    def train(self, until_step: int | None = None,
              callback: Callable[[StepStats], None] | None = None) -> list[StepStats]:
        """Train until ``until_step`` (default ``max_train_steps``), checkpointing as configured."""
        target = min(until_step or self.cfg.max_train_steps, self.cfg.max_train_steps)
        history = []
        while self.global_step < target:
            stats = self.train_step()
            history.append(stats)
            if callback is not None:
                callback(stats)
            every = self.cfg.checkpointing_steps
            if every and self.global_step % every == 0:
                self.save_checkpoint(self.output_dir / f"checkpoint-{self.global_step}")
                self._prune_checkpoints()
        return history

    def _prune_checkpoints(self) -> None:
        limit = self.cfg.checkpoints_total_limit
        if not limit:
            return
        ckpts = sorted(self.output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in ckpts[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    # ----- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write weights + optimizer/scheduler state so training can resume bit-exactly.

        Atomically: the files go into a temp directory beside ``directory``, renamed into place
        when complete, so a save interrupted by a crash or a full disk never leaves a
        ``checkpoint-N`` that resume would pick up half-written.
        """
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            self._write_checkpoint(tmp)
        return directory

    def _write_checkpoint(self, directory: Path) -> None:
        self.export_weights(directory)
        opt = self.optimizer.state_dict()
        tensors = {f"param.{n}": p.detach() for n, p in self.named_trainable.items()}
        slots: dict[str, list[str]] = {}
        for idx, st in opt["state"].items():
            slots[str(idx)] = sorted(st)
            for name, value in st.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value)
        meta = {"producer": f"sdsweep.trainers.{self.method}", "step": str(self.global_step)}
        atomic_save_safetensors(tensors, directory / STATE_TENSORS, meta)
        scaler = self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None
        state = {"step": self.global_step, "method": self.method, "param_groups": opt["param_groups"],
                 "optimizer_slots": slots, "lr_scheduler": self.lr_scheduler.state_dict(),
                 "grad_scaler": scaler, "config": self.cfg.model_dump(mode="json"),
                 "dataset_key": self.data.key, "base_model": self.model.identity}
        atomic_write_text(directory / STATE_JSON, json.dumps(state, indent=1, default=str))

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` of the same method and setup."""
        directory = Path(directory)
        for f in (STATE_JSON, STATE_TENSORS):
            if not (directory / f).is_file():
                raise FileNotFoundError(f"{directory / f}: missing; not a complete sdsweep checkpoint")
        state = json.loads((directory / STATE_JSON).read_text())
        if state["method"] != self.method:
            raise ValueError(f"{directory}: checkpoint of method {state['method']!r}, not {self.method!r}")
        tensors = load_file(str(directory / STATE_TENSORS))
        with torch.no_grad():
            for name, p in self.named_trainable.items():
                key = f"param.{name}"
                if key not in tensors or tensors[key].shape != p.shape:
                    raise ValueError(f"{directory}: {key} is missing or has another shape; "
                                     "the checkpoint was made with different settings")
                p.copy_(tensors[key])
        opt_state = {int(i): {n: tensors[f"optim.{i}.{n}"].to(self.device) if n != "step"
                              else tensors[f"optim.{i}.{n}"] for n in names}
                     for i, names in state["optimizer_slots"].items()}
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("grad_scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        self.global_step = int(state["step"])
