"""How much GPU memory one trial needs: the estimate ``sdsweep plan`` packs trials by.

Ray does not enforce GPU memory: with ``resources.gpu: 0.25`` it starts four trials on one GPU
whether or not they fit. sdsweep plans packings from this estimate and refuses one that cannot
fit (``sweeps/plan.py``). The estimate is built from the model's own architecture, not a table:

* **Weights, gradients, optimizer state, EMA** are counted exactly from parameter counts of the
  model's UNet / VAE / text encoder, built from their configs on PyTorch's ``meta`` device (no
  weights read, no memory used), in the dtypes the method keeps them in (``Trainer.base_dtypes``):
  LoRA adapters are added with peft as the trainer adds them, DreamBooth trains the whole UNet
  (fp32, AdamW's two fp32 moments or 8-bit AdamW's two 1-byte ones, an fp32 EMA copy), textual
  inversion trains ``vectors_per_token`` embedding rows.
* **Activations** are the bytes autograd saves for the backward pass of one training forward,
  measured (``trainers/activations.py``) by running the real diffusers UNet (and, when it is
  trained, the text encoder) on meta tensors under a saved-tensor hook, at the trial's batch
  (doubled by DreamBooth's prior preservation), resolution and compute dtype, with the trial's
  gradient checkpointing. Attention is counted as a fused kernel keeps it (PyTorch's SDPA flash /
  memory-efficient path on a GPU: q, k, v, the output and its log-sum-exp; never the L x L
  matrix). With gradient checkpointing the UNet keeps each checkpointed block's inputs, and the
  backward recomputes one block at a time: the largest block's own saved bytes are added once.
* Mixed precision follows CUDA autocast's rules on the meta device: linear layers, convolutions
  and attention compute in bf16/fp16 (fp32 weights, DreamBooth's UNet, are cast to a copy that is
  saved for the backward), group and layer norm in fp32 (so the activations around them are fp32).
* **Sampling** (evaluation between training steps; no gradients) holds a few of its largest
  activations at a time: the UNet at twice the evaluation batch (classifier-free guidance) and the
  VAE decoder at full resolution; counted as ``SAMPLING_LIVE`` times the largest module output.
  Evaluation runs between steps, so the peak is the larger of training and sampling on top of what
  persists (weights, optimizer state, the scoring models' fp32 weights).
* Constants for what no parameter count shows: ``BACKWARD_TRANSIENT`` (the peak of a training step
  over its saved activations: gradients of activations live beside the tensors not yet freed;
  measured 1.22-1.30 on a real diffusers UNet on the CPU, ``bench/bench_memory_estimate.py``),
  ``CHECKPOINT_KEPT_TWICE`` (with gradient checkpointing the kept block inputs get gradient twins
  during the backward; measured 1.8-2.0x the naive count without this term, same bench),
  ``ALLOCATOR_SLACK`` (PyTorch's caching allocator rounds and fragments; 10 %, not measured here)
  and ``CUDA_CONTEXT_GIB`` (every trial is its own process with its own CUDA context, outside
  PyTorch's allocator; ~0.5 GiB on recent GPUs with lazy module loading, not measured here).

What is not measured here: none of this has been checked against ``torch.cuda.max_memory_allocated``
on a GPU yet (no GPU was lent when it was written); ``bench/gpu_smoke.py`` prints estimate and
measured peak side by side when one is. The CPU-side check is in ``tests/test_memory_plan.py``:
the activation estimate against the resident memory a real forward + backward adds, and the whole
estimate against published DreamBooth figures (docs/SWEEPS.md, "GPU memory").
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainers.activations import largest_output_bytes, training_activation_bytes

GIB = 2**30
ALLOCATOR_SLACK = 0.10
CUDA_CONTEXT_GIB = 0.5
SAMPLING_LIVE = 3  # sampling holds about this many of its largest activations at once
_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
_ADAM_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2}  # two moments per trainable parameter


@dataclass(frozen=True)
class Architecture:
    """The model's module configs (read from its ``config.json`` files, never its weights)."""

    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    source: str

    @classmethod
    def from_directory(cls, root: Path, source: str | None = None) -> "Architecture":
        """From a diffusers pipeline directory (or a directory of its configs)."""
        parts = {}
        for sub in ("unet", "text_encoder", "vae"):
            path = root / sub / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; the memory estimate reads the model's architecture "
                                        "from a diffusers directory's unet/, text_encoder/ and vae/ configs")
            parts[sub] = json.loads(path.read_text())
        return cls(parts["unet"], parts["text_encoder"], parts["vae"], source or str(root))

    @classmethod
    def from_spec(cls, spec: Any) -> "Architecture":
        """From a run config's ``model`` (builtin, diffusers directory, single file with its
        config, or a Hub id), found as the loader finds it (``trainers.model_configs.config_dir``)."""
        from trainers.model_configs import config_dir

        return cls.from_directory(config_dir(spec), spec.source)

    @functools.cached_property
    def _counts(self) -> dict[str, int]:
        unet, text, vae = meta_modules(self)
        return {name: sum(p.numel() for p in m.parameters())
                for name, m in (("unet", unet), ("text_encoder", text), ("vae", vae))}

    def parameters(self, module: str) -> int:
        """Parameter count of ``unet``, ``text_encoder`` or ``vae``."""
        return self._counts[module]

    @property
    def default_resolution(self) -> int:
        """The resolution the model was trained at (UNet sample size x the VAE's downsampling)."""
        from trainers.model_configs import native_resolution_of

        return native_resolution_of(self.unet, self.vae, where=self.source)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", (1, 1, 1, 1))) - 1)


def meta_modules(arch: Architecture) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """UNet, text encoder and VAE built from ``arch`` on the meta device (no memory, no weights)."""
    import logging

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(arch.unet)
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in arch.text_encoder.items()
                                               if not k.startswith("_") and k != "architectures"}))
        vae = AutoencoderKL.from_config(arch.vae)
    return unet, text, vae


@dataclass(frozen=True)
class TrialShape:
    """What one trial's memory depends on (read from its run config by :func:`trial_shape`)."""

    method: str
    resolution: int
    batch: int  # examples through the UNet per forward (DreamBooth's prior preservation doubles it)
    gradient_checkpointing: bool
    precision: str  # accelerate's: "no", "bf16" or "fp16"
    unet_dtype: torch.dtype
    text_encoder_dtype: torch.dtype
    weight_dtype: torch.dtype
    eval_batch: int = 1
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    lora_text_targets: tuple[str, ...] = ()
    train_unet: bool = False  # DreamBooth: every UNet weight
    train_text_encoder: bool = False  # every text-encoder weight (DreamBooth) or LoRA on it
    ti_vectors: int = 0
    optimizer: str = "adamw"
    ema: bool = False

    def describe(self) -> str:
        """A short label: the values that drive the estimate."""
        bits = [f"{self.resolution}px", f"batch {self.batch}"]
        if self.lora_rank:
            bits.append(f"rank {self.lora_rank}")
        if self.ti_vectors:
            bits.append(f"{self.ti_vectors} vectors")
        if self.train_text_encoder:
            bits.append("+text encoder")
        if self.optimizer != "adamw":
            bits.append(self.optimizer)
        if self.ema:
            bits.append("EMA")
        bits.append("grad ckpt" if self.gradient_checkpointing else "no grad ckpt")
        bits.append(self.precision if self.precision != "no" else "fp32")
        return ", ".join(bits)


def trial_shape(run_cfg: Any, device_type: str = "cuda", eval_batch: int = 1) -> TrialShape:
    """The :class:`TrialShape` of a trial with run config ``run_cfg`` on a ``device_type`` device:
    the precision and module dtypes its trainer would pick there (``trainers.devices``,
    ``Trainer.base_dtypes``) and what its method trains (``Trainer.memory_profile``)."""
    from trainers import get_trainer_class

    train = run_cfg.train
    precision = train.mixed_precision
    if device_type == "cuda":
        precision = "bf16" if precision == "auto" else precision  # fp16 on a GPU without bf16: same bytes
    else:
        precision = "bf16" if precision == "bf16" else "no"
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    trainer = get_trainer_class(run_cfg.method)
    unet_dtype, te_dtype = trainer.base_dtypes(run_cfg.settings, weight_dtype)
    kw = trainer.memory_profile(run_cfg.settings)
    batch = train.train_batch_size * kw.pop("batch_factor", 1)
    return TrialShape(method=run_cfg.method, resolution=run_cfg.data.resolution, batch=batch,
                      gradient_checkpointing=train.gradient_checkpointing, precision=precision,
                      unet_dtype=unet_dtype, text_encoder_dtype=te_dtype, weight_dtype=weight_dtype,
                      eval_batch=eval_batch, **kw)


@dataclass(frozen=True)
class MemoryEstimate:
    """One trial's estimated peak GPU memory, by part (bytes)."""

    shape: TrialShape
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total_bytes(self) -> float:
        p = self.parts
        peak = (p["weights"] + p["gradients"] + p["optimizer"] + p["ema"] + p["scoring"]
                + max(p["training"], p["sampling"]))
        return peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB * GIB

    @property
    def allocated_bytes(self) -> float:
        """The part ``torch.cuda.max_memory_allocated`` measures: without the allocator's slack
        and the CUDA context (what a trial reports as ``peak_memory_mb`` on a GPU)."""
        return (self.total_bytes - CUDA_CONTEXT_GIB * GIB) / (1 + ALLOCATOR_SLACK)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def breakdown(self) -> str:
        """What the total is made of, one line."""
        p = self.parts
        state = p["gradients"] + p["optimizer"] + p["ema"]
        return (f"weights {_size(p['weights'])}, trained state {_size(state)}, scoring {_size(p['scoring'])}, "
                f"max(training {_size(p['training'])}, sampling {_size(p['sampling'])}); "
                f"+{ALLOCATOR_SLACK:.0%} allocator, +{CUDA_CONTEXT_GIB:g} GiB CUDA context")


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:.0f} MiB"


def _unet_inputs(arch: Architecture, batch: int, resolution: int, dtype: torch.dtype,
                 context_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    side = resolution // arch.vae_scale
    x = torch.empty(batch, int(arch.unet.get("in_channels", 4)), side, side, device="meta", dtype=dtype)
    hidden = int(arch.unet.get("cross_attention_dim") or arch.text_encoder["hidden_size"])
    tokens = int(arch.text_encoder.get("max_position_embeddings", 77))
    context = torch.empty(batch, tokens, hidden, device="meta", dtype=dtype, requires_grad=context_grad)
    return x, torch.zeros(batch, device="meta", dtype=torch.long), context


def _lora(module: torch.nn.Module, rank: int, targets: tuple[str, ...]) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), module)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)


def estimate_trial_memory(arch: Architecture, shape: TrialShape, scoring_bytes: int = 0) -> MemoryEstimate:
    """The estimated peak GPU memory of one trial (see the module docstring for the model)."""
    unet, text, vae = meta_modules(arch)
    unet.requires_grad_(False)
    text.requires_grad_(False)
    compute = shape.weight_dtype  # autocast's dtype on a GPU; fp32 without mixed precision
    bytes_of = _BYTES
    n_unet, n_text, n_vae = (arch.parameters(m) for m in ("unet", "text_encoder", "vae"))
    weights = n_unet * bytes_of[shape.unet_dtype] + n_text * bytes_of[shape.text_encoder_dtype] + \
        n_vae * bytes_of[shape.weight_dtype]

    trainable = 0
    if shape.lora_rank:
        _lora(unet, shape.lora_rank, shape.lora_targets)
        trainable += sum(p.numel() for p in unet.parameters() if p.requires_grad)
        if shape.lora_text_targets:
            _lora(text, shape.lora_rank, shape.lora_text_targets)
            trainable += sum(p.numel() for p in text.parameters() if p.requires_grad)
        weights += trainable * 4  # the adapters sit beside the frozen weights, fp32
    if shape.train_unet:
        unet.requires_grad_(True)
        trainable += n_unet
    if shape.train_text_encoder and not shape.lora_rank:
        text.requires_grad_(True)
        trainable += n_text
    if shape.ti_vectors:
        trainable += shape.ti_vectors * int(arch.text_encoder["hidden_size"])
        weights += shape.ti_vectors * int(arch.text_encoder["hidden_size"]) * 4

    # Modules in the dtypes the trainer keeps them in; the forward casts as autocast does.
    unet.to(shape.unet_dtype)
    text.to(shape.text_encoder_dtype)
    vae.to(shape.weight_dtype)
    context_grad = shape.ti_vectors > 0 or shape.train_text_encoder
    x, t, c = _unet_inputs(arch, shape.batch, shape.resolution, compute, context_grad)
    training = training_activation_bytes(unet, lambda: unet(x, t, c), shape.gradient_checkpointing, compute)
    if context_grad:  # the text encoder's own forward, kept for the gradient into it
        if shape.ti_vectors:
            text.get_input_embeddings().weight.requires_grad_(True)  # stands for the new rows
        ids = torch.zeros(shape.batch, int(arch.text_encoder.get("max_position_embeddings", 77)),
                          dtype=torch.long, device="meta")
        training += training_activation_bytes(text, lambda: text(ids), compute=compute)

    unet.requires_grad_(False)
    xs, ts, cs = _unet_inputs(arch, 2 * shape.eval_batch, arch.default_resolution, compute)
    largest = largest_output_bytes(unet, lambda: unet(xs, ts, cs), compute)
    side = arch.default_resolution // arch.vae_scale
    z = torch.empty(shape.eval_batch, int(arch.vae.get("latent_channels", 4)), side, side, device="meta", dtype=compute)
    largest = max(largest, largest_output_bytes(vae, lambda: vae.decode(z), compute))

    optimizer = trainable * _ADAM_STATE_BYTES.get(shape.optimizer, 8)
    parts = {"weights": float(weights), "gradients": float(trainable * 4),
             "optimizer": float(optimizer), "ema": float(n_unet * 4 if shape.ema else 0),
             "training": float(training), "sampling": float(largest * SAMPLING_LIVE),
             "scoring": float(scoring_bytes)}
    return MemoryEstimate(shape, parts)


def weight_file_bytes(directory: Path) -> int:
    """Bytes of the weight files in a model directory (scoring models load them in fp32)."""
    return sum(p.stat().st_size for p in directory.rglob("*")
               if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt"))


# Stable Diffusion 1.x's architecture (the configs of stable-diffusion-v1-5, spelled as
# overrides of the diffusers / transformers defaults): the reference for documented figures,
# benchmarks and tests, where no real SD 1.5 directory is on disk.
SD15 = Architecture(
    unet={"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
          "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2},
    text_encoder={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768,
                  "hidden_act": "quick_gelu"},
    vae={"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4, "sample_size": 512,
         "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4},
    source="stable-diffusion-v1-5 (architecture only)",
)
