"""What a training method declares: the hooks every ``Trainer`` subclass implements or overrides.

The shared loop (trainers/base.py, :class:`~trainers.base.Trainer`) calls these and nothing else
that differs between methods; ``sweeps/`` reads the class-level ones (what a sweep builds once,
which keys change a method's dtypes or memory, what ``sdsweep init`` writes) without a trainer.
docs/METHODS.md, "Adding a method", lists them with what each is for.
"""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch

from trainers.latents import CachedDataset, tokenize


class MethodHooks(abc.ABC):
    """The method's side of the Trainer: abstract hooks, and defaults a method may override."""

    method: ClassVar[str]

    # Run-config keys (besides train.mixed_precision) whose value changes ``base_dtypes``: a sweep
    # scores its baseline once for every sampling placement its trials can have (sweeps/baseline.py).
    dtype_keys: ClassVar[tuple[str, ...]] = ()

    # Run-config keys that size the method's extra data (``prepare_extra``): a sweep builds it
    # once for the largest value its search space can give each of them.
    extra_data_keys: ClassVar[tuple[str, ...]] = ()

    # Run-config keys of this method that a sweep builds once for all its trials (its extra data
    # beyond ``extra_data_keys``), with why and the fix: a search space may not search them
    # (``sweeps.searched.check_searched_keys``), since every trial would get the one build.
    fixed_keys: ClassVar[dict[str, str]] = {}


    @abc.abstractmethod
    def configure_trainable(self) -> list[dict[str, Any]]:
        """Make the method's parameters trainable; return AdamW param groups (``params``, ``lr``)."""

    @abc.abstractmethod
    def export_weights(self, directory: Path) -> Path:
        """Write the method's deliverable weights (the format people load) into ``directory``."""

    @abc.abstractmethod
    def restore_base_model(self) -> None:
        """Undo what this method added to the base model (adapters, tokens, weights).

        Must work after a partial setup too (called when ``__init__`` raised): remove only what
        is there, and never raise because something was not added yet.
        """

    @classmethod
    @abc.abstractmethod
    def loaded_for_evaluation(cls, model: Any, checkpoint: Path) -> contextlib.AbstractContextManager[Any]:
        """A context yielding the model to sample: ``model`` carrying ``checkpoint``'s weights,
        loaded the way a user loads the export (diffusers' own loaders); after it ``model`` is
        exactly as it was."""

    @classmethod
    @abc.abstractmethod
    def export_files(cls, checkpoint: Path, dest: Path, name: str, provenance: dict[str, Any]) -> list[str]:
        """Write ``checkpoint``'s weights into ``dest`` in every format people load (diffusers and
        the single files A1111 / ComfyUI / kohya read), the community files named after ``name``
        (the run id) where the format needs a name, with ``provenance`` (why it was picked, its
        scores) in their metadata. Returns the file names written."""

    @classmethod
    def prepare_extra(cls, cfg: Any, model: Any, device: torch.device | str) -> tuple[dict[str, CachedDataset],
                                                                                      dict[str, Any]]:
        """Datasets besides the instance images that this method trains on, built once (per run,
        or per sweep in the cache task) and shared by every trial, with a report of what was
        built. ``cfg`` is the run config (in a sweep: with ``extra_data_keys`` at their largest)."""
        return {}, {}

    # Run-config keys :meth:`check_run` depends on: a sweep checks the run config at every value of
    # them its search space bounds (a range's ends, each choice), in every combination.
    check_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_run(cls, cfg: Any, captions: Sequence[str], validation_captions: Sequence[str],
                  tokenizer: Callable[[], Any]) -> None:
        """Raise ValueError (naming the key and the fix) where this method's setup would refuse run
        config ``cfg`` on a dataset with these training and validation captions; ``tokenizer()``
        gives the base model's tokenizer, loaded alone (no weights) on first use. The setup runs the
        same checks; a sweep runs this before Ray, the cache build or the baseline start, and
        ``sdsweep init`` before it writes. Nothing by default."""

    @classmethod
    def extra_data_summary(cls, cfg: Any) -> list[str]:
        """What :meth:`prepare_extra` would build for run config ``cfg``, in words (one line each;
        the cost ``sdsweep init`` prints). Nothing by default."""
        return []

    @classmethod
    def caches_text(cls, settings: Any) -> bool:
        """Whether a run with ``settings`` may read text-encoder outputs from the frozen-encoder
        cache (False when training changes them: they would be silently stale)."""
        return True

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the text encoder's output changes during training (then it is not cached)."""
        return False

    @classmethod
    def base_dtypes(cls, settings: Any, weight_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
        """The dtypes (UNet, text encoder) a run with ``settings`` keeps the shared base model's
        modules in, given the frozen-weight dtype: the one source of ``unet_dtype`` and
        ``text_encoder_dtype``, read before a trainer exists by code that keys a worker's base model
        on it (a module cast down by one trial cannot serve a trial that needs it in fp32)."""
        return weight_dtype, weight_dtype

    # Sweep-file keys whose value changes a run's GPU memory (`sdsweep plan` takes the worst value
    # a search space can give each); methods add their own.
    memory_keys: tuple[str, ...] = ("train.train_batch_size", "train.gradient_checkpointing", "train.mixed_precision",
                                    "data.resolution")

    # What `sdsweep init` writes for this method (sweeps/init.py): training steps per trial at
    # batch 1 for an SD 1.x-size model, and whether the concept's token must be new to the
    # tokenizer (a placeholder the method adds).
    init_steps: int = 800
    needs_new_token: bool = False

    @classmethod
    def init_lines(cls, token: str, class_prompt: str | None) -> tuple[list[str], list[str]]:
        """``sdsweep init``'s YAML for this method: its settings section under ``base`` (lines at
        two spaces) and its entry under ``search.spaces`` (lines at four), commented."""
        return [], [f"    - {cls.method:<27}# search_spaces/{cls.method}.yaml"]

    @classmethod
    def memory_profile(cls, settings: Any) -> dict[str, Any]:
        """What a run with ``settings`` trains, for the GPU memory estimate (trainers/memory.py,
        ``TrialShape`` fields: ``lora_rank``/``lora_targets``/``lora_text_targets``, ``train_unet``,
        ``train_text_encoder``, ``ti_vectors``, ``optimizer``, ``ema``) and ``batch_factor``, the
        examples through the UNet per instance example (``examples_per_step`` over the batch)."""
        return {}

    @classmethod
    def memory_savers(cls, settings: Any) -> list[str]:
        """Settings that lower this method's GPU memory, named as sweep-file keys (the fix a
        refused packing suggests)."""
        return ["train.gradient_checkpointing: true", "a smaller train.train_batch_size or data.resolution"]

    @property
    def examples_per_step(self) -> int:
        """Examples one optimizer step puts through the UNet (``images_seen`` counts these)."""
        return self.cfg.train_batch_size * self.cfg.gradient_accumulation_steps

    @property
    def unet_dtype(self) -> torch.dtype:
        """The dtype the UNet's weights are kept in (default: the weight dtype of frozen modules;
        a method that trains the UNet's own weights keeps them fp32)."""
        return self.weight_dtype

    def make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The optimizer over ``groups`` (default: torch's AdamW with the ``train`` settings)."""
        cfg = self.cfg
        return torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)

    @property
    def text_encoder_dtype(self) -> torch.dtype:
        """The dtype the text encoder runs in (default: the weight dtype of frozen modules)."""
        return self.weight_dtype

    def after_optimizer_step(self) -> None:
        """Called after every applied optimizer step (a method's EMA update goes here)."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors besides the trainable weights and optimizer that a bit-exact resume needs
        (saved in the checkpoint's resume state; e.g. EMA weights)."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`extra_state` saved."""

    def tensors_in_export(self, directory: Path) -> dict[str, tuple[str, str]]:
        """Resume tensors (``param.<trainable name>``, ``extra.<extra_state key>``) that the export
        just written into ``directory`` holds exactly: name -> (file relative to ``directory``, key).
        They are not stored a second time (trainers/checkpoints.py); default: none."""
        return {}

    def tokenize_captions(self, captions: list[str]) -> torch.Tensor:
        """Token ids of ``captions`` as this method trains on them (padded to the model's length)."""
        return tokenize(self.model.tokenizer, captions)

    @contextlib.contextmanager
    def evaluation_model(self) -> Iterator[Any]:
        """The model to sample at an evaluation: by default the live model (the method's weights
        are on it); a method whose live training state differs from what it exports overrides this
        to load its export instead, so what is scored is what is shipped."""
        self.prepare_for_sampling()
        yield self.model
