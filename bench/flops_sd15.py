"""FLOP counts of SD 1.5-size components vs the built-in tiny model, per training image.

Counts on PyTorch's meta device (shapes only: no weights, no memory, no GPU), so it runs anywhere
in seconds. It answers: what speedup does a latent + text-embedding cache predict for a LoRA
step at SD 1.5 size, and does ``builtin:tiny-sd`` keep SD 1.5's proportions?

    python bench/flops_sd15.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.cli import quiet_libraries  # noqa: E402

quiet_libraries()

import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, max_position_embeddings=77, vocab_size=49408)


def count(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def component_flops(unet, vae, text_encoder, resolution: int, device: str) -> dict[str, int]:
    """FLOPs for one image: UNet fwd, LoRA fwd+bwd, VAE encode, text-encoder fwd."""
    lat = resolution // 8
    x = torch.randn(1, 4, lat, lat, device=device)
    px = torch.randn(1, 3, resolution, resolution, device=device)
    ids = torch.zeros(1, 77, dtype=torch.long, device=device)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, device=device)
    t = torch.tensor([500], device=device)
    with torch.no_grad():
        out = {"unet_fwd": count(lambda: unet(x, t, hidden)),
               "vae_encode": count(lambda: vae.encode(px)),
               "text_fwd": count(lambda: text_encoder(ids))}
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    out["lora_step"] = count(lambda: unet(x, t, hidden).sample.float().pow(2).mean().backward())
    return out


def report(name: str, f: dict[str, int]) -> None:
    cached = f["lora_step"]
    ref = cached + f["vae_encode"] + f["text_fwd"]
    print(f"{name:18} UNet fwd {f['unet_fwd'] / 1e9:9.2f} GFLOP | VAE encode {f['vae_encode'] / 1e9:9.2f} "
          f"| text {f['text_fwd'] / 1e9:7.2f} | LoRA fwd+bwd {cached / 1e9:9.2f} | "
          f"encode/UNet-fwd {f['vae_encode'] / f['unet_fwd']:.2f} | cache speedup predicted {ref / cached:.2f}x")


def main() -> None:
    with torch.device("meta"):
        sd15 = (UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE), CLIPTextModel(SD15_TEXT))
    report("SD 1.5 @ 512px", component_flops(*sd15, resolution=512, device="meta"))
    from trainers.models import load_base_model

    tiny = load_base_model("builtin:tiny-sd")
    report("tiny-sd @ 64px", component_flops(tiny.unet, tiny.vae, tiny.text_encoder, 64, "cpu"))


if __name__ == "__main__":
    main()
