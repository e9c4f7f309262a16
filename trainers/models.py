"""Load the base model a trial fine-tunes, from whatever form the user has it in.

Accepted ``model.base`` specs (``load_base_model``):

* ``builtin:tiny-sd`` -- the toy SD 1.x model (``trainers.tiny``), written once to the cache in
  the diffusers layout and loaded through the *same* directory code path as a real model.
* ``builtin:toyworld`` -- the pretrained toy world shipped in ``trainers/toyworld/weights``
  (docs/TOYWORLD.md), checked against its manifest, then loaded like any diffusers directory.
* a diffusers directory (``model_index.json`` + unet/ vae/ text_encoder/ tokenizer/ scheduler/).
* a single-file ``.safetensors`` checkpoint (original SD / A1111 / ComfyUI / kohya layout), with
  ``single_file_config`` naming a diffusers directory or Hub id of the same architecture.
* ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``: refused unless ``allow_pickle``; even then read with
  ``torch.load(weights_only=True)`` only, so a pickle that would run code is never run.
* ``org/name`` -- a Hugging Face Hub id (downloaded with diffusers, then loaded as a directory).

Every failure is a ``ModelLoadError`` naming the file/spec and the fix (rule 1).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import diffusers
import safetensors.torch
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from huggingface_hub import snapshot_download
from huggingface_hub.constants import is_offline_mode
from transformers import (
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
)

from trainers import single_file, tiny
from trainers.errors import ModelLoadError, PickleRefusedError
from trainers.fingerprints import identity_of_fingerprints, module_fingerprint
from trainers.fingerprints import weights_identity as weights_identity  # re-exported for callers
from trainers.paths import cache_root, materialize_dir
from trainers.pickles import BY_SCAN, PICKLE_SUFFIXES, load_weights_only, refuse_pickle, unsafe_globals, unsafe_pickle

BUILTIN_PREFIX = "builtin:"
# Bump the suffix whenever a builder's output changes, so stale caches are never reused.
BUILTIN_VERSION = "v1"
_BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-sd": tiny.build_tiny_sd,
    "tiny-clip": tiny.build_tiny_clip,
    "tiny-vit": tiny.build_tiny_vit,
}
# Built-ins shipped as files in the repository (pretrained, not buildable in a second).
_SHIPPED = ("toyworld",)
# Which built-ins can serve in which role; the toy world is a base model and its CLIP.
BUILTIN_ROLES: dict[str, tuple[str, ...]] = {
    "base model": ("tiny-sd", "toyworld"),
    "CLIP model": ("tiny-clip", "toyworld"),
    "vision model": ("tiny-vit",),
}
SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a Stable Diffusion repo needs besides weights (diffusers' own config-only pattern set).
_CONFIG_PATTERNS = ["*.json", "**/*.json", "*.txt", "**/*.txt"]
ACCEPTED_FORMS = (
    "builtin:tiny-sd or builtin:toyworld; a diffusers directory containing model_index.json; a single-file "
    ".safetensors checkpoint (with model.single_file_config); a .ckpt/.pt/.pth/.bin pickle "
    "(only with model.allow_pickle: true); or a Hugging Face Hub id 'org/name'"
)

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class BaseModel:
    """The loaded components of a Stable Diffusion 1.x-style model plus their identities.

    ``identity`` hashes the UNet, VAE and text-encoder weights, so the same weights give the same
    identity whether they came from a directory, a single file or the Hub (latent caches and
    results key on it). ``scheduler_config`` is the model's own scheduler config; do not mutate.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    noise_scheduler: DDPMScheduler
    scheduler_config: dict[str, Any]
    source: str
    identity: str
    vae_identity: str
    text_encoder_identity: str
    # How it was loaded (``ModelSpec``'s fields: source, allow_pickle, single_file_config,
    # revision): code that loads the same base model again (an export, the held-out confirmation)
    # passes this to :func:`load_model`, never the bare ``source``.
    load_spec: dict[str, Any] = field(default_factory=dict)

    def pipeline(self, scheduler: SchedulerMixin | None = None) -> StableDiffusionPipeline:
        """A ``StableDiffusionPipeline`` sharing these very modules (trained weights included).

        ``scheduler`` defaults to the model's own sampling scheduler (the class named in its
        scheduler config, e.g. DDIM or PNDM). No safety checker: we score our own samples.
        """
        if scheduler is None:
            scheduler = _sampling_scheduler(self.scheduler_config)
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def _sampling_scheduler(config: dict[str, Any]) -> SchedulerMixin:
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        cls = DDIMScheduler
    return cls.from_config(config)


def ensure_builtin(name: str) -> Path:
    """Build the built-in model ``name`` once into ``cache_root()/builtin/<name>-v1``; return it."""
    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in _BUILDERS:
        valid = ", ".join(BUILTIN_PREFIX + n for n in (*_BUILDERS, *_SHIPPED))
        raise ModelLoadError(f"unknown built-in model {name!r}; valid built-in models: {valid}")
    final = cache_root() / "builtin" / f"{key}-{BUILTIN_VERSION}"
    return materialize_dir(final, _BUILDERS[key])


_VERIFIED: set[Path] = set()


def shipped_dir(name: str) -> Path:
    """The directory of shipped built-in ``name``, verified against its manifest once per process."""
    from trainers import toyworld
    from trainers.toyworld.manifest import ManifestError, verify

    assert name == "toyworld", name
    root = toyworld.weights_dir()
    if root not in _VERIFIED:
        try:
            verify(root)
        except ManifestError as e:
            raise ModelLoadError(
                f"builtin:{name}: the shipped weights in {root} are damaged or missing ({e}). Restore them "
                f"with `git checkout -- {root}` or rebuild with `python -m trainers.toyworld build --overwrite`."
            ) from e
        _VERIFIED.add(root)
    return root


def builtin_dir(spec: str, role: str) -> Path:
    """The local directory of built-in ``spec`` in ``role`` (a key of ``BUILTIN_ROLES``)."""
    key = spec.removeprefix(BUILTIN_PREFIX)
    if key not in _BUILDERS and key not in _SHIPPED:
        ensure_builtin(spec)  # raises, listing every valid name
    names = BUILTIN_ROLES[role]
    if key not in names:
        valid = " or ".join(BUILTIN_PREFIX + n for n in names)
        raise ModelLoadError(f"{spec!r} is not a {role}; the built-in {role}s are {valid}")
    if key in _SHIPPED:
        root = shipped_dir(key)
        return root / "clip" if role == "CLIP model" else root
    return ensure_builtin(key)


def load_model(spec: Any) -> "BaseModel":
    """The one way a run's or sweep's ``model`` section (a ``trainers.config.ModelSpec``, or a
    mapping of its fields such as ``BaseModel.load_spec``) becomes a loaded base model: every
    loading option travels with the source, so a reload (an export, a trial, the confirmation)
    reads the same weights the same way."""
    get = spec.get if isinstance(spec, dict) else lambda k, d=None: getattr(spec, k, d)
    return load_base_model(get("source"), allow_pickle=bool(get("allow_pickle", False)),
                           single_file_config=get("single_file_config"), revision=get("revision"))


def load_base_model(
    spec: str,
    *,
    allow_pickle: bool = False,
    single_file_config: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    revision: str | None = None,
) -> BaseModel:
    """Load a Stable Diffusion 1.x-style base model from ``spec`` (see the module docstring).
    Sweeps and runs load through :func:`load_model` (their whole ``model`` section)."""
    model = _load_base_model(spec, allow_pickle, single_file_config, torch_dtype, revision)
    return dataclasses.replace(model, load_spec={"source": spec, "allow_pickle": allow_pickle,
                                                 "single_file_config": single_file_config, "revision": revision})


def _load_base_model(spec: str, allow_pickle: bool, single_file_config: str | None, torch_dtype: torch.dtype,
                     revision: str | None) -> BaseModel:
    if revision is not None and (spec.startswith(BUILTIN_PREFIX) or Path(spec).expanduser().exists()):
        raise ModelLoadError(f"model.revision={revision!r} only applies to Hub ids, not to {spec!r}")
    if spec.startswith(BUILTIN_PREFIX):
        return _load_directory(builtin_dir(spec, "base model"), spec, allow_pickle, torch_dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path}: directory has no model_index.json, so it is not a diffusers pipeline "
                f"(save one with pipe.save_pretrained(dir)). Accepted forms: {ACCEPTED_FORMS}"
            )
        return _load_directory(path, spec, allow_pickle, torch_dtype)
    suffix = path.suffix.lower()
    if suffix == ".safetensors" or suffix in PICKLE_SUFFIXES:
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such checkpoint file")
        return _load_single_file(path, spec, allow_pickle, single_file_config, torch_dtype)
    if path.exists():
        raise ModelLoadError(f"{path}: unsupported file type {suffix!r}. Accepted forms: {ACCEPTED_FORMS}")
    if _HUB_ID.match(spec):
        return _load_hub(spec, allow_pickle, torch_dtype, revision)
    raise ModelLoadError(f"model {spec!r}: no such file or directory, and not a Hub id. Accepted forms: {ACCEPTED_FORMS}")


def _offline() -> bool:
    # The constant is read when huggingface_hub is imported; the env var may be set later.
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return is_offline_mode() or flag


def _guard(what: str, fn: Callable[[], T]) -> T:
    """Run a library loader; turn its failure into a ModelLoadError that says what was loading."""
    try:
        return fn()
    except ModelLoadError:
        raise
    except Exception as e:  # diffusers/transformers raise OSError, ValueError, RuntimeError, ...
        raise ModelLoadError(f"{what}: {type(e).__name__}: {e}") from e


def _use_safetensors(folder: Path, allow_pickle: bool) -> bool:
    """True if ``folder`` has safetensors weights; False if only (allowed) pickle weights."""
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.name.endswith(".safetensors") for p in files):
        return True
    pickles = sorted(p for p in files if p.suffix.lower() in PICKLE_SUFFIXES)
    if not pickles:
        raise ModelLoadError(f"{folder}: no weight files (expected *.safetensors)")
    if not allow_pickle:
        raise refuse_pickle(pickles[0])
    return False  # from_pretrained then reads them with torch.load(weights_only=True)


def _load_directory(root: Path, source: str, allow_pickle: bool, dtype: torch.dtype) -> BaseModel:
    missing = [s for s in SD_SUBFOLDERS if not (root / s).is_dir()]
    if missing:
        raise ModelLoadError(f"{root}: not a Stable Diffusion pipeline directory, missing {missing}")
    st = {s: _use_safetensors(root / s, allow_pickle) for s in ("unet", "vae", "text_encoder")}
    kw: dict[str, Any] = dict(local_files_only=True)
    for sub in (s for s in st if not st[s]):
        # diffusers/transformers report a refused pickle as a bare "Unable to load weights"; name
        # what made it unsafe before handing them the file (weights_only=True stays the judge).
        for f in sorted(p for p in (root / sub).iterdir() if p.suffix.lower() in PICKLE_SUFFIXES):
            if blocked := unsafe_globals(f):
                raise unsafe_pickle(f, blocked, BY_SCAN)
    unet = _guard(
        f"{root}/unet",
        lambda: UNet2DConditionModel.from_pretrained(
            root, subfolder="unet", torch_dtype=dtype, use_safetensors=st["unet"], **kw
        ),
    )
    vae = _guard(
        f"{root}/vae",
        lambda: AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, use_safetensors=st["vae"], **kw),
    )
    # transformers 5 spells it dtype=; weights_only=True is its default, stated here on purpose.
    text_encoder = _guard(
        f"{root}/text_encoder",
        lambda: CLIPTextModel.from_pretrained(
            root, subfolder="text_encoder", dtype=dtype, use_safetensors=st["text_encoder"], weights_only=True, **kw
        ),
    )
    return _assemble(unet, vae, text_encoder, root, source)


def _assemble(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, config_root: Path, source: str
) -> BaseModel:
    """Add tokenizer + schedulers from ``config_root`` and compute the identities."""
    tokenizer = _guard(
        f"{config_root}/tokenizer",
        lambda: CLIPTokenizer.from_pretrained(config_root, subfolder="tokenizer", local_files_only=True),
    )
    scheduler_config = _guard(
        f"{config_root}/scheduler",
        lambda: dict(DDPMScheduler.load_config(config_root, subfolder="scheduler", local_files_only=True)),
    )
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)  # a base model is frozen; a trainer unfreezes what it trains
    # Each component is hashed once per load (reading every byte costs seconds on SD 1.5); the
    # identity, the VAE identity and the text identity are all made from these three.
    fps = {"unet": module_fingerprint(unet), "vae": module_fingerprint(vae),
           "text_encoder": module_fingerprint(text_encoder)}
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    text_identity = hashlib.sha256(f"text_encoder:{fps['text_encoder']}\nvocab:{vocab}".encode()).hexdigest()
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        scheduler_config=scheduler_config,
        source=source,
        identity=identity_of_fingerprints(fps),
        vae_identity=fps["vae"],
        text_encoder_identity=text_identity,
    )


def _load_single_file(
    path: Path, source: str, allow_pickle: bool, config: str | None, dtype: torch.dtype
) -> BaseModel:
    is_pickle = path.suffix.lower() in PICKLE_SUFFIXES
    if is_pickle and not allow_pickle:
        raise refuse_pickle(path)
    # Resolve the config before reading a possibly multi-GB file, unless it must be inferred.
    config_root = _single_file_config_dir(path, config) if config is not None or _offline() else None
    if is_pickle:
        checkpoint = load_weights_only(path)
    else:
        checkpoint = _guard(f"{path}: not a readable safetensors file", lambda: safetensors.torch.load_file(path))
    if config_root is None:
        # Online without a config: diffusers infers the model family from the keys (e.g. SD 1.5).
        from diffusers.loaders.single_file_utils import fetch_diffusers_config

        inferred = _guard(f"{path}: cannot infer its architecture", lambda: fetch_diffusers_config(checkpoint))
        config_root = _single_file_config_dir(path, str(inferred["pretrained_model_name_or_path"]))
    unet, vae, text_encoder = _guard(
        f"{path}: does not match the architecture in model.single_file_config={str(config_root)!r} "
        "(pass the diffusers config of the model this checkpoint was trained from)",
        lambda: single_file.load_components(checkpoint, config_root, dtype),
    )
    return _assemble(unet, vae, text_encoder, config_root, source)


def _single_file_config_dir(path: Path, config: str | None) -> Path:
    """Resolve ``model.single_file_config`` to a local diffusers directory of configs."""
    if config is None:
        raise ModelLoadError(
            f"{path}: a single-file checkpoint holds weights but not the architecture configs, and "
            "this machine is offline (HF_HUB_OFFLINE), so they cannot be fetched. Set "
            "`model.single_file_config` (single_file_config=...) to a local diffusers directory "
            "of the same architecture (e.g. a downloaded stable-diffusion-v1-5; configs suffice)."
        )
    if config.startswith(BUILTIN_PREFIX):
        root = ensure_builtin(config)
    elif Path(config).expanduser().is_dir():
        root = Path(config).expanduser()
    elif _HUB_ID.match(config):
        root = _hub_snapshot(config, None, _CONFIG_PATTERNS, what="model.single_file_config")
    else:
        raise ModelLoadError(
            f"model.single_file_config={config!r}: not a directory, builtin:tiny-sd or a Hub id "
            f"(needed to load {path})"
        )
    needed = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer", "scheduler"]
    missing = [n for n in needed if not (root / n).exists()]
    if missing:
        raise ModelLoadError(
            f"model.single_file_config={config!r} ({root}) lacks {missing}; it must be a diffusers "
            "Stable Diffusion directory (model_index.json layout)"
        )
    return root


def _hub_snapshot(repo: str, revision: str | None, patterns: list[str] | None, what: str) -> Path:
    try:
        return Path(
            snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=_offline())
        )
    except Exception as e:
        raise ModelLoadError(_hub_error(repo, what, e)) from e


def _hub_error(repo: str, what: str, e: Exception) -> str:
    if _offline():
        return (
            f"{what}={repo!r} is a Hugging Face Hub id, but there is no network here (HF_HUB_OFFLINE) "
            f"and it is not in the local HF cache. Pre-download it where there is network "
            f"(`hf download {repo} --local-dir DIR`) and pass the local directory instead."
        )
    return f"{what}={repo!r}: could not fetch from the Hugging Face Hub: {type(e).__name__}: {e}"


def _load_hub(repo: str, allow_pickle: bool, dtype: torch.dtype, revision: str | None) -> BaseModel:
    try:
        # diffusers picks exactly the files from_pretrained needs (no .ckpt, no fp16 variants).
        local = StableDiffusionPipeline.download(
            repo,
            revision=revision,
            use_safetensors=None if allow_pickle else True,
            local_files_only=_offline(),
        )
    except Exception as e:
        if not _offline() and not allow_pickle and "safetensors" in str(e):
            raise PickleRefusedError(
                f"model {repo!r}: the Hub repo has no .safetensors weights for some component: {e}. "
                "Loading pickle weights needs `model.allow_pickle: true` (read with weights_only=True)."
            ) from e
        raise ModelLoadError(_hub_error(repo, "model", e)) from e
    return _load_directory(Path(local), repo, allow_pickle, dtype)
