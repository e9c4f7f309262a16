"""The Trainer base class: the training loop every method shares.

A method subclass says *what* is trainable (``configure_trainable``), how text conditioning is
computed when the text encoder is not frozen, how its weights are exported, and how the base model
is restored afterwards (``teardown``): the hooks of :class:`trainers.hooks.MethodHooks`, which
``Trainer`` extends. Everything else lives here: noise and timestep sampling,
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

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr

from trainers.config import TrainConfig
from trainers.errors import NonFiniteLossError as NonFiniteLossError  # re-exported (defined light)
from trainers.devices import make_accelerator, place, resolve_mixed_precision, run_placement  # noqa: F401 (re-exported)
from trainers.checkpoints import read_trainer_state, write_trainer_state
from trainers.latents import CachedDataset
from trainers.hooks import MethodHooks
from trainers.tensor_files import atomic_directory

# Large odd multipliers keep the (seed, counter) -> generator-seed map collision-free in practice.
_STEP_MIX, _EPOCH_MIX = 1_000_003, 7_919


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step produced."""

    step: int
    loss: float
    lr: float
    grad_norm: float | None


class Trainer(MethodHooks):
    """Shared training loop. Subclasses implement the abstract hooks of :class:`~trainers.hooks.MethodHooks`."""

    def __init__(self, model: Any, data: CachedDataset, cfg: TrainConfig, output_dir: str | Path,
                 validation_data: CachedDataset | None = None,
                 extra: dict[str, CachedDataset] | None = None) -> None:
        self.model, self.data, self.cfg = model, data, cfg
        self.validation_data = validation_data  # held-out images for validation_loss, if any
        self.extra = dict(extra or {})  # the method's other datasets (``prepare_extra``)
        self.output_dir = Path(output_dir)
        placement = run_placement(cfg.device, cfg.mixed_precision)
        self.weight_dtype = placement.weight_dtype
        self.accelerator = make_accelerator(placement.precision, placement.device)
        self.device = self.accelerator.device
        self.prediction_type = cfg.prediction_type or model.scheduler_config.get("prediction_type", "epsilon")
        self.noise_scheduler = model.noise_scheduler
        self.global_step = 0
        # What the trial has spent (resumed with its checkpoint): budgets across methods compare these.
        self.train_seconds = 0.0  # in train_step, without evaluation and checkpointing
        self.images_seen = 0  # examples through the UNet (instance + any class examples)
        self._epoch_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Setup is transactional: the base model may be shared with later trials (a reused Ray
        # worker), so whatever a half-done setup added (an adapter, a new token) is removed before
        # the error propagates; otherwise every later trial on the worker would fail on it.
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise

    # ----- setup -------------------------------------------------------------------------------

    def _setup(self) -> None:
        m, cfg = self.model, self.cfg
        for module in (m.unet, m.vae, m.text_encoder):
            module.requires_grad_(False)
        self._place(m.unet, self.unet_dtype)
        if self.trains_text_encoder or self.data.text_embeds is None:
            self._place(m.text_encoder, self.text_encoder_dtype)
        groups = self.configure_trainable()
        scale = cfg.effective_learning_rate / cfg.learning_rate  # train.scale_lr
        for g in groups:
            g["lr"] = g["lr"] * scale
        self.trainable = [p for g in groups for p in g["params"]]
        if not self.trainable:
            raise RuntimeError(f"{type(self).__name__}.configure_trainable returned no parameters")
        # Trainable weights stay fp32 under mixed precision (AdamW on bf16 weights loses updates).
        cast_training_params([m.unet, m.text_encoder], dtype=torch.float32)
        if cfg.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
            if self.trains_text_encoder:
                m.text_encoder.gradient_checkpointing_enable()
        optimizer = self.make_optimizer(groups)
        self.optimizer = self.accelerator.prepare(optimizer)
        self.lr_scheduler = get_scheduler(cfg.effective_lr_scheduler, optimizer=optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=cfg.max_train_steps)
        self.named_trainable = self._named_trainable()

    def teardown(self) -> None:
        """Restore the base model to how it was before this trainer: the method's own additions
        (``restore_base_model``), then what the shared loop changed (gradient checkpointing,
        train mode, requires_grad, gradients), and let go of the optimizer. Safe to call after a
        failed setup and more than once.

        Gradients: a step that raised after its backward (an out-of-memory error in the optimizer
        step, a non-finite gradient norm) leaves ``.grad`` on every trained parameter. Where those
        are the shared model's own (DreamBooth's UNet), the next trial's first backward would add
        to them -- it would differ from one on a fresh worker -- and at SD 1.5 size they hold ~3.4
        GB of GPU memory. So every parameter of the shared modules loses its ``.grad``, and the
        optimizer, its state and the LR schedule are released (``Accelerator.free_memory`` drops the
        accelerator's own references to them)."""
        self._release_optimizer()
        m = self.model
        if self.cfg.gradient_checkpointing:  # both calls are no-ops where it was never enabled
            # Before the adapters go: transformers removes the input-embedding hooks that
            # checkpointing a peft text encoder added only while its peft flag is still set.
            m.unet.disable_gradient_checkpointing()
            m.text_encoder.gradient_checkpointing_disable()
        self.restore_base_model()
        for module in (m.unet, m.vae, m.text_encoder):
            module.requires_grad_(False)
            module.eval()  # as loaded: from_pretrained returns modules in eval mode
            for p in module.parameters():
                p.grad = None

    def _release_optimizer(self) -> None:
        """Drop every reference this trainer holds to its optimizer (and its state), its LR schedule
        and its trainable parameters' list."""
        for name in ("optimizer", "lr_scheduler"):
            if hasattr(self, name):
                setattr(self, name, None)
        self.trainable, self.named_trainable = [], {}
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            # Last: its garbage collection also frees the optimizer <-> accelerate wrapper cycle.
            accelerator.free_memory()

    def prepare_for_sampling(self) -> None:
        """Put the VAE and text encoder beside the UNet (sampling needs both; training with a
        latent cache never moved them). A no-op on CPU."""
        self._place(self.model.vae)
        self._place(self.model.text_encoder, self.text_encoder_dtype)

    def _place(self, module: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        """Move a frozen module to the training device and ``dtype`` (default: the weight dtype)
        with ``devices.place``."""
        dtype = dtype or self.weight_dtype
        p = next(module.parameters())
        if p.dtype != dtype and p.dtype != torch.float32:
            # An earlier trainer cast this shared module down (e.g. to bf16); casting it back up
            # would train on rounded weights, silently. Sweeps load one base model per precision.
            raise RuntimeError(
                f"{type(module).__name__} of the base model is in {p.dtype} (cast by an earlier run with "
                f"mixed precision), but this run needs {dtype}; load a fresh base model "
                "(trainers.models.load_base_model) for runs with another train.mixed_precision")
        place(module, self.device, dtype)

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

    def encoder_hidden_states(self, idx: torch.Tensor, data: CachedDataset | None = None) -> torch.Tensor:
        """Text conditioning for images ``idx`` of ``data`` (default: the training data): cached
        when frozen, else a text-encoder forward."""
        data = data or self.data
        if not self.trains_text_encoder and data.text_embeds is not None:
            rows = data.text_embeds[data.caption_index[idx]]
            return rows.to(self.device, self.weight_dtype)
        ids = self.tokenize_captions([data.captions[int(i)] for i in idx])
        return self.model.text_encoder(ids.to(self.device))[0]

    def compute_loss(self, micro_step: int) -> torch.Tensor:
        """Diffusion loss of one micro-batch (mean over the batch, SNR-weighted if configured)."""
        gen = self._generator(micro_step)
        idx, latents, noise, t = self.draw(self.data, *self.batch_indices(micro_step), gen)
        return self.diffusion_loss(latents, noise, t, self.encoder_hidden_states(idx))

    def draw(self, data: CachedDataset, idx: torch.Tensor, flip: torch.Tensor, gen: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents of images ``idx`` of ``data`` with their noise and timesteps, all from ``gen``
        (in this order: latents, noise, offset noise, timesteps)."""
        latents = data.sample_latents(idx, flip, gen)
        noise = torch.randn(latents.shape, generator=gen)
        if self.cfg.noise_offset:
            # Offset noise (Guttenberg 2023): lets the model shift an image's mean brightness.
            noise = noise + self.cfg.noise_offset * torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=gen)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        return idx, latents, noise, t

    def diffusion_loss(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                       hidden: torch.Tensor) -> torch.Tensor:
        """The loss for given clean latents, noise, timesteps and text conditioning: MSE of the
        UNet's prediction against the epsilon or v target, per-sample min-SNR weighted, batch mean."""
        per_sample = self.per_sample_loss(latents, noise, t, hidden)
        if self.cfg.snr_gamma is not None:
            per_sample = per_sample * self._snr_weights(t).to(self.device)
        return per_sample.mean()

    def per_sample_loss(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                        hidden: torch.Tensor) -> torch.Tensor:
        """Unweighted MSE of the UNet's prediction against the epsilon or v target, per sample."""
        sched = self.noise_scheduler
        noisy = sched.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        with self.accelerator.autocast():
            pred = self.model.unet(noisy.to(self.device, self.weight_dtype), t.to(self.device), hidden).sample
        return F.mse_loss(pred.float(), target.to(self.device), reduction="none").mean(dim=(1, 2, 3))

    def _snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, g)/SNR for epsilon, min(SNR, g)/(SNR+1)
        for v-prediction, with diffusers' ``compute_snr``.

        A zero-terminal-SNR schedule (``rescale_betas_zero_snr``) has SNR = 0 at its last timestep,
        where min(SNR, g)/SNR is 0/0; its limit as SNR -> 0 is 1 (min(SNR, g) = SNR below g), which
        is used there instead of the NaN diffusers' training scripts would produce.
        """
        snr = compute_snr(self.noise_scheduler, t).float()
        clipped = torch.clamp(snr, max=self.cfg.snr_gamma)
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        nonzero = snr > 0
        return torch.where(nonzero, clipped / torch.where(nonzero, snr, 1.0), 1.0)

    def train_step(self) -> StepStats:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        accum = self.cfg.gradient_accumulation_steps
        self.model.unet.train()
        if self.trains_text_encoder:
            self.model.text_encoder.train()  # its adapters' dropout is part of the recipe
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
            self.after_optimizer_step()
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

    def validation_loss(self, timesteps: int = 4, seed: int = 20_231_123) -> float:
        """:meth:`fixed_loss` on the held-out validation images (``validation_data``); without
        them, on the training images (then it measures fit, not generalisation)."""
        return self.fixed_loss(self.data if self.validation_data is None else self.validation_data, timesteps, seed)

    @torch.no_grad()
    def fixed_loss(self, data: CachedDataset, timesteps: int = 4, seed: int = 20_231_123) -> float:
        """Deterministic loss on ``data``: every image (unflipped) x ``timesteps`` evenly spaced
        timesteps, noise from fixed per-image seeds independent of the trial's seed and batch
        size, unweighted MSE.

        Identical inputs for every trial of a sweep, so values are comparable across trials (min-SNR
        weighting is deliberately not applied: it would make trials with different snr_gamma
        incomparable). Adapter dropout is off (eval mode).
        """
        n = len(data)
        t_grid = torch.linspace(0, self.noise_scheduler.config.num_train_timesteps - 1, timesteps + 2)[1:-1].long()
        no_flip = torch.zeros(1, dtype=torch.bool)
        latents, noise = [], []
        for i in range(n):  # image i's draws depend on (seed, i) only
            gen = torch.Generator().manual_seed(seed + i)
            lat = data.sample_latents(torch.tensor([i]), no_flip, gen)[0]
            latents.append(lat)
            noise.append(torch.randn((timesteps, *lat.shape), generator=gen))
        modules = (self.model.unet, self.model.text_encoder)
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        total, count = 0.0, 0
        for start in range(0, n, self.cfg.train_batch_size):
            idx = torch.arange(start, min(n, start + self.cfg.train_batch_size))
            lat = torch.stack([latents[int(i)] for i in idx])
            hidden = self.encoder_hidden_states(idx, data)
            for k, t_val in enumerate(t_grid):
                t = t_val.repeat(len(idx))
                eps = torch.stack([noise[int(i)][k] for i in idx])
                noisy = self.noise_scheduler.add_noise(lat, eps, t)
                target = eps if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(lat, eps, t)
                with self.accelerator.autocast():
                    pred = self.model.unet(noisy.to(self.device, self.weight_dtype), t.to(self.device), hidden).sample
                total += F.mse_loss(pred.float(), target.to(self.device), reduction="sum").item()
                count += target.numel()
        for m, flag in zip(modules, was_training):
            m.train(flag)
        return total / count

    # ----- the loop ----------------------------------------------------------------------------

    def train(self, until_step: int | None = None,
              callback: Callable[[StepStats], None] | None = None) -> list[StepStats]:
        """Train until ``until_step`` (default ``max_train_steps``), checkpointing as configured."""
        target = min(until_step or self.cfg.max_train_steps, self.cfg.max_train_steps)
        history = []
        while self.global_step < target:
            started = time.perf_counter()
            stats = self.train_step()
            self.train_seconds += time.perf_counter() - started
            self.images_seen += self.examples_per_step
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

    def save_checkpoint(self, directory: str | Path, *, optimizer_state: bool = True) -> Path:
        """Write weights + optimizer/scheduler state so training can resume bit-exactly
        (without ``optimizer_state``: a last checkpoint, never trained on; trainers/checkpoints.py).

        Atomically: the files go into a temp directory beside ``directory``, renamed into place
        when complete, so a save interrupted by a crash or a full disk never leaves a
        ``checkpoint-N`` that resume would pick up half-written.
        """
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            self._write_checkpoint(tmp, optimizer_state)
        return directory

    def _write_checkpoint(self, directory: Path, optimizer_state: bool = True) -> None:
        self.export_weights(directory)
        write_trainer_state(self, directory, optimizer_state=optimizer_state)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` of the same method and setup."""
        read_trainer_state(self, Path(directory))
