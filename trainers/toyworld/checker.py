"""The checker: a small CNN that labels a toy-world image's shape, colour and background.

It is the world's ground truth for *generated* images: ``judge(images, prompts)`` says, per
image, whether each attribute the prompt asks for is what the checker sees. It is trained on
rendered scenes of all five shapes (the held-out star included) with light noise and blur, so
it still reads the slightly soft, slightly noisy images a diffusion model draws.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from trainers.tensor_files import atomic_save_safetensors, atomic_write_text
from trainers.toyworld.scenes import COLOUR_NAMES, SHAPES, SIZE, SceneSet, parse_caption, to_tensor_range

WEIGHTS_NAME = "checker.safetensors"
CONFIG_NAME = "config.json"


class Checker(nn.Module):
    """Four conv stages (32 -> 16 -> 8 -> 4 px) and one linear head per attribute."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        w = width

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2),
            )  # fmt: skip

        self.features = nn.Sequential(stage(3, w), stage(w, 2 * w), stage(2 * w, 2 * w), nn.Flatten())
        feat = 2 * w * (SIZE // 8) ** 2
        self.trunk = nn.Sequential(nn.Linear(feat, 4 * w), nn.ReLU())
        self.shape_head = nn.Linear(4 * w, len(SHAPES))
        self.colour_head = nn.Linear(4 * w, len(COLOUR_NAMES))
        self.background_head = nn.Linear(4 * w, len(COLOUR_NAMES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits ``(shape, colour, background)`` for images ``x`` in [-1, 1], (N, 3, 32, 32)."""
        h = self.trunk(self.features(x))
        return self.shape_head(h), self.colour_head(h), self.background_head(h)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise (sigma up to 0.08 in [-1, 1] units) and, for half the batch, a 3x3 blur:
    about what a VAE decode adds to a clean render, so generated images stay in distribution."""
    n = x.shape[0]
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * 0.08
    x = x + sigma * torch.randn(x.shape, generator=gen)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    pick = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).float()
    return pick * blurred + (1 - pick) * x


def _labels(data: SceneSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(to_tensor_range(data.images))
    return x, torch.from_numpy(data.shape), torch.from_numpy(data.colour), torch.from_numpy(data.background)


def train_checker(data: SceneSet, steps: int, seed: int, batch: int = 128, lr: float = 2e-3) -> Checker:
    """Train a checker on ``data`` for ``steps`` Adam steps (one-cycle cosine LR), seeded."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Checker()
    x, ys, yc, yb = _labels(data)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        ls, lc, lb = model(_augment(x[idx], gen))
        loss = F.cross_entropy(ls, ys[idx]) + F.cross_entropy(lc, yc[idx]) + F.cross_entropy(lb, yb[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"[checker] step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return model


@torch.no_grad()
def predict(model: Checker, images: np.ndarray | torch.Tensor, chunk: int = 512) -> np.ndarray:
    """Predicted label indices ``(N, 3)``: shape, colour, background, for uint8 (N, 32, 32, 3)
    arrays or float tensors in [-1, 1] (N, 3, 32, 32)."""
    x = torch.from_numpy(to_tensor_range(images)) if isinstance(images, np.ndarray) else images
    device = next(model.parameters()).device  # the evaluator puts the checker on the trial's GPU
    out = []
    for i in range(0, len(x), chunk):
        logits = model(x[i : i + chunk].to(device))
        out.append(torch.stack([lg.argmax(dim=-1) for lg in logits], dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 3), dtype=np.int64)


def accuracy(model: Checker, data: SceneSet) -> dict[str, float]:
    """Per-attribute and all-three accuracy of ``model`` on a labelled scene set."""
    pred = predict(model, data.images)
    truth = np.stack([data.shape, data.colour, data.background], axis=1)
    hit = pred == truth
    return {
        "shape": float(hit[:, 0].mean()),
        "colour": float(hit[:, 1].mean()),
        "background": float(hit[:, 2].mean()),
        "all": float(hit.all(axis=1).mean()),
    }


@dataclass(frozen=True)
class Verdict:
    """What the checker saw in one image versus what its prompt asked for."""

    prompt: str
    seen: tuple[str, str, str]  # (shape, colour, background) the checker reads
    shape_ok: bool
    colour_ok: bool
    background_ok: bool

    @property
    def correct(self) -> bool:
        """All three attributes as the prompt asked."""
        return self.shape_ok and self.colour_ok and self.background_ok


def _as_array(images: Sequence[Image.Image]) -> np.ndarray:
    arrays = []
    for i, im in enumerate(images):
        if im.size != (SIZE, SIZE):
            raise ValueError(f"image {i} is {im.size[0]}x{im.size[1]}; the checker reads {SIZE}x{SIZE} images")
        arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return np.stack(arrays) if arrays else np.zeros((0, SIZE, SIZE, 3), np.uint8)


def judge(model: Checker, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[Verdict]:
    """Per image: does the checker see the shape, colour and background its prompt names?"""
    if len(images) != len(prompts):
        raise ValueError(f"judge needs one prompt per image; got {len(images)} images, {len(prompts)} prompts")
    wanted = [parse_caption(p) for p in prompts]  # a non-caption prompt fails before any work
    pred = predict(model, _as_array(images))
    out = []
    for prompt, (s, c, b), (ps, pc, pb) in zip(prompts, wanted, pred):
        seen = (SHAPES[ps], COLOUR_NAMES[pc], COLOUR_NAMES[pb])
        out.append(Verdict(prompt, seen, seen[0] == s, seen[1] == c, seen[2] == b))
    return out


def save_checker(model: Checker, out: Path, recipe: dict[str, object] | None = None) -> None:
    """Write ``checker.safetensors`` + ``config.json`` (with the build ``recipe``) into ``out``."""
    config = {"class": "Checker", "width": model.width, "size": SIZE, "shapes": SHAPES, "colours": COLOUR_NAMES}
    if recipe is not None:
        config["recipe"] = recipe
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    # One metadata key only: safetensors 0.8 stores metadata in a Rust HashMap whose order is
    # random per process, so two keys make identical weights hash differently (measured).
    meta = {"producer": "sdsweep trainers.toyworld.checker (config.json holds the recipe)"}
    atomic_save_safetensors(model.state_dict(), out / WEIGHTS_NAME, meta)


def load_checker(root: Path) -> Checker:
    """Load a checker written by ``save_checker``; the vocabularies must match this code's."""
    config = json.loads((root / CONFIG_NAME).read_text())
    if tuple(config["shapes"]) != SHAPES or tuple(config["colours"]) != COLOUR_NAMES:
        raise ValueError(f"{root}: checker vocabulary {config['shapes']}/{config['colours']} does not match this code's")
    model = Checker(width=int(config["width"]))
    model.load_state_dict(load_file(root / WEIGHTS_NAME))
    model.eval()
    return model
