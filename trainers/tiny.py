"""The built-in tiny models: Stable Diffusion 1.x and CLIP architectures at toy size.

They exist so that tests, the laptop demo and the benchmarks run the *real* loading code: the
builders below write the standard Hugging Face layouts (``StableDiffusionPipeline`` with
``model_index.json``; a ``CLIPModel`` directory) and everything downstream loads them back from
disk exactly as it would load ``stable-diffusion-v1-5``. ``trainers.models.ensure_builtin``
calls these builders once per cache directory.

Deterministic: every component is initialised under its own fixed seed inside
``torch.random.fork_rng`` (the caller's RNG state is untouched), so two builds produce
byte-identical files.

Proportions (kept like SD 1.5 because benchmarks depend on them):

* VAE: 4 blocks (8x downsampling) with 2 resnets each, 4 latent channels, scaling factor
  0.18215, like SD's; channels (8, 16, 16, 16) instead of (128, 256, 512, 512).
* UNet: SD's block types -- ``CrossAttnDownBlock2D`` then a plain last ``DownBlock2D``,
  ``UNetMidBlock2DCrossAttn``, mirrored ``UpBlock2D`` / ``CrossAttnUpBlock2D`` -- 8 attention
  heads, cross-attention over the 77-token text context. Two levels of one layer instead of SD's
  four of two: on a 2-core CPU the time of a tiny UNet is per-op overhead, not FLOPs (measured:
  a 4-level UNet with only 8 channels still takes ~60 ms fwd+bwd at batch 4; 3 levels of
  (32, 64, 128) ~70-90 ms; these 2 levels ~45 ms), and every test step pays for each block. The
  single-file tests build SD's full 4-level, 2-layer structure separately to cover its keys.
* Cost, measured with ``torch.utils.flop_counter.FlopCounterMode`` at the default 64 px
  training resolution (8x8 latents), batch 1: ``vae.encode(x).latent_dist`` = 47.4 MFLOPs, one
  UNet forward with a 77-token context = 42.3 MFLOPs, ratio 1.12. In SD 1.5 a 512 px VAE encode
  also costs about one UNet forward, which is what makes latent caching pay off. (Decode: 99.2
  MFLOPs; text encoder: 3.8 MFLOPs.) UNet forward+backward at batch 4 on 8x8 latents: ~45 ms on
  the 2-core dev CPU (forward alone ~17 ms, VAE encode at batch 4 ~10 ms).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77  # SD 1.x's CLIP context length (max_position_embeddings of ViT-L/14's text tower)
TEXT_HIDDEN = 32  # text encoder width == UNet cross_attention_dim

# SD 1.x's noise schedule (stable-diffusion-v1-5/scheduler/scheduler_config.json), saved as DDIM
# so the pipeline samples with it; training uses DDPMScheduler.from_config of the same dict.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8,  # latent size -> the pipeline's default image size is 8 * 8 = 64 px
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=TEXT_HIDDEN,
    attention_head_dim=8,  # diffusers' name for the number of heads in SD 1.x configs: 8 like SD
    norm_num_groups=8,
)

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.18215,  # SD 1.x's latent scaling factor
)


def _text_config(vocab_size: int, bos_id: int, eos_id: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,  # 4x like CLIP (3072 / 768)
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",  # CLIP ViT-L/14 (SD 1.x's text encoder) uses quick_gelu
        projection_dim=32,
        bos_token_id=bos_id,
        # The pooled output is taken at the first eos position; with the legacy value 2 CLIP would
        # fall back to argmax(input_ids), which also works here but only by accident of ordering.
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed CPU seed without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def char_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet without merges: every byte symbol, the same with ``</w>``
    (CLIP's end-of-word marker), then the two special tokens -- the first 512 entries of real
    CLIP's vocab have exactly this shape. With no merges every word becomes one token per
    character, so any text (any byte, not only printable ASCII) encodes without unknown tokens.
    """
    symbols = sorted(ByteLevel.alphabet())  # the 256 printable stand-ins for bytes 0..255
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab


def char_tokenizer() -> CLIPTokenizer:
    """The character-level CLIP tokenizer shared by both tiny models.

    transformers 5's ``CLIPTokenizer`` is the tokenizers-backed class (there is no separate
    "fast" class any more); built from a vocab dict it needs ``merges=[]`` passed explicitly,
    because with ``merges=None`` transformers *generates* merges from the vocab.
    """
    return CLIPTokenizer(
        vocab=char_vocab(),
        merges=[],
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,  # CLIP's convention; the byte alphabet leaves nothing unknown anyway
        pad_token=EOS_TOKEN,
        model_max_length=MAX_LENGTH,
    )


def build_tiny_sd(out: Path, seed: int = 0) -> None:
    """Write the tiny SD 1.x pipeline into ``out`` in the standard diffusers layout."""
    tokenizer = char_tokenizer()
    text_cfg = _text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    with _seeded(seed):
        unet = UNet2DConditionModel(**UNET_CONFIG)
    with _seeded(seed + 1):
        vae = AutoencoderKL(**VAE_CONFIG)
    with _seeded(seed + 2):
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    _write_readme(out, "tiny-sd", seed)


def build_tiny_clip(out: Path, seed: int = 0) -> None:
    """Write a tiny ``CLIPModel`` + char tokenizer + PIL image processor into ``out``."""
    tokenizer = char_tokenizer()
    text_cfg = _text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    vision_cfg = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="quick_gelu",
    )
    config = CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=32)
    with _seeded(seed + 10):
        model = CLIPModel(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # The PIL backend explicitly: transformers 5's default CLIPImageProcessor needs torchvision,
    # which this project cannot install. The saved config still says "CLIPImageProcessor".
    CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(out)
    _write_readme(out, "tiny-clip", seed)


def build_tiny_vit(out: Path, seed: int = 0) -> None:
    """Write a tiny ``ViTModel`` + PIL image processor: the backbone the DINO-style metric tests use.

    DINO's ViT-S/16 architecture at toy size (32 px, 8 px patches, width 32); randomly initialised.
    """
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4)
    with _seeded(seed + 20):
        model = ViTModel(config, add_pooling_layer=False)  # DINO's checkpoints carry no pooler
    model.save_pretrained(out, safe_serialization=True)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(out)
    _write_readme(out, "tiny-vit", seed)


def _write_readme(out: Path, name: str, seed: int) -> None:
    info = {
        "name": name,
        "producer": "sdsweep trainers.tiny",
        "seed": seed,
        "note": "randomly initialised toy model for tests and demos; not a trained model",
    }
    (out / "sdsweep_builtin.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
