"""The original Stable Diffusion single-file checkpoint layout: write it, and read it back.

"Single file" is the layout of CompVis' ``sd-v1-*.ckpt`` that AUTOMATIC1111, ComfyUI and kohya
load: one state dict with the UNet under ``model.diffusion_model.`` (openaimodel names:
``input_blocks`` / ``middle_block`` / ``output_blocks``), the VAE under ``first_stage_model.``
(``encoder.down.{i}.block.{j}``...) and the CLIP text encoder under
``cond_stage_model.transformer.text_model.``.

Writing: ``to_original_state_dict`` builds the key mapping from the UNet/VAE configs (generic over
block counts and layers per block, not a table for one model) and checks that every weight was
mapped exactly once, so an architecture it does not understand fails loudly instead of writing a
checkpoint with weights missing. Reading: ``load_components`` hands the state dict to diffusers'
own single-file converters (rule 5) and checks the result is complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from transformers import CLIPTextModel

from trainers.fingerprints import weights_identity
from trainers.tensor_files import atomic_save_safetensors


class SingleFileModel(Protocol):
    """What :func:`save_single_file` needs of a model (a ``trainers.models.BaseModel`` has it).

    A protocol rather than an import of ``BaseModel``: ``trainers.models`` imports this module.
    """

    @property
    def unet(self) -> UNet2DConditionModel: ...

    @property
    def vae(self) -> AutoencoderKL: ...

    @property
    def text_encoder(self) -> CLIPTextModel: ...

    @property
    def source(self) -> str: ...

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# diffusers ResnetBlock2D -> openaimodel ResBlock (in_layers = [norm, SiLU, conv], out_layers =
# [norm, SiLU, dropout, conv], emb_layers = [SiLU, linear]).
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
# diffusers VAE ResnetBlock2D -> ldm ResnetBlock: same names except the 1x1 shortcut.
_VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
# diffusers Attention (linear q/k/v/out) -> ldm AttnBlock (1x1 convs q/k/v/proj_out + norm).
_VAE_ATTN = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _per_block(value: int | Sequence[int], n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def unet_prefix_map(config: Mapping[str, Any]) -> list[tuple[str, str, dict[str, str]]]:
    """``(diffusers prefix, original prefix, renames inside)`` for a UNet2DConditionModel config.

    Mirrors how diffusers builds the UNet: down block ``b`` has ``layers_per_block[b]`` resnets
    (plus one transformer each for cross-attention blocks) and a downsampler unless it is the
    last; up block ``b`` has ``layers_per_block`` (reversed) ``+ 1`` resnets and an upsampler
    unless it is the last. openaimodel numbers every such unit as one ``input_blocks.N`` /
    ``output_blocks.N`` entry, the conv_in being ``input_blocks.0``.
    """
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    layers = _per_block(config["layers_per_block"], len(down_types))
    m: list[tuple[str, str, dict[str, str]]] = [
        ("time_embedding.linear_1.", "time_embed.0.", {}),
        ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}),
        ("conv_norm_out.", "out.0.", {}),
        ("conv_out.", "out.2.", {}),
    ]
    n = 1
    for b, kind in enumerate(down_types):
        for j in range(layers[b]):
            m.append((f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{n}.0.", _UNET_RESNET))
            if "CrossAttn" in kind:
                m.append((f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{n}.1.", {}))
            n += 1
        if b < len(down_types) - 1:
            m.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{n}.0.op.", {}))
            n += 1
    mid_type = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"UNet mid block {mid_type!r} is not SD 1.x's UNetMidBlock2DCrossAttn")
    # UNet2DConditionModel always builds it with one layer: resnet, transformer, resnet.
    m += [
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    up_layers = list(reversed(layers))
    n = 0
    for b, kind in enumerate(up_types):
        cross = "CrossAttn" in kind
        for j in range(up_layers[b] + 1):
            m.append((f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{n}.0.", _UNET_RESNET))
            if cross:
                m.append((f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{n}.1.", {}))
            if j == up_layers[b] and b < len(up_types) - 1:
                slot = 2 if cross else 1  # the upsampler follows the last unit's resnet/attention
                m.append((f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{n}.{slot}.conv.", {}))
            n += 1
    return m


def vae_prefix_map(config: Mapping[str, Any]) -> list[tuple[str, str, dict[str, str]]]:
    """``(diffusers prefix, original prefix, renames inside)`` for an AutoencoderKL config.

    ldm numbers decoder levels from the lowest resolution up (``decoder.up.{n-1}`` runs first),
    diffusers in execution order, hence the reversed index.
    """
    n_down = len(config["down_block_types"])
    n_up = len(config["up_block_types"])
    layers = int(config["layers_per_block"])
    m: list[tuple[str, str, dict[str, str]]] = [
        ("quant_conv.", "quant_conv.", {}),
        ("post_quant_conv.", "post_quant_conv.", {}),
    ]
    for part in ("encoder", "decoder"):
        m += [
            (f"{part}.conv_in.", f"{part}.conv_in.", {}),
            (f"{part}.conv_out.", f"{part}.conv_out.", {}),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTN),
        ]
    for i in range(n_down):
        for j in range(layers):
            m.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET))
        if i < n_down - 1:
            m.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}))
    for i in range(n_up):
        k = n_up - 1 - i
        for j in range(layers + 1):
            m.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{k}.block.{j}.", _VAE_RESNET))
        if i < n_up - 1:
            m.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{k}.upsample.conv.", {}))
    return m


def _rename(
    state: Mapping[str, torch.Tensor],
    prefix_map: list[tuple[str, str, dict[str, str]]],
    out_prefix: str,
    what: str,
) -> dict[str, torch.Tensor]:
    """Apply a prefix map to every key; fail if a key matches no prefix or two keys collide."""
    # Longest prefix first: should one prefix ever extend another, the more specific one wins.
    ordered = sorted(prefix_map, key=lambda e: len(e[0]), reverse=True)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state.items():
        for src, dst, inner in ordered:
            if key.startswith(src):
                rest = key[len(src) :]
                for a, b in inner.items():
                    if rest.startswith(a):
                        rest = b + rest[len(a) :]
                        break
                new_key = out_prefix + dst + rest
                if new_key in out:
                    raise ValueError(f"{what}: two weights map to {new_key!r}; the key mapping is wrong")
                out[new_key] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(
            f"{what}: {len(unmapped)} weight(s) have no place in the original SD layout "
            f"(e.g. {unmapped[:3]}); this architecture is not SD 1.x-shaped and cannot be "
            "exported as a single file"
        )
    return out


def to_original_state_dict(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> dict[str, torch.Tensor]:
    """The three components' weights under the original single-file keys (CPU, contiguous)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in unet.state_dict().items()}
    out = _rename(tensors, unet_prefix_map(unet.config), UNET_PREFIX, "UNet")

    vae_state = {k: v.detach().to("cpu").contiguous() for k, v in vae.state_dict().items()}
    vae_out = _rename(vae_state, vae_prefix_map(vae.config), VAE_PREFIX, "VAE")
    for key, t in vae_out.items():
        # ldm's AttnBlock uses 1x1 Conv2d for q/k/v/proj_out: [C, C] -> [C, C, 1, 1].
        if ".mid.attn_1." in key and key.endswith(".weight") and t.ndim == 2:
            vae_out[key] = t.reshape(*t.shape, 1, 1)
    out.update(vae_out)

    for key, t in text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel (no "text_model." level); the original
        # layout stores the transformers-4 names, which keep it.
        name = key if key.startswith("text_model.") else "text_model." + key
        out[TEXT_PREFIX + name] = t.detach().to("cpu").contiguous()
    return out


def load_components(
    checkpoint: Mapping[str, torch.Tensor], config_root: Path, torch_dtype: torch.dtype
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """UNet, VAE and text encoder from an original-layout state dict, shaped by ``config_root``.

    Uses diffusers' single-file converters: ``from_single_file`` for the UNet and VAE and, for the
    text encoder (a transformers class without ``from_single_file``), the same helper that
    ``StableDiffusionPipeline.from_single_file`` calls. The state dict is passed in (not a path)
    so the safetensors and the opted-in ``torch.load(weights_only=True)`` routes share this code.
    Raises ``ValueError`` if a component's weights are missing or incomplete.
    """
    ckpt = dict(checkpoint)
    kwargs: dict[str, Any] = dict(config=str(config_root), local_files_only=True)
    if torch_dtype != torch.float32:
        # Without torch_dtype diffusers loads into the float32 modules it built; passing it makes
        # it call ModelMixin.to(dtype), which in diffusers 0.42 always logs a spurious "modules
        # that should be kept in float32: []" warning -- so pass it only when it changes something.
        kwargs["torch_dtype"] = torch_dtype
    unet = UNet2DConditionModel.from_single_file(ckpt, subfolder="unet", **kwargs)
    vae = AutoencoderKL.from_single_file(ckpt, subfolder="vae", **kwargs)
    if TEXT_PREFIX + "text_model.embeddings.position_embedding.weight" not in ckpt:
        raise ValueError(f"no SD 1.x CLIP text encoder weights ({TEXT_PREFIX}text_model.*) in the checkpoint")
    text_encoder = create_diffusers_clip_model_from_ldm(CLIPTextModel, ckpt, subfolder="text_encoder", **kwargs)
    for name, module in (("UNet", unet), ("VAE", vae), ("text encoder", text_encoder)):
        # diffusers builds on the meta device and fills in what the checkpoint has: anything
        # still on meta had no weight in the file.
        empty = [n for n, p in module.named_parameters() if p.device.type == "meta"]
        if empty:
            raise ValueError(f"{name}: {len(empty)} weight(s) missing from the checkpoint, e.g. {empty[:3]}")
    return unet, vae, text_encoder


def save_single_file(model: SingleFileModel, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` as one original-layout ``.safetensors`` file, atomically.

    The metadata records what produced the file, the model's source and ``sdsweep.identity``,
    computed from the weights being written (a fine-tuned UNet swapped into ``model`` counts), so
    it equals the ``BaseModel.identity`` of the file loaded back. ``metadata`` entries are added on
    top (and win).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single-file checkpoints are written as .safetensors only")
    tensors = to_original_state_dict(model.unet, model.vae, model.text_encoder)
    meta = {
        "format": "pt",
        "producer": "sdsweep trainers.single_file",
        "layout": "stable-diffusion-v1 original (model.diffusion_model / first_stage_model / "
        "cond_stage_model.transformer)",
        "sdsweep.source": model.source,
        "sdsweep.identity": weights_identity(model.unet, model.vae, model.text_encoder),
    }
    meta.update(metadata or {})
    atomic_save_safetensors(tensors, path, meta)
    return path
