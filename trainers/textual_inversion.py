"""Textual inversion: new token embeddings that name a concept; every model weight stays frozen.

The placeholder (``textual_inversion.placeholder_token``, default the run's ``token``) becomes
``vectors_per_token`` new tokens, ``tok``, ``tok_1`` ... (diffusers' naming, which
``load_textual_inversion`` expands in prompts), and every training caption is tokenized with the
expanded string, so every vector receives gradient (diffusers#4450 trained only the first).

Only the new rows can change, by construction: the tokenizer gets the new tokens in a copy owned by
the trainer, and the text encoder's token embedding is wrapped by :class:`ConceptEmbedding`, which
reads the new ids from one small trainable ``[n, dim]`` parameter and every other id from the
untouched base matrix. diffusers' and kohya's scripts instead train the whole ``[V, dim]`` matrix
and copy the other rows back after every optimizer step (weight decay would otherwise move them:
diffusers#507/#1009/#1176); here those rows are not parameters at all, so they cannot move, and
AdamW keeps state for ``n x dim`` numbers instead of ``V x dim`` (SD 1.5: 2 x 152 MB less).
Teardown puts the base embedding module back; the shared tokenizer is never changed.

The text encoder runs in fp32 (the gradient reaches the new rows through all of it) and its outputs
are computed every step; image latents still come from the shared latent cache.

Exports: ``learned_embeds.safetensors`` (diffusers' layout ``{placeholder: [n, dim]}``), and for
AUTOMATIC1111 / ComfyUI / kohya a one-tensor file ``{"emb_params": [n, dim]}`` named after the
placeholder (A1111 and ComfyUI name an embedding by its file stem; ComfyUI's ``embedding:NAME``
ends at a space, so the stem has none). docs/METHODS.md has the rules each loader follows.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainers.base import Trainer
from trainers.config import TextualInversionSettings, TrainConfig
from trainers.latents import CachedDataset, tokenize
from trainers.tensor_files import atomic_save_safetensors

WEIGHTS = "learned_embeds.safetensors"  # diffusers' file name and layout
COMMUNITY_KEY = "emb_params"  # kohya's key; A1111 and ComfyUI read a file's only tensor


def token_names(placeholder: str, vectors: int) -> list[str]:
    """The tokens one placeholder becomes: ``tok``, ``tok_1`` ... ``tok_{n-1}`` (diffusers)."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, vectors)]


def community_name(placeholder: str) -> str:
    """The file stem A1111 / ComfyUI users type: the placeholder with every run of characters other
    than letters, digits, ``-`` and ``_`` made one ``-`` (``<sks shape>`` -> ``sks-shape``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", placeholder).strip("-")


def spread(k: int, n: int) -> list[int]:
    """Which of ``k`` initializer tokens starts each of ``n`` vectors: vector ``i`` takes token
    ``floor(i * k / n)`` (A1111's rule), so the initializer's tokens stay in order, each over a
    contiguous block of vectors (k=2, n=4: 0 0 1 1; k=4, n=2: 0 2)."""
    return [i * k // n for i in range(n)]


def expanded(text: str, placeholder: str, tokens: Sequence[str]) -> str:
    """``text`` with the placeholder written as all its tokens (what the text encoder reads)."""
    return text.replace(placeholder, " ".join(tokens))


def check_new_tokens(tok: Any, placeholder: str, tokens: Sequence[str]) -> None:
    """Every token to add must be new: not in the vocabulary, not added before, and the
    placeholder not already one token (CLIP's vocabulary has ``sks</w>``, not ``sks``)."""
    vocab = tok.get_vocab()
    taken = [t for t in tokens if t in vocab]
    one = tok(placeholder, add_special_tokens=False).input_ids
    if not taken and len(one) == 1 and one[0] != tok.unk_token_id:
        taken = [placeholder]
    if taken:
        raise ValueError(f"textual_inversion.placeholder_token {placeholder!r}: {taken[0]!r} is already a "
                         "token of the base model's vocabulary, so its meaning cannot be learned anew; "
                         "choose a new string such as '<my-concept>'")


def with_new_tokens(tok: Any, placeholder: str, tokens: Sequence[str]) -> tuple[Any, int]:
    """A copy of ``tok`` with ``tokens`` added, and the first new id; refused unless the copy
    reads the expanded placeholder back as exactly those consecutive new ids."""
    tok = copy.deepcopy(tok)
    tok.add_tokens(list(tokens))
    ids = tok.convert_tokens_to_ids(list(tokens))
    first = ids[0]
    if ids != list(range(first, first + len(ids))) or tok(expanded(placeholder, placeholder, tokens),
                                                          add_special_tokens=False).input_ids != ids:
        raise ValueError(f"textual_inversion.placeholder_token {placeholder!r}: the tokenizer does not "
                         "read it back as its own new token(s) (its normalizer changes the text); use a "
                         "lowercase placeholder such as '<my-concept>'")
    return tok, first


def initializer_ids(tok: Any, text: str) -> list[int]:
    """The token ids of ``textual_inversion.initializer``; refused if the tokenizer cannot encode it."""
    ids = tok(text, add_special_tokens=False).input_ids
    if not ids or tok.unk_token_id in ids:
        raise ValueError(f"textual_inversion.initializer {text!r}: the tokenizer cannot encode it "
                         f"({'no tokens' if not ids else 'unknown characters'}); use words the base "
                         "model knows, e.g. the concept's class ('dog', 'shape')")
    return ids


def check_captions(tok: Any, placeholder: str, tokens: Sequence[str], captions: Sequence[str],
                   validation_captions: Sequence[str] = ()) -> None:
    """Every caption must fit the text encoder once expanded (truncation would silently cut
    vectors off), and at least one training caption must contain the placeholder (else nothing
    trains). ``tok`` is the tokenizer with the new tokens (:func:`with_new_tokens`)."""
    limit = tok.model_max_length
    if not any(placeholder in c for c in captions):
        example = f" (e.g. {captions[0]!r})" if captions else ""
        raise ValueError(f"textual_inversion.placeholder_token {placeholder!r} appears in none of the "
                         f"training captions{example}; put it in the captions or set "
                         "it (or `token`) to the words that name the concept there")
    for c in sorted(set(captions) | set(validation_captions)):
        n = len(tok(expanded(c, placeholder, tokens)).input_ids)
        if n > limit:
            raise ValueError(f"caption {c!r} becomes {n} tokens with {len(tokens)} vectors per "
                             f"token, more than the text encoder's {limit}: lower "
                             "textual_inversion.vectors_per_token or shorten the caption")


class ConceptEmbedding(torch.nn.Module):
    """A token embedding with ``rows`` for the ids ``first_id ...`` beside the frozen ``base``.

    Ids below ``first_id`` read ``base`` (never written); the new ids read ``rows``, the only
    trainable parameter. Installed with ``set_input_embeddings`` for a trainer's lifetime.
    """

    def __init__(self, base: torch.nn.Embedding, first_id: int, rows: torch.Tensor) -> None:
        super().__init__()
        self.base, self.first_id = base, first_id
        self.rows = torch.nn.Parameter(rows)

    @property
    def weight(self) -> torch.Tensor:
        """The base matrix, for code that reads an input embedding's device or dtype."""
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first_id
        out = self.base(torch.where(new, 0, ids))
        extra = self.rows[(ids - self.first_id).clamp(min=0, max=len(self.rows) - 1)]
        return torch.where(new.unsqueeze(-1), extra.to(out.dtype), out)


class TextualInversionTrainer(Trainer):
    """Textual inversion on a frozen base model (see the module docstring)."""

    method = "textual_inversion"

    def __init__(self, model: Any, data: CachedDataset, cfg: TrainConfig, ti: TextualInversionSettings,
                 output_dir: str | Path, validation_data: CachedDataset | None = None,
                 extra: dict[str, CachedDataset] | None = None) -> None:
        if ti.placeholder_token is None:
            raise ValueError("textual_inversion.placeholder_token is not set (RunConfig fills it from `token`)")
        self.ti = ti
        self.placeholder: str = ti.placeholder_token
        self.tokens = token_names(self.placeholder, ti.vectors_per_token)
        self.tokenizer: Any = None  # the trainer's own copy with the new tokens
        self._embedding: ConceptEmbedding | None = None
        super().__init__(model, data, cfg, output_dir, validation_data, extra)

    memory_keys = (*Trainer.memory_keys, "textual_inversion.vectors_per_token")
    init_steps = 1500
    needs_new_token = True  # the placeholder is added to the tokenizer

    @classmethod
    def init_lines(cls, token: str, class_prompt: str | None) -> tuple[list[str], list[str]]:
        section = ["  textual_inversion:", f"    placeholder_token: {json.dumps(token)}"]
        if class_prompt:
            section.append(f"    initializer: {json.dumps(class_prompt.split()[-1])}   # the vectors start at the class word")
        return section, super().init_lines(token, class_prompt)[1]

    @classmethod
    def memory_profile(cls, settings: TextualInversionSettings) -> dict[str, Any]:
        return {"ti_vectors": settings.vectors_per_token}

    @classmethod
    def caches_text(cls, settings: TextualInversionSettings) -> bool:
        return False  # the new rows change the text encoder's output at every step

    @property
    def trains_text_encoder(self) -> bool:
        return True

    @classmethod
    def base_dtypes(cls, settings: TextualInversionSettings, weight_dtype: torch.dtype
                    ) -> tuple[torch.dtype, torch.dtype]:
        return weight_dtype, torch.float32  # the new rows' gradient flows through the text encoder

    @property
    def text_encoder_dtype(self) -> torch.dtype:
        return self.base_dtypes(self.ti, self.weight_dtype)[1]

    # ----- setup ---------------------------------------------------------------------------------

    def configure_trainable(self) -> list[dict[str, Any]]:
        base_tok = self.model.tokenizer
        check_new_tokens(base_tok, self.placeholder, self.tokens)
        tok, first = with_new_tokens(base_tok, self.placeholder, self.tokens)
        self.tokenizer = tok
        base = self.model.text_encoder.get_input_embeddings()
        rows = self._initial_rows(base_tok, base.weight.detach()).to(self.device, torch.float32)
        check_captions(tok, self.placeholder, self.tokens, self.data.captions,
                       self.validation_data.captions if self.validation_data else [])
        self._embedding = ConceptEmbedding(base, first, rows)
        self.model.text_encoder.set_input_embeddings(self._embedding)
        return [{"params": [self._embedding.rows], "lr": self.cfg.learning_rate}]

    check_keys = ("textual_inversion.placeholder_token", "textual_inversion.vectors_per_token",
                  "textual_inversion.initializer")

    @classmethod
    def check_run(cls, cfg: Any, captions: Sequence[str], validation_captions: Sequence[str],
                  tokenizer: Callable[[], Any]) -> None:
        """The checks of :meth:`configure_trainable` that need only the tokenizer and the captions
        (the same functions): a new placeholder, read back as its own tokens, an initializer the
        tokenizer encodes, captions that name it and fit the text encoder once expanded."""
        ti = cfg.settings
        tokens = token_names(ti.placeholder_token, ti.vectors_per_token)
        base_tok = tokenizer()
        check_new_tokens(base_tok, ti.placeholder_token, tokens)
        tok, _ = with_new_tokens(base_tok, ti.placeholder_token, tokens)
        if ti.initializer is not None:
            initializer_ids(base_tok, ti.initializer)
        check_captions(tok, ti.placeholder_token, tokens, captions, validation_captions)

    def _initial_rows(self, tok: Any, weight: torch.Tensor) -> torch.Tensor:
        """Starting vectors: the initializer's token embeddings spread over the vectors
        (:func:`spread`), or without an initializer the mean of the vocabulary's embeddings."""
        n = self.ti.vectors_per_token
        text = self.ti.initializer
        if text is None:
            return weight[: len(tok)].float().mean(dim=0).expand(n, -1).clone()
        ids = initializer_ids(tok, text)
        return weight[[ids[j] for j in spread(len(ids), n)]].float().clone()

    def _expanded(self, text: str) -> str:
        return expanded(text, self.placeholder, self.tokens)

    def tokenize_captions(self, captions: list[str]) -> torch.Tensor:
        return tokenize(self.tokenizer, [self._expanded(c) for c in captions])

    # ----- weights -------------------------------------------------------------------------------

    def learned_embeds(self) -> torch.Tensor:
        """The trained vectors, ``[vectors_per_token, dim]`` in fp32 on the CPU."""
        assert self._embedding is not None
        return self._embedding.rows.detach().float().cpu().clone()  # a copy, also on the CPU

    def export_weights(self, directory: Path) -> Path:
        """Write ``learned_embeds.safetensors`` that ``pipeline.load_textual_inversion`` loads."""
        info = {"method": self.method, "base_model": self.model.source,
                "base_model_identity": self.model.identity, "step": self.global_step,
                "placeholder_token": self.placeholder, "vectors_per_token": self.ti.vectors_per_token,
                "tokens": self.tokens, "prediction_type": self.prediction_type, "dataset_key": self.data.key,
                "learning_rate_as_used": self.cfg.effective_learning_rate,
                "train": self.cfg.model_dump(mode="json"), "textual_inversion": self.ti.model_dump(mode="json")}
        path = Path(directory) / WEIGHTS
        atomic_save_safetensors({self.placeholder: self.learned_embeds()}, path,
                                {"format": "pt", "sdsweep": json.dumps(info, sort_keys=True)})
        return path

    @classmethod
    def export_files(cls, checkpoint: Path, dest: Path, name: str, provenance: dict[str, Any]) -> list[str]:
        """``learned_embeds.safetensors`` as saved, plus ``<placeholder>.safetensors`` holding only
        ``emb_params`` (A1111 refuses a file with more than one tensor) with the provenance in its
        metadata. ``name`` (the run id) is used only when the placeholder has no usable characters."""
        src = Path(checkpoint) / WEIGHTS
        shutil.copy2(src, Path(dest) / WEIGHTS)
        with safe_open(str(src), framework="pt") as f:
            meta = f.metadata() or {}
        ((placeholder, rows),) = load_file(str(src)).items()
        single = f"{community_name(placeholder) or name + '-embedding'}.safetensors"
        atomic_save_safetensors({COMMUNITY_KEY: rows}, Path(dest) / single, {
            "format": "pt", "sdsweep": meta.get("sdsweep", "{}"), "sdsweep_placeholder": placeholder,
            "sdsweep_best": json.dumps(provenance, sort_keys=True, default=str)})
        return [WEIGHTS, single]

    # ----- evaluation and teardown ---------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def loaded_for_evaluation(cls, model: Any, checkpoint: Path) -> Iterator[Any]:
        """``model`` with a fresh copy of its tokenizer into which ``pipeline.load_textual_inversion``
        (what users call) loads ``checkpoint``'s embedding; the text encoder's embedding matrix and
        vocabulary size are put back on exit (the loader resizes the matrix)."""
        te = model.text_encoder
        module, vocab_size = te.get_input_embeddings(), te.config.vocab_size
        # transformers' resize keeps the module and its Parameter and swaps the Parameter's data.
        weight, saved = module.weight, (module.weight.data, module.num_embeddings, module.padding_idx)
        sampled = dataclasses.replace(model, tokenizer=copy.deepcopy(model.tokenizer))
        try:
            sampled.pipeline().load_textual_inversion(str(Path(checkpoint) / WEIGHTS))
            yield sampled
        finally:
            weight.data, module.num_embeddings, module.padding_idx = saved
            module.weight = weight
            te.set_input_embeddings(module)
            te.config.vocab_size = vocab_size

    @contextlib.contextmanager
    def evaluation_model(self) -> Iterator[Any]:
        """The export of this step loaded into the base model the way users load it (what is scored
        is what is shipped), never the live training state."""
        assert self._embedding is not None
        te = self.model.text_encoder
        with tempfile.TemporaryDirectory(prefix="sdsweep-ti-") as tmp:
            self.export_weights(Path(tmp))
            te.set_input_embeddings(self._embedding.base)
            try:
                self.prepare_for_sampling()
                with self.loaded_for_evaluation(self.model, Path(tmp)) as sampled:
                    yield sampled
            finally:
                te.set_input_embeddings(self._embedding)

    def restore_base_model(self) -> None:
        """Put the base token embedding back (the shared tokenizer was never changed). Works after
        a setup that failed before or after the wrapper was installed."""
        te = self.model.text_encoder
        if self._embedding is not None and te.get_input_embeddings() is self._embedding:
            te.set_input_embeddings(self._embedding.base)
        self._embedding = None
        self.tokenizer = None
