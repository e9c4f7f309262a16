"""The toy world's CLIP: a transformers ``CLIPModel`` trained contrastively on captioned scenes.

Its text tower (a ``CLIPTextModel``) becomes the diffusion model's frozen text encoder, as
OpenAI's CLIP ViT-L/14 text tower is Stable Diffusion 1.x's. The tokenizer is the project's
character-level CLIP tokenizer (``trainers.tiny.char_tokenizer``): any text encodes, and a new
word (the demo's token) needs no new vocabulary entry.

Batches hold *distinct* captions (a random subset of the 150) each with one random image of
that caption, so CLIP's symmetric InfoNCE loss with diagonal targets is exactly right: no two
items of a batch are true pairs by accident.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTextConfig, CLIPTextModel

from trainers.tiny import MAX_LENGTH, char_tokenizer
from trainers.toyworld.scenes import SIZE, SceneSet

TEXT_HIDDEN = 64  # == the UNet's cross_attention_dim


def image_processor() -> CLIPImageProcessorPil:
    """The PIL-backend processor saved with the CLIP (32 px: resize and crop are no-ops)."""
    return CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})


def text_config() -> dict[str, Any]:
    """The text tower's config (also the diffusion model's ``text_encoder/config.json``)."""
    tok = char_tokenizer()
    return dict(
        vocab_size=len(tok),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,  # 4x like CLIP (3072 / 768)
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",  # as CLIP ViT-L/14
        projection_dim=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,  # pooled output = first eos (see trainers.tiny)
        pad_token_id=tok.eos_token_id,
    )


def clip_config() -> CLIPConfig:
    """The whole CLIP: the text tower above and a ViT with 4 px patches (8x8 = 64 tokens)."""
    vision = dict(
        image_size=SIZE,
        patch_size=4,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_act="quick_gelu",
    )
    return CLIPConfig(text_config=text_config(), vision_config=vision, projection_dim=64)


def normalize_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) -> the ``pixel_values`` the saved image processor would produce."""
    proc = image_processor()
    x = torch.from_numpy(images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def train_clip(data: SceneSet, steps: int, seed: int, batch: int = 100, lr: float = 1e-3) -> CLIPModel:
    """Contrastively train a CLIP on ``data`` (which should hold every caption several times)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CLIPModel(clip_config())
    captions = data.captions
    unique = sorted(set(captions))
    by_caption: dict[str, list[int]] = {c: [] for c in unique}
    for i, c in enumerate(captions):
        by_caption[c].append(i)
    enc = char_tokenizer()(unique, padding=True, return_tensors="pt")
    pixels = normalize_pixels(data.images)
    batch = min(batch, len(unique))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    t0 = time.time()
    for step in range(steps):
        pick = torch.randperm(len(unique), generator=gen)[:batch]
        rows = [by_caption[unique[j]] for j in pick.tolist()]
        img_idx = [r[int(torch.randint(0, len(r), (1,), generator=gen))] for r in rows]
        out = model(
            input_ids=enc["input_ids"][pick],
            attention_mask=enc["attention_mask"][pick],
            pixel_values=pixels[img_idx],
            return_loss=True,
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # CLIP clamps its temperature at 100 (Radford et al. 2021, sec. 2.5)
            model.logit_scale.clamp_(0, float(np.log(100)))
        if step % 200 == 0 or step == steps - 1:
            print(f"[clip] step {step}/{steps} loss {out.loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return model


def refine_vision(clip: CLIPModel, images: np.ndarray, caption_ids: torch.Tensor, captions: list[str], steps: int,
                  seed: int, batch: int = 128, lr: float = 3e-4) -> CLIPModel:
    """Teach the vision tower what generated images look like, against the frozen text tower.

    ``images`` (uint8, N x 32 x 32 x 3) are renders, the same renders passed through the VAE and
    the base model's drawings, each labelled by the caption that made it (``caption_ids`` into
    ``captions``). Loss: cross-entropy of each image's similarity to every caption's (frozen)
    text embedding, as CLIP scores zero-shot. The text tower, its projection and the temperature
    do not change, so the diffusion model's text encoder (a copy of the text tower) stays valid.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    frozen = [*clip.text_model.parameters(), *clip.text_projection.parameters(), clip.logit_scale]
    for p in frozen:
        p.requires_grad_(False)
    with torch.no_grad():
        enc = char_tokenizer()(captions, padding=True, return_tensors="pt")
        text = clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        text = torch.nn.functional.normalize(text, dim=-1)
    scale = clip.logit_scale.exp().detach()
    pixels = normalize_pixels(images)
    params = [*clip.vision_model.parameters(), *clip.visual_projection.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    clip.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(pixels), (batch,), generator=gen)
        x = pixels[idx]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        img = torch.nn.functional.normalize(clip.get_image_features(pixel_values=x).pooler_output, dim=-1)
        loss = torch.nn.functional.cross_entropy(scale * img @ text.T, caption_ids[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"[clip-refine] step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    for p in frozen:
        p.requires_grad_(True)
    clip.eval()
    return clip


def text_encoder_from(clip: CLIPModel) -> CLIPTextModel:
    """A standalone ``CLIPTextModel`` holding exactly ``clip``'s text tower weights."""
    te = CLIPTextModel(CLIPTextConfig(**text_config()))
    # transformers 5: CLIPModel.text_model *is* a CLIPTextModel, so the keys match one to one.
    te.load_state_dict(clip.text_model.state_dict(), strict=True)
    te.eval()
    return te


def save_clip(clip: CLIPModel, out: Path) -> None:
    """Write the CLIP, its tokenizer and its PIL image processor in the transformers layout."""
    clip.save_pretrained(out, safe_serialization=True)
    char_tokenizer().save_pretrained(out)
    image_processor().save_pretrained(out)
