"""The toy world's denoiser: a diffusers ``UNet2DConditionModel`` trained on cached latents.

Stable Diffusion 1.x's recipe at toy size: epsilon prediction under SD's scaled-linear DDPM
schedule, cross-attention over the frozen CLIP text tower's last hidden states (77 tokens, as
the pipeline encodes prompts), 10% of captions dropped to the empty prompt so classifier-free
guidance works (SD 1.x dropped 10%). Two additions for a short CPU budget:

* Min-SNR-gamma loss weighting, gamma = 5 (Hang et al. 2023: ~3x faster convergence);
* an EMA of the weights (decay 0.999 with the usual ``(1 + n) / (10 + n)`` warm-up), which is
  what gets saved: a short run's last iterate is noisy, its average samples far better.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from trainers.tiny import SCHEDULER_CONFIG

CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
EMA_DECAY = 0.999


def unet_config(cross_attention_dim: int, latent_size: int, block_out_channels: tuple[int, ...]) -> dict[str, Any]:
    """SD 1.x's block types (cross-attention in every level here: the toy has only two)."""
    n = len(block_out_channels)
    return dict(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,  # diffusers' name for the head count in SD 1.x configs: 8 like SD
        norm_num_groups=16,
    )


@torch.no_grad()
def encode_prompts(text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> torch.Tensor:
    """Prompt embeddings exactly as ``StableDiffusionPipeline.encode_prompt`` makes them:
    padded to the tokenizer's max length, no attention mask, last hidden state."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids)[0]


def _min_snr_weights(scheduler: Any, t: torch.Tensor) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=MIN_SNR_GAMMA) / snr  # epsilon prediction: min(snr, g) / snr


def train_unet(
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    caption_ids: torch.Tensor,
    text_embeds: torch.Tensor,
    uncond_index: int,
    config: dict[str, Any],
    steps: int,
    seed: int,
    batch: int = 64,
    lr: float = 1e-3,
) -> UNet2DConditionModel:
    """Train a UNet on scaled latents ``mean + std * eps``; image i has caption ``caption_ids[i]``,
    a row of ``text_embeds``; row ``uncond_index`` is the empty prompt. Returns the EMA model."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    unet: Any = UNet2DConditionModel(**config)  # Any: mypy sees diffusers' ModelMixin without nn.Module's methods
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler: Any = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.05)
    unet.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(latent_mean), (batch,), generator=gen)
        z = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        drop = torch.rand(batch, generator=gen) < CAPTION_DROPOUT
        cond = torch.where(drop, torch.full_like(caption_ids[idx], uncond_index), caption_ids[idx])
        pred = unet(scheduler.add_noise(z, noise, t), t, text_embeds[cond]).sample
        per_item = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_item * _min_snr_weights(scheduler, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, unet, min(EMA_DECAY, (1 + step) / (10 + step)))
        if step % 200 == 0 or step == steps - 1:
            print(f"[unet] step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    ema.eval()
    ema_model: UNet2DConditionModel = ema
    return ema_model


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
