"""``data.resolution`` defaults to the base model's native resolution, read from its own configs.

References: the image size diffusers' own pipeline draws when asked for no size (its
``unet.config.sample_size * vae_scale_factor``), and SD 1.5's published 512 px. The configs-only
SD 1.5 directory holds no weight file at all, so reading it cannot have loaded weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from sweeps.config import load_sweep, trial_run_config
from trainers.config import ConfigError, RunConfig, load_config
from trainers.toyworld import weights_dir

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "sweeps" / "configs" / "demo.yaml"


def _toy_copy(root: Path, sample_size: int) -> Path:
    """The toy world's files as a plain diffusers directory, its UNet's sample_size changed (a
    config value only: the weights fit any latent size); its VAE downsamples by 4, not SD's 8."""
    model = root / "model"
    shutil.copytree(weights_dir(), model)
    cfg_path = model / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["sample_size"] = sample_size
    cfg_path.write_text(json.dumps(cfg))
    return model


def _default_size_drawn_by_diffusers(model_dir: Path) -> int:
    from trainers.models import load_base_model

    pipe = load_base_model(str(model_dir)).pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle on a blue background", num_inference_steps=1, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape[1] == out.shape[2]
    return int(out.shape[1])


def _sweep(tmp_path: Path, model: str, resolution: int | None) -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    raw["base"]["model"] = model
    raw["base"]["data"].pop("resolution")
    if resolution is not None:
        raw["base"]["data"]["resolution"] = resolution
    path = tmp_path / f"sweep-{resolution}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_resolution_defaults_to_what_the_model_draws_and_an_explicit_one_wins(tmp_path: Path) -> None:
    model = _toy_copy(tmp_path, sample_size=12)
    native = _default_size_drawn_by_diffusers(model)
    assert native == 48  # 12 latent pixels x the toy VAE's 4 (SD's 8 would make it 96)

    cfg = load_sweep(_sweep(tmp_path, str(model), None))
    assert cfg.base.data.resolution == native
    assert trial_run_config(cfg, {"method": "lora"}).data.resolution == native  # what every trial reads
    assert load_sweep(_sweep(tmp_path, str(model), 32)).base.data.resolution == 32

    # `sdsweep train`'s config: the same default, the same precedence.
    run = {"model": str(model), "data": {"path": "builtin:toystar"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert load_config(tmp_path / "run.yaml", RunConfig).data.resolution == native
    run["data"]["resolution"] = 40
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert load_config(tmp_path / "run.yaml", RunConfig).data.resolution == 40

    # Evaluation without a generation resolution draws at the same native size.
    from trainers.evaluate import EvalSettings, generate
    from trainers.models import load_base_model

    images = generate(load_base_model(str(model)), EvalSettings(prompts=("a red circle",), seeds=(0,), steps=1))
    assert images[0].image.size == (native, native)


def test_builtin_models_keep_their_own_resolution() -> None:
    from trainers.models import builtin_dir

    for spec in ("builtin:toyworld", "builtin:tiny-sd"):
        native = _default_size_drawn_by_diffusers(builtin_dir(spec, "base model"))
        raw = {"model": spec, "data": {"path": "builtin:demo"}}
        assert RunConfig.model_validate(raw).data.resolution == native, spec


def test_sd15_defaults_to_512_from_its_configs_alone(tmp_path: Path) -> None:
    """SD 1.5 was trained at 512 px; its directory here holds configs and no weight file."""
    from trainers.memory import SD15

    root = tmp_path / "sd15-configs"
    for sub, cfg in (("unet", SD15.unet), ("vae", SD15.vae), ("text_encoder", SD15.text_encoder)):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text(json.dumps(cfg))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert not list(root.rglob("*.safetensors")) and not list(root.rglob("*.bin"))
    assert load_sweep(_sweep(tmp_path, str(root), None)).base.data.resolution == 512


def test_an_unreadable_model_without_a_resolution_names_the_key_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_sweep(_sweep(tmp_path, str(tmp_path / "no-such-model"), None))
    msg = str(err.value)
    assert "data.resolution: not set" in msg and "no-such-model" in msg and "Set data.resolution" in msg
    # With the resolution given, the sweep file loads (the model is then loaded, and checked, by the sweep).
    assert load_sweep(_sweep(tmp_path, str(tmp_path / "no-such-model"), 32)).base.data.resolution == 32


def test_a_single_files_architecture_is_inferred_from_its_header_as_from_its_weights(tmp_path: Path) -> None:
    """Online without ``single_file_config`` the loader lets diffusers infer the architecture from the
    loaded checkpoint; the native resolution reads the same inference off the header alone."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, fetch_diffusers_config
    from safetensors.torch import load_file, save_file

    from trainers.model_configs import header_shapes

    v2, inpaint = CHECKPOINT_KEY_NAMES["v2"], CHECKPOINT_KEY_NAMES["inpainting"]
    cases = {"sd1": {inpaint: torch.zeros(2, 4, 1, 1), v2: torch.zeros(3, 768)},
             "sd2": {inpaint: torch.zeros(2, 4, 1, 1), v2: torch.zeros(3, 1024)},
             "sd2-inpainting": {inpaint: torch.zeros(2, 9, 1, 1), v2: torch.zeros(3, 1024)}}
    inferred = set()
    for name, tensors in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        from_header = fetch_diffusers_config(header_shapes(path))
        assert from_header == fetch_diffusers_config(load_file(path)), name
        inferred.add(from_header["pretrained_model_name_or_path"])
    assert len(inferred) == 3  # three architectures told apart by shapes alone
