"""The toy world's VAE: a diffusers ``AutoencoderKL`` trained on rendered scenes.

Reconstruction MSE plus a small KL term, like SD's first stage without its LPIPS/GAN terms (a
plain shape on a plain background has no texture for those to sharpen). After training, the
latent ``scaling_factor`` is set to 1 / std of the training latents -- how SD's 0.18215 was
chosen (Rombach et al. 2022, appendix G) -- so the diffusion model sees unit-variance latents.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from trainers.toyworld.scenes import SIZE, SceneSet, to_tensor_range


def vae_config(block_out_channels: tuple[int, ...]) -> dict[str, Any]:
    """An ``AutoencoderKL`` config downsampling by ``2 ** (len(block_out_channels) - 1)``."""
    n = len(block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=4,  # SD's latent channel count
        norm_num_groups=8,
        sample_size=SIZE,
        scaling_factor=1.0,  # replaced by the measured value after training
    )


def train_vae(
    data: SceneSet,
    block_out_channels: tuple[int, ...],
    steps: int,
    seed: int,
    batch: int = 64,
    lr: float = 2e-3,
    kl_weight: float = 1e-5,
) -> AutoencoderKL:
    """Train an ``AutoencoderKL`` on ``data`` and set its measured ``scaling_factor``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vae: Any = AutoencoderKL(**vae_config(block_out_channels))  # Any: mypy sees diffusers' ModelMixin without nn.Module's methods
    x = torch.from_numpy(to_tensor_range(data.images))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    vae.train()
    t0 = time.time()
    for step in range(steps):
        xb = x[torch.randint(0, len(x), (batch,), generator=gen)]
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, xb)
        kl = post.kl().mean() / z[0].numel()  # per latent element, so the weight is size-free
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"[vae] step {step}/{steps} mse {mse.item():.5f} kl {kl.item():.2f} ({time.time() - t0:.0f}s)", flush=True)
    vae.eval()
    scale = 1.0 / float(encode_means(vae, x[:2048]).std())
    vae.register_to_config(scaling_factor=round(scale, 5))
    return vae


@torch.no_grad()
def encode_means(vae: Any, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Unscaled posterior means of images ``x`` in [-1, 1]."""
    return torch.cat([vae.encode(x[i : i + chunk]).latent_dist.mean for i in range(0, len(x), chunk)])


@torch.no_grad()
def encode_posteriors(vae: Any, x: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled posterior ``(mean, std)`` of images ``x`` in [-1, 1]."""
    means, stds = [], []
    for i in range(0, len(x), chunk):
        d = vae.encode(x[i : i + chunk]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruct(vae: Any, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Decode the posterior means of ``x``: the VAE's best reconstruction, in [-1, 1]."""
    out = [vae.decode(vae.encode(x[i : i + chunk]).latent_dist.mean).sample for i in range(0, len(x), chunk)]
    return torch.cat(out).clamp(-1, 1)


def round_trip_images(vae: Any, images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) images through the VAE and back, as uint8: what a generated image's
    pixels have been through (``trainers.evaluate.vae_round_trip``, the evaluator's own, on arrays)."""
    from PIL import Image

    from trainers.evaluate import vae_round_trip

    return np.stack([np.asarray(im) for im in vae_round_trip(vae, [Image.fromarray(a) for a in images], chunk=256)])
