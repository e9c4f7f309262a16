"""Original single-file checkpoint layout: key mapping, atomic writing, loading back."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from trainers import tiny as tiny_configs
from trainers.models import BaseModel, ModelLoadError, ensure_builtin, load_base_model, module_fingerprint
from trainers.single_file import save_single_file, to_original_state_dict

# Keys of CompVis' SD 1.x checkpoints (ldm openaimodel / autoencoder / FrozenCLIPEmbedder names),
# written from that layout, not from our mapping; diffusers' CHECKPOINT_KEY_NAMES["v1"] is the
# last UNet one. A1111/ComfyUI detect the model family from names like these.
SD15_KEYS = [
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "model.diffusion_model.middle_block.2.emb_layers.1.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.0.downsample.conv.weight",
    "first_stage_model.encoder.mid.attn_1.proj_out.weight",
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
    "first_stage_model.decoder.mid.block_2.norm2.bias",
    "first_stage_model.quant_conv.weight",
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
]


@pytest.fixture(scope="module")
def tiny() -> BaseModel:
    return load_base_model("builtin:tiny-sd")


@pytest.fixture(scope="module")
def single(tiny: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_single_file(tiny, tmp_path_factory.mktemp("sf") / "tiny.safetensors", {"note": "test"})


def _sd15_shaped_unet() -> UNet2DConditionModel:
    """SD 1.5's exact UNet block structure (4 levels, 2 layers per block) at toy width."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        **dict(
            tiny_configs.UNET_CONFIG,
            layers_per_block=2,
            block_out_channels=(8, 16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    )


@pytest.mark.parametrize("shape", ["tiny", "sd15"])
def test_key_mapping_is_the_exact_inverse_of_diffusers_converters(shape: str, tiny: BaseModel) -> None:
    unet = tiny.unet if shape == "tiny" else _sd15_shaped_unet()
    vae, text = tiny.vae, tiny.text_encoder
    original = to_original_state_dict(unet, vae, text)
    back = convert_ldm_unet_checkpoint(original, unet.config)
    ref = unet.state_dict()
    assert back.keys() == ref.keys()
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    vae_back, vae_ref = convert_ldm_vae_checkpoint(original, vae.config), vae.state_dict()
    assert vae_back.keys() == vae_ref.keys()
    assert all(vae_back[k].shape == vae_ref[k].shape and torch.equal(vae_back[k], vae_ref[k]) for k in vae_ref)
    assert len(original) == len(ref) + len(vae_ref) + len(text.state_dict())
    if shape == "sd15":
        assert [k for k in SD15_KEYS if k not in original] == []
        assert original["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # ldm's 1x1 conv


def test_sd15_structure_round_trips_through_diffusers_from_single_file(tiny: BaseModel, tmp_path: Path) -> None:
    root = tmp_path / "sd15-shaped"
    shutil.copytree(ensure_builtin("tiny-sd"), root)
    shutil.rmtree(root / "unet")
    _sd15_shaped_unet().save_pretrained(root / "unet")
    model = load_base_model(str(root))
    path = save_single_file(model, tmp_path / "sd15.safetensors")
    loaded = load_base_model(str(path), single_file_config=str(root))
    assert loaded.identity == model.identity != tiny.identity


def test_architecture_outside_sd1_layout_is_refused(tiny: BaseModel) -> None:
    unet = UNet2DConditionModel(**dict(tiny_configs.UNET_CONFIG, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="class_embedding"):
        to_original_state_dict(unet, tiny.vae, tiny.text_encoder)


def test_single_file_is_written_atomically_with_provenance(single: Path, tiny: BaseModel) -> None:
    assert [p.name for p in single.parent.iterdir()] == ["tiny.safetensors"]  # no temp file left
    with safe_open(single, "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["producer"].startswith("sdsweep")
    assert meta["sdsweep.identity"] == tiny.identity and meta["note"] == "test"
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    with pytest.raises(ValueError, match="safetensors"):
        save_single_file(tiny, single.with_suffix(".ckpt"))


def test_single_file_identity_describes_the_weights_written(tiny: BaseModel, tmp_path: Path) -> None:
    tuned_unet = copy.deepcopy(tiny.unet)
    with torch.no_grad():
        tuned_unet.conv_out.bias += 0.5  # stands in for a fine-tuned UNet being exported
    path = save_single_file(dataclasses.replace(tiny, unet=tuned_unet), tmp_path / "tuned.safetensors")
    with safe_open(path, "pt") as f:
        written = f.metadata()["sdsweep.identity"]
    assert written != tiny.identity
    assert written == load_base_model(str(path), single_file_config="builtin:tiny-sd").identity


def test_single_file_round_trip_gives_identical_components(single: Path, tiny: BaseModel) -> None:
    loaded = load_base_model(str(single), single_file_config=str(ensure_builtin("tiny-sd")))
    assert loaded.identity == tiny.identity
    assert loaded.vae_identity == tiny.vae_identity
    assert loaded.source == str(single)
    torch.manual_seed(0)
    z, ctx, x = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.rand(1, 3, 64, 64) * 2 - 1
    ids = tiny.tokenizer(["a cat", "Dog #2!"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        for model in (tiny, loaded):
            model.unet.eval()
        assert torch.equal(tiny.unet(z, torch.tensor([10, 900]), ctx).sample, loaded.unet(z, torch.tensor([10, 900]), ctx).sample)
        assert torch.equal(tiny.vae.encode(x).latent_dist.mean, loaded.vae.encode(x).latent_dist.mean)
        assert torch.equal(tiny.vae.decode(z).sample, loaded.vae.decode(z).sample)
        assert torch.equal(tiny.text_encoder(ids).last_hidden_state, loaded.text_encoder(ids).last_hidden_state)


def test_single_file_builtin_config_and_dtype(single: Path) -> None:
    half = load_base_model(str(single), single_file_config="builtin:tiny-sd", torch_dtype=torch.float16)
    assert {p.dtype for m in (half.unet, half.vae, half.text_encoder) for p in m.parameters()} == {torch.float16}


def test_single_file_without_config_offline_names_the_setting(single: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model\.single_file_config") as err:
        load_base_model(str(single))
    assert "offline" in str(err.value) and str(single) in str(err.value)


def test_single_file_config_that_is_not_a_diffusers_dir_is_named(single: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"single_file_config.*lacks"):
        load_base_model(str(single), single_file_config=str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"single_file_config.*offline|no network"):
        load_base_model(str(single), single_file_config="nobody-xyz/no-such-config")


def test_checkpoint_missing_a_component_is_a_clear_error(tiny: BaseModel, tmp_path: Path) -> None:
    unet_only = {
        k: v
        for k, v in to_original_state_dict(tiny.unet, tiny.vae, tiny.text_encoder).items()
        if k.startswith("model.diffusion_model.")
    }
    path = tmp_path / "unet_only.safetensors"
    save_file(unet_only, path)
    with pytest.raises(ModelLoadError, match="unet_only.safetensors"):
        load_base_model(str(path), single_file_config="builtin:tiny-sd")


def test_written_file_also_loads_with_plain_diffusers_from_single_file(single: Path, tiny: BaseModel) -> None:
    pipe = StableDiffusionPipeline.from_single_file(
        str(single), config=str(ensure_builtin("tiny-sd")), local_files_only=True, safety_checker=None
    )
    assert module_fingerprint(pipe.unet) == module_fingerprint(tiny.unet)
    assert module_fingerprint(pipe.vae) == tiny.vae_identity
    assert module_fingerprint(pipe.text_encoder) == module_fingerprint(tiny.text_encoder)


def test_fp16_checkpoint_with_the_extras_real_files_carry_loads(tiny: BaseModel, tmp_path: Path) -> None:
    state = to_original_state_dict(tiny.unet, tiny.vae, tiny.text_encoder)
    state = {k: v.half() for k, v in state.items()}  # most shared checkpoints are fp16
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["alphas_cumprod"] = torch.rand(1000)
    state["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / "shared.safetensors"
    save_file(state, path)
    loaded = load_base_model(str(path), single_file_config="builtin:tiny-sd")
    assert loaded.unet.dtype == torch.float32  # torch_dtype (float32 default) wins over the file's
    for name, p in loaded.unet.state_dict().items():
        assert torch.equal(p, tiny.unet.state_dict()[name].half().float()), name
