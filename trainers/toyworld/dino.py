"""The toy world's stand-in for DINO: a transformers vision backbone trained without labels.

Real subject-fidelity metrics (DreamBooth's DINO score) embed images with a self-supervised
backbone that was trained on photos like the ones it judges. This one is trained the same way on
the toy world's own images: renders of the four trained shapes, the same renders passed through
the toy VAE (what a generated image looks like), and, when given, the base model's drawings of
the trained shapes -- never a star, never a label, never a checker verdict.

Objective: contrastive (SimCLR's NT-Xent) between two augmented views of one image, or of a
render and its VAE round trip. DINO's own objective (self-distillation with an EMA teacher) has
the same no-label property; the contrastive one is the sturdier of the two at this scale. The
augmentations carry what the backbone must ignore: colour (a random affine map per channel, sign
included, channel permutation, grey), the VAE's softness (blur, noise) and framing (a random
resized, slightly rotated crop, flips). What is left for it to tell apart is the shape.

Two architectures: DINOv2's ViT (``Dinov2Model``, small) and a small ``ResNetModel``; at this
scale only the ConvNet learns shapes in a few thousand CPU steps (docs/TOYWORLD.md, "The DINO
stand-in"). The saved directory is a standard transformers vision model (``config.json``,
``model.safetensors``, ``preprocessor_config.json``) that ``trainers.scoring_models
.load_vision_model`` loads like ``facebook/dinov2-base``; the metric uses a ViT's class token or a
ConvNet's pooled output.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model, ResNetConfig, ResNetModel

from trainers.toyworld.scenes import SIZE

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's processor normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_config() -> Dinov2Config:
    """A small DINOv2 ViT: 4 px patches (8x8 = 64 tokens + the class token)."""
    return Dinov2Config(image_size=SIZE, patch_size=4, hidden_size=64, num_hidden_layers=4,
                        num_attention_heads=4, mlp_ratio=4, layerscale_value=1.0)


def resnet_config() -> ResNetConfig:
    """A small ResNet (a ConvNet's locality bias learns shapes from little data)."""
    return ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic",
                        downsample_in_first_stage=False)


def _features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The metric's embedding (``trainers.scoring_models.vision_embeddings``): a ViT's class token,
    a ConvNet's pooled output."""
    out = model(pixel_values=pixels)
    hidden = getattr(out, "last_hidden_state", None)
    return hidden[:, 0] if hidden is not None and hidden.dim() == 3 else out.pooler_output.flatten(1)


def image_processor() -> BitImageProcessorPil:
    """The PIL-backend processor saved with the backbone (32 px: resize and crop are no-ops)."""
    return BitImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def normalize_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 32, 32, 3), or float (N, 3, 32, 32) in [0, 1] -> the processor's ``pixel_values``."""
    x = images if isinstance(images, torch.Tensor) else \
        torch.from_numpy(images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random view of each image of ``x`` (float (N, 3, H, W) in [0, 1])."""
    n = x.shape[0]
    # framing, drawn independently for each view so that where the shape is, how large and how
    # turned are no use for telling two images apart: zoom 0.75-1.3, any rotation, a shift of up
    # to 6 px, maybe mirrored (the border colour fills what comes into view)
    scale = _uniform(n, 0.75, 1.3, g)
    angle = _uniform(n, -math.pi, math.pi, g)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    shift = _uniform(2 * n, -0.4, 0.4, g).view(n, 2)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="border",
                      align_corners=False)
    # colour: channels permuted, each mapped by a + b*c with |b| in [0.4, 1] and either sign, kept in [0, 1]
    x = torch.gather(x, 1, torch.argsort(torch.rand(n, 3, generator=g), 1)[:, :, None, None].expand_as(x))
    slope = _uniform(3 * n, 0.4, 1.0, g).view(n, 3, 1, 1)
    negative = torch.rand(n, 3, 1, 1, generator=g) < 0.5
    offset = torch.rand(n, 3, 1, 1, generator=g) * (1 - slope)
    x = torch.where(negative, 1 - offset - slope * x, offset + slope * x)
    grey = torch.rand(n, 1, 1, 1, generator=g) < 0.2
    x = torch.where(grey, x.mean(1, keepdim=True).expand_as(x), x)
    # the VAE's softness: blur (half the views) and a little noise (a third)
    sigma = _uniform(n, 0.3, 1.2, g)
    taps = torch.arange(-2, 3, dtype=x.dtype)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    blurred = F.conv2d(F.pad(x.reshape(1, 3 * n, *x.shape[2:]), (2, 2, 0, 0), mode="replicate"),
                       kernel.repeat_interleave(3, 0)[:, None, None, :], groups=3 * n)
    blurred = F.conv2d(F.pad(blurred, (0, 0, 2, 2), mode="replicate"),
                       kernel.repeat_interleave(3, 0)[:, None, :, None], groups=3 * n).view_as(x)
    x = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.5, blurred, x)
    noisy = torch.rand(n, 1, 1, 1, generator=g) < 0.3
    x = x + noisy * 0.03 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


class _Head(torch.nn.Module):
    """SimCLR's projection head (training only; the saved backbone stops at the embedding)."""

    def __init__(self, dim: int, hidden: int = 256, out: int = 64) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view's partner is its positive, the other 2N - 2 views its negatives."""
    z = torch.cat([z1, z2])
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


def nearest_in(support: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Each row of ``z`` replaced by its nearest neighbour (cosine) among ``support``'s rows."""
    return support[(z @ support.T).argmax(1)]


def train_dino(images: np.ndarray, partner: np.ndarray, steps: int, seed: int, batch: int = 256,
               lr: float = 1e-3, temperature: float = 0.2, log_every: int = 0, arch: str = "resnet",
               support: int = 0) -> torch.nn.Module:
    """Train the backbone on uint8 ``images`` (N, 32, 32, 3) without labels.

    ``partner[i]`` is another rendering of image ``i``'s scene (its VAE round trip) or ``i``
    itself; half the positive pairs are (view of i, view of partner[i]). ``support`` > 0: NNCLR
    (Dwibedi et al. 2021) -- each view's positive is the nearest neighbour of its partner view
    among the last ``support`` embeddings, so images that look alike (the same shape) pull
    together instead of only two views of one image.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)
    partner_t = torch.from_numpy(partner.astype(np.int64))
    model: torch.nn.Module = Dinov2Model(dino_config()) if arch == "vit" else ResNetModel(resnet_config())
    head = _Head(model.config.hidden_size if arch == "vit" else model.config.hidden_sizes[-1])
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    queue: torch.Tensor | None = None
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        other = torch.where(torch.rand(batch, generator=g) < 0.5, partner_t[idx], idx)
        v1, v2 = augment(x_all[idx], g), augment(x_all[other], g)
        cls = _features(model, normalize_pixels(torch.cat([v1, v2])))
        z = head(cls)
        z1, z2 = z[:batch], z[batch:]
        if support and queue is not None and len(queue) >= batch:
            n1, n2 = nearest_in(queue, z1).detach(), nearest_in(queue, z2).detach()
            target = torch.arange(batch)
            loss = (F.cross_entropy(n1 @ z2.T / temperature, target) + F.cross_entropy(n2 @ z1.T / temperature, target)) / 2
        else:
            loss = nt_xent(z1, z2, temperature)
        if support:
            queue = z1.detach() if queue is None else torch.cat([z1.detach(), queue])[:support]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"[dino] step {step} loss {loss.item():.3f} {time.perf_counter() - t0:.0f}s", flush=True)
    return model.eval()


@torch.no_grad()
def embed(model: torch.nn.Module, images: np.ndarray, chunk: int = 256) -> torch.Tensor:
    """Unit-norm embeddings of uint8 (N, 32, 32, 3) images (the metric's embedding)."""
    rows = [_features(model, normalize_pixels(images[i:i + chunk])) for i in range(0, len(images), chunk)]
    return F.normalize(torch.cat(rows), dim=-1)


def save_dino(model: torch.nn.Module, out: Path) -> None:
    """Write the backbone in the transformers layout, with its image processor."""
    model.save_pretrained(out, safe_serialization=True)
    image_processor().save_pretrained(out)
