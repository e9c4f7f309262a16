"""Shared fixtures. Every test runs offline against a private cache directory."""

from __future__ import annotations

import hashlib
import json
import os

# Offline before anything imports huggingface_hub / wandb: tests must never reach a network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

# Tests marked ``real_weights`` need a real Stable Diffusion 1.5 in the diffusers layout on disk
# (nothing is downloaded: tests are offline). Opt in with both:
#   SDSWEEP_SD15_DIR=/models/stable-diffusion-v1-5 python3 -m pytest --real-weights -m real_weights
SD15_ENV = "SDSWEEP_SD15_DIR"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--real-weights", action="store_true", default=False,
                     help=f"run tests marked real_weights against the local SD 1.5 directory in ${SD15_ENV}")


def real_weights_skip_reason(opted_in: bool, directory: str | None) -> str | None:
    """Why ``real_weights`` tests cannot run (None: they can): each reason says what to set."""
    how = f"{SD15_ENV}=<a local SD 1.5 directory in the diffusers layout> pytest --real-weights"
    if not opted_in:
        return f"needs real SD 1.5 weights; opt in with {how}"
    if not directory:
        return f"--real-weights is given but {SD15_ENV} is not set; run {how}"
    if not (Path(directory).expanduser() / "model_index.json").is_file():
        return (f"{SD15_ENV}={directory} is not a diffusers model directory (no model_index.json); "
                "point it at a local copy of stable-diffusion-v1-5")
    return None


# The longest files first (seconds of a 2-worker run on the 2-core machine, 2026-12-07): pytest-xdist
# hands out whole files (`--dist loadfile`, in this order with `--no-loadscope-reorder`), and a long
# file started last would run on alone while the other worker idles. Refresh from the run's
# "slowest durations" when a file's weight changes a lot; files not named keep their order, after these.
HEAVY_FIRST = (
    "test_toyworld_demo.py",  # ~560 s: the shipped LoRA demo, unshortened
    "test_cluster_faults.py",  # ~510 s: real multi-node clusters, kills
    "test_sweep_e2e.py",  # ~450 s: kill -9 + resume, killed worker, image sweep, W&B
    "test_dreambooth_sweep.py",  # ~360 s
    "test_textual_inversion_sweep.py",  # ~270 s
    "test_mixed_sweep.py",  # ~250 s
    "test_resume_restore_point.py",  # ~200 s: frozen drivers
    "test_init.py",  # ~150 s
    "test_report.py",  # ~140 s
    "test_trainer_contract.py",  # ~100 s
    "test_toyworld.py",  # ~90 s
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order stays
    reason = real_weights_skip_reason(config.getoption("--real-weights"), os.environ.get(SD15_ENV))
    if reason is None:
        return
    for item in items:
        if "real_weights" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def sd15_dir() -> Path:
    """The local SD 1.5 directory (only reached when ``real_weights`` tests are not skipped)."""
    return Path(os.environ[SD15_ENV]).expanduser()


@pytest.fixture(scope="session", autouse=True)
def sdsweep_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide cache root so built-in models are built once per test run."""
    root = tmp_path_factory.mktemp("sdsweep-cache")
    old = os.environ.get("SDSWEEP_CACHE")
    os.environ["SDSWEEP_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("SDSWEEP_CACHE", None)
    else:
        os.environ["SDSWEEP_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_sd_dir(sdsweep_cache: Path) -> Path:
    """The built-in tiny SD model on disk in the diffusers layout (built once per session)."""
    from trainers.models import ensure_builtin

    return ensure_builtin("tiny-sd")


@pytest.fixture
def tiny_model(tiny_sd_dir: Path):
    """A fresh BaseModel loaded from disk through the real loader (trainers mutate it)."""
    from trainers.models import load_base_model

    return load_base_model("builtin:tiny-sd")


@pytest.fixture(scope="session")
def demo_dir(sdsweep_cache: Path) -> Path:
    """The generated demo dataset (8 images of one subject with .txt captions)."""
    from trainers.data import resolve_data_path

    return resolve_data_path("builtin:demo")


class EncodeCounter:
    """Counts real VAE encode calls and the images they encoded (wraps the instance method)."""

    def __init__(self, vae) -> None:
        self.calls = 0
        self.images = 0
        self._orig = vae.encode

        def counted(x, *args, **kwargs):
            self.calls += 1
            self.images += int(x.shape[0])
            return self._orig(x, *args, **kwargs)

        vae.encode = counted


@pytest.fixture
def encode_counter():
    """Factory: ``encode_counter(vae)`` starts counting that VAE's encodes."""
    return EncodeCounter


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for every in-process Ray test of the session.

    Ray 2.60 does not reliably start a second time in the same process after ``ray.shutdown()``
    (the new GCS never publishes its port file), so tests share one runtime instead of each
    starting their own. End-to-end tests run the CLI in subprocesses with their own Ray.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def model_digest(model) -> dict:
    """Everything a trainer could leave behind on a shared base model, hashed: every weight and
    buffer of UNet, VAE and text encoder (adapter weights included), the adapters registered, the
    tokenizer's vocabulary (and added tokens), the embedding module, its matrix shape and the
    config's vocab_size, train/eval modes, requires_grad and gradients left on parameters."""
    from trainers.tensor_files import tensors_digest

    out: dict = {}
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(model, name)
        out[name] = tensors_digest({k: v for k, v in module.state_dict().items()})
        out[f"{name}.adapters"] = sorted(getattr(module, "peft_config", None) or {})
        out[f"{name}.training"] = sorted({m.training for m in module.modules()})
        out[f"{name}.requires_grad"] = sorted({p.requires_grad for p in module.parameters()})
        out[f"{name}.grads"] = sum(p.grad is not None for p in module.parameters())  # left by a failed step
        out[f"{name}.dtypes"] = sorted({str(p.dtype) for p in module.parameters()})
        out[f"{name}.hooks"] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                                   for m in module.modules())
        out[f"{name}.checkpointing"] = bool(getattr(module, "is_gradient_checkpointing", False)) \
            if name == "unet" else any(getattr(m, "gradient_checkpointing", False) for m in module.modules())
    tok = model.tokenizer
    out["tokenizer"] = (len(tok), hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest(),
                        sorted(str(t) for t in tok.added_tokens_decoder.values()))
    emb = model.text_encoder.get_input_embeddings()
    out["embeddings"] = (type(emb).__name__, tuple(emb.weight.shape), emb.num_embeddings,
                         model.text_encoder.config.vocab_size)
    return out


def safetensors_data_bytes(path: Path) -> int:
    """The tensor bytes of a safetensors file, read from its header (the format's spec: an 8-byte
    little-endian header length, then JSON with each tensor's ``data_offsets``)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(end - start for name, entry in header.items() if name != "__metadata__"
               for start, end in [entry["data_offsets"]])


def run_shipped_sweep(config: Path, run_dir: Path, cache: Path, timeout: int = 1700, wandb: bool = False,
                      sets: tuple[str, ...] = (), persist_log: Path | None = None) -> str:
    """Run a shipped sweep file as the README does (``sdsweep run``; W&B off unless ``wandb``, then
    offline) in a subprocess with its own Ray, into ``run_dir``, exporting the pick to
    ``run_dir.parent / "best"``, with ``sets`` as more ``--set KEY=VALUE`` items; returns its stdout.
    With ``persist_log``, every process of the sweep logs what Tune copied for each reported
    checkpoint there (tests/probes/sitecustomize.py). A failure shows the tails of both streams."""
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("WANDB_API_KEY", None)
    env.update(OMP_NUM_THREADS="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", PYTHONUNBUFFERED="1",
               SDSWEEP_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "sweeps.cli", "run", str(config), "--run-dir", str(run_dir),
           "--set", f"tracking.wandb={'true' if wandb else 'false'}", "--export", str(run_dir.parent / "best"),
           *(arg for item in sets for arg in ("--set", item))]
    if wandb:
        env["WANDB_MODE"] = "offline"
    if persist_log is not None:
        probes = str(Path(__file__).resolve().parent / "probes")
        env.update(SDSWEEP_PERSIST_LOG=str(persist_log),
                   PYTHONPATH=os.pathsep.join(p for p in (probes, env.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
                          timeout=timeout)
    assert proc.returncode == 0, f"{config.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout
