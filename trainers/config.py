"""Typed, frozen configuration for one training run, and YAML loading with precise errors.

Every config object is a pydantic model with ``extra="forbid"`` and ``frozen=True``: an unknown
key or a bad value is an error that names the file and the dotted key, and nothing mutates a
config after validation (docs/ARCHITECTURE.md, rules 1 and 2).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainers.data import DataConfig
from trainers.errors import ConfigError as ConfigError  # re-exported (defined light for the CLI)
from trainers.paths import LOCAL_PATH, MAYBE_PATH


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` and ``1.0e5`` as floats.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so ``1e-4`` is the
    *string* "1e-4": harmless for a float field (rejected as a non-number) but a silent type
    change inside categorical ``choices``. YAML 1.2 reads these as numbers, as users expect.
    """


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML with :class:`YamlLoader` (safe, YAML 1.2 floats)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


class Frozen(BaseModel):
    """Base for every config section: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Frozen):
    """Which base model to fine-tune and how it may be loaded."""

    source: str = Field(min_length=1, description="builtin:tiny-sd, a diffusers dir, a .safetensors file or a hub id",
                        json_schema_extra=MAYBE_PATH)
    allow_pickle: bool = False
    single_file_config: str | None = Field(None, json_schema_extra=MAYBE_PATH)
    revision: str | None = None


LRScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]


class TrainConfig(Frozen):
    """Hyperparameters shared by every method (the trainer base class reads these)."""

    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    lr_scheduler: LRScheduler = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    max_train_steps: int = Field(100, gt=0)
    train_batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    # "auto": bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU.
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    # Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the paper's recommended value.
    snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0, le=1.0)
    # None: use the base model's scheduler config (epsilon for SD 1.x, v_prediction for SD 2.x-v).
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    checkpointing_steps: int | None = Field(None, gt=0)
    checkpoints_total_limit: int | None = Field(None, gt=0)
    device: str | None = None
    # False: `learning_rate` is the rate AdamW uses (diffusers' scripts' default). True: it is a
    # per-sample rate, multiplied by train_batch_size x gradient_accumulation_steps (diffusers'
    # --scale_lr on one process; A1111 and kohya never scale). Logged as used (`lr`).
    scale_lr: bool = False

    @property
    def effective_learning_rate(self) -> float:
        """The rate the optimizer is given (before the schedule): see ``scale_lr``."""
        if not self.scale_lr:
            return self.learning_rate
        return self.learning_rate * self.train_batch_size * self.gradient_accumulation_steps

    @property
    def effective_lr_scheduler(self) -> str:
        """The schedule as run: warm-up applies to every schedule, so ``constant`` with
        ``lr_warmup_steps > 0`` runs as diffusers' ``constant_with_warmup`` (diffusers'
        ``get_scheduler`` would otherwise ignore the warm-up of ``constant`` without a word)."""
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            return "constant_with_warmup"
        return self.lr_scheduler

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainConfig":
        if self.lr_warmup_steps > self.max_train_steps:
            raise ValueError(
                f"lr_warmup_steps ({self.lr_warmup_steps}) exceeds max_train_steps "
                f"({self.max_train_steps}); lower lr_warmup_steps"
            )
        return self


class LoraSettings(Frozen):
    """LoRA on the UNet attention projections (and optionally the text encoder), via peft."""

    rank: int = Field(4, gt=0, le=1024)
    alpha: float | None = Field(None, gt=0, description="None means alpha = rank (scale 1.0)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    init: Literal["gaussian", "default"] = "gaussian"
    train_text_encoder: bool = False
    text_encoder_lr: float | None = Field(None, gt=0, le=1.0)
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")

    @field_validator("target_modules", "text_encoder_target_modules")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("must list at least one module name")
        return v

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class TextualInversionSettings(Frozen):
    """Textual inversion: new token embeddings for the concept; every model weight stays frozen.

    ``placeholder_token`` is the text that names the concept in the captions and prompts (default:
    the run's ``token``, in a sweep the evaluation's ``token``). It must not already be one token of
    the tokenizer's vocabulary. With ``vectors_per_token`` n > 1 the tokenizer gets ``tok``,
    ``tok_1`` ... ``tok_{n-1}`` (diffusers' naming, which ``load_textual_inversion`` expands).
    """

    placeholder_token: str | None = Field(None, min_length=1)
    # 75 is the most a CLIP prompt holds (77 positions less start and end): more could never fit.
    vectors_per_token: int = Field(1, ge=1, le=75)
    # Text whose token embeddings start the vectors (spread over them in order, A1111's rule);
    # None: every vector starts at the mean of the vocabulary's embeddings.
    initializer: str | None = Field(None, min_length=1)

    @field_validator("placeholder_token")
    @classmethod
    def _no_edge_space(cls, v: str | None) -> str | None:
        if v is not None and v != v.strip():
            raise ValueError(f"placeholder_token {v!r} has leading or trailing spaces; remove them")
        return v


class DreamBoothSettings(Frozen):
    """DreamBooth: the whole UNet is fine-tuned (optionally the text encoder too), optionally with
    prior preservation on class images and an EMA of the UNet (docs/METHODS.md).

    Prior preservation: ``prior_loss_weight`` > 0 with ``class_prompt`` (the base model draws
    ``num_class_images`` class images once, content-addressed in the cache) or ``class_data_path``
    (a folder of captioned class images, which goes through the same preflight). Each step then
    trains on a batch of instance and a batch of class examples in one forward pass.
    """

    train_text_encoder: bool = False
    text_encoder_lr: float | None = Field(None, gt=0, le=1.0, description="default: train.learning_rate")
    # AdamW, or bitsandbytes' 8-bit AdamW (CUDA only, the `bnb` extra): never a silent fallback.
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    prior_loss_weight: float = Field(0.0, ge=0.0, description="0: no prior preservation")
    # One prompt, or several used in turn (class image i gets prompt i mod len).
    class_prompt: tuple[str, ...] | None = Field(None, min_length=1)
    class_data_path: str | None = Field(None, json_schema_extra=LOCAL_PATH)
    num_class_images: int = Field(100, ge=1, description="class images used (the first N)")
    # How class images are drawn (diffusers' DreamBooth script: 50 steps of the model's sampler,
    # guidance 7.5); image i uses seed class_seed + i.
    class_sampler: Literal["ddim", "dpmsolver++", "euler"] = "ddim"
    class_steps: int = Field(50, ge=1)
    class_guidance_scale: float = 7.5
    class_seed: int = 0
    # An exponential moving average of the UNet's weights (diffusers' EMAModel, with its warm-up:
    # decay min(ema_decay, 1 - (1 + step)^-2/3)); when on, evaluations and exports use it.
    use_ema: bool = False
    ema_decay: float = Field(0.999, gt=0, lt=1)

    @field_validator("class_prompt", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _prior_needs_class_images(self) -> "DreamBoothSettings":
        if self.prior_loss_weight > 0 and (self.class_prompt is None) == (self.class_data_path is None):
            raise ValueError("prior preservation (prior_loss_weight > 0) needs exactly one of class_prompt "
                             "(class images drawn by the base model) or class_data_path (your own folder)")
        return self

    @property
    def prior_preservation(self) -> bool:
        """Whether training adds the class (prior) term."""
        return self.prior_loss_weight > 0


# method -> the RunConfig key of its settings section (the registry in trainers/__init__.py names
# the same sections; tests/test_trainer_contract.py checks the two agree).
METHOD_SECTIONS: dict[str, str] = {"lora": "lora", "textual_inversion": "textual_inversion",
                                    "dreambooth": "dreambooth"}
Method = Literal["lora", "textual_inversion", "dreambooth"]


class RunConfig(Frozen):
    """One training run: `sdsweep train CONFIG.yaml`.

    ``method`` selects its settings section (``lora:``, ``textual_inversion:``); the section of
    another method is an error naming the key, and the selected one defaults to its defaults.
    """

    model: ModelSpec
    data: DataConfig
    method: Method = "lora"
    # The words that name the concept in the captions (e.g. "sks shape"); a sweep fills it from
    # its evaluation's `token`. Textual inversion turns it into its placeholder token.
    token: str | None = Field(None, min_length=1)
    train: TrainConfig = TrainConfig()
    lora: LoraSettings | None = None
    textual_inversion: TextualInversionSettings | None = None
    dreambooth: DreamBoothSettings | None = None
    output_dir: str = Field("outputs/run", json_schema_extra=LOCAL_PATH)
    cache_dir: str | None = Field(None, json_schema_extra=LOCAL_PATH)

    @model_validator(mode="before")
    @classmethod
    def _model_shorthand(cls, data: Any) -> Any:
        # `model: builtin:tiny-sd` is accepted as shorthand for `model: {source: builtin:tiny-sd}`.
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            data = {**data, "model": {"source": data["model"]}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _native_resolution(cls, data: Any) -> Any:
        # data.resolution defaults to the base model's own, read from its configs (no weights):
        # 512 for SD 1.5. Filled here, where every run config is made (a sweep's base, `sdsweep
        # train`, `sdsweep init`'s check), so everything that reads it sees the same number; an
        # explicit value always wins, and a dumped config carries the filled one.
        if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
            return data
        if data["data"].get("resolution") is not None:
            return data
        model = data.get("model")
        try:
            spec = ModelSpec.model_validate({"source": model} if isinstance(model, str) else model)
        except ValidationError:
            return data  # the model's own errors are reported, and the missing resolution beside them
        from trainers.model_configs import native_resolution

        try:
            resolution = native_resolution(spec)
        except (ValueError, OSError) as err:  # ModelLoadError is a ValueError
            raise ValueError(f"data.resolution: not set, and the base model's native resolution (its default) "
                             f"could not be read: {err}. Set data.resolution (e.g. 512 for SD 1.5), or fix "
                             "`model`") from None
        return {**data, "data": {**data["data"], "resolution": resolution}}

    @model_validator(mode="before")
    @classmethod
    def _method_section(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        method = data.get("method", "lora")
        if method not in METHOD_SECTIONS:
            return data  # the Literal reports it, listing the valid methods
        own = METHOD_SECTIONS[method]
        stray = [s for s in METHOD_SECTIONS.values() if s != own and data.get(s) is not None]
        if stray:
            raise ValueError(f"{stray[0]}: a settings section of another method (this run's method is "
                             f"{method!r}); remove it, or set `method:` to the method it belongs to")
        section = dict(data.get(own) or {})
        if method == "textual_inversion" and section.get("placeholder_token") is None:
            if data.get("token") is None:
                raise ValueError("textual_inversion.placeholder_token: not set and no `token` to take it from; "
                                 "set one of them to the text that names the concept in the captions, "
                                 "e.g. '<my-concept>'")
            section["placeholder_token"] = data["token"]
        return {**data, own: section}

    @property
    def settings(self) -> Frozen:
        """The selected method's settings section."""
        out = getattr(self, METHOD_SECTIONS[self.method])
        assert out is not None  # filled by _method_section
        return out


C = TypeVar("C", bound=BaseModel)


def format_validation_error(err: ValidationError, source: str) -> str:
    """Render pydantic errors as `source: key.path: message` lines a user can act on."""
    lines = [f"{source}: invalid configuration ({err.error_count()} problem(s)):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling (see docs/CONFIG.md)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"]
            if "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        if not e["loc"] and e["type"] == "value_error":
            # A whole-config check; its message starts with the key(s) it is about.
            lines.append(f"  {msg.removeprefix('Value error, ')}")
            continue
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def validate_mapping(data: Any, cls: type[C], source: str) -> C:
    """Validate a plain mapping into ``cls``; raise ConfigError naming ``source`` and each key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file, turning I/O and syntax errors into ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found; check the path")
    try:
        return yaml_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None


def load_config(path: str | Path, cls: type[C]) -> C:
    """Load and validate a YAML config file into ``cls``."""
    return validate_mapping(read_yaml(path), cls, str(path))
