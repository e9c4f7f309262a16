"""What a step of each method costs on the same model, data and batch, side by side in one run.

Part 1, the toy world (``builtin:toyworld`` on ``builtin:toystar``, 32 px, the demos' batch 4):
median optimizer-step time of LoRA as the demo runs it (rank 8 on attention + ResNet convs, text
embeddings from the cache), LoRA with the text encoder run every step (the reference scripts'
way: isolates what the text cache earns), textual inversion with 1 and 8 vectors (its text
encoder runs forward and backward every step: the gradient reaches the new rows through it), and
DreamBooth without and with prior preservation (the whole UNet in fp32; the prior doubles the
batch through the UNet).
Rounds are interleaved so machine noise hits every arm alike. Also: trainable numbers, AdamW state,
and the bytes of every exported file.

Part 2, SD 1.5's vocabulary (49408 x 768): the embedding update that differs between textual
inversion implementations. diffusers' and kohya's scripts train the whole embedding matrix (its
gradient is dense) and copy every other row back after each AdamW step; sdsweep trains only the
new rows beside the frozen matrix. Same AdamW settings, same gradient on the new rows.

    python bench/bench_methods.py                  # ~2 min on 2 CPU cores
    python bench/bench_methods.py --rounds 7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.cli import quiet_libraries  # noqa: E402

quiet_libraries()

from trainers.config import DreamBoothSettings, LoraSettings, RunConfig, TextualInversionSettings, TrainConfig  # noqa: E402
from trainers.data import DataConfig, preflight  # noqa: E402
from trainers.dreambooth import DreamBoothTrainer  # noqa: E402
from trainers.latents import build_latent_cache  # noqa: E402
from trainers.lora import LoraTrainer  # noqa: E402
from trainers.models import load_base_model  # noqa: E402
from trainers.textual_inversion import TextualInversionTrainer  # noqa: E402

# Class prompts for prior preservation: known shapes (the prior the toy world has).
CLASS_PROMPTS = ("a red circle on a blue background", "a green square on a white background",
                 "a yellow triangle on a black background", "a white cross on a red background")
LORA = LoraSettings(rank=8, alpha=8, target_modules=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"))


def _arms(root: Path, batch: int) -> dict[str, Callable[[], Any]]:
    """Arm name -> a factory of a fresh trainer on its own base model (so arms never share one)."""
    data_cfg = DataConfig(path="builtin:toystar", resolution=32, random_flip=True)

    def data(model: Any, text: bool) -> Any:
        return build_latent_cache(preflight(data_cfg), data_cfg, model, root=root / "cache", cache_text=text)

    def train(steps: int = 10_000) -> TrainConfig:
        return TrainConfig(learning_rate=3e-3, max_train_steps=steps, train_batch_size=batch)

    def lora(text_cached: bool) -> Callable[[], Any]:
        def make() -> Any:
            m = load_base_model("builtin:toyworld")
            return LoraTrainer(m, data(m, text_cached), train(), LORA, root / "out")
        return make

    def ti(vectors: int) -> Callable[[], Any]:
        def make() -> Any:
            m = load_base_model("builtin:toyworld")
            s = TextualInversionSettings(placeholder_token="sks shape", vectors_per_token=vectors, initializer="shape")
            return TextualInversionTrainer(m, data(m, False), train(), s, root / "out")
        return make

    def dreambooth(prior: bool) -> Callable[[], Any]:
        def make() -> Any:
            m = load_base_model("builtin:toyworld")
            db = DreamBoothSettings(prior_loss_weight=1.0 if prior else 0.0, num_class_images=16, class_steps=10,
                                    class_prompt=CLASS_PROMPTS if prior else None)
            run = RunConfig.model_validate({"model": "builtin:toyworld", "data": data_cfg.model_dump(),
                                            "method": "dreambooth", "dreambooth": db.model_dump(),
                                            "cache_dir": str(root / "cache")})
            extra, _ = DreamBoothTrainer.prepare_extra(run, m, "cpu")
            return DreamBoothTrainer(m, data(m, True), train(), db, root / "out", extra=extra)
        return make

    return {"lora (text cached)": lora(True), "lora (text encoder every step)": lora(False),
            "textual inversion, 1 vector": ti(1), "textual inversion, 8 vectors": ti(8),
            "dreambooth": dreambooth(False), "dreambooth + prior preservation": dreambooth(True)}


def toy_world(rounds: int, steps: int, batch: int) -> dict[str, Any]:
    """Part 1: interleaved step timings and the exports' sizes."""
    with tempfile.TemporaryDirectory(prefix="sdsweep-bench-methods-") as tmp:
        root = Path(tmp)
        trainers = {name: make() for name, make in _arms(root, batch).items()}
        for tr in trainers.values():
            tr.train(until_step=3)  # warm-up: allocator, autograd graph caches
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(rounds):
            for name, tr in trainers.items():
                t0 = time.perf_counter()
                tr.train(until_step=tr.global_step + steps)
                times[name].append((time.perf_counter() - t0) / steps)
        out: dict[str, Any] = {}
        for name, tr in trainers.items():
            export = root / "export" / name.replace(" ", "_").replace(",", "")
            export.mkdir(parents=True)
            weights = tr.export_weights(export)
            trainable = sum(p.numel() for p in tr.trainable)
            adam = sum(t.numel() * t.element_size() for st in tr.optimizer.state.values() for t in st.values()
                       if torch.is_tensor(t) and t.dim() > 0)
            out[name] = {"step_s": statistics.median(times[name]), "rounds_s": times[name], "trainable": trainable,
                         "adam_state_bytes": adam, "export": weights.name, "export_bytes": weights.stat().st_size}
        community = root / "community"
        community.mkdir()
        ckpt = trainers["textual inversion, 8 vectors"].save_checkpoint(root / "ckpt")
        for f in TextualInversionTrainer.export_files(ckpt, community, "bench", {}):
            out.setdefault("community files", {})[f] = (community / f).stat().st_size
        for tr in trainers.values():
            tr.teardown()
    return out


def sd15_embedding_update(steps: int, vectors: int = 1, vocab: int = 49408, dim: int = 768) -> dict[str, Any]:
    """Part 2: one AdamW update of the embedding, the whole matrix + restore vs the new rows only."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(vocab, dim, generator=g) * 0.02
    grad_rows = torch.randn(steps, vectors, dim, generator=g) * 1e-3
    first = vocab - vectors  # the new tokens sit at the end of the resized matrix

    full = torch.nn.Parameter(base.clone())
    original = base.clone()
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[first:] = False
    opt_full = torch.optim.AdamW([full], lr=5e-3, weight_decay=1e-2)
    rows = torch.nn.Parameter(base[first:].clone())
    opt_rows = torch.optim.AdamW([rows], lr=5e-3, weight_decay=1e-2)

    def full_step(i: int) -> None:  # diffusers / kohya: dense gradient, step, copy the rest back
        full.grad = torch.zeros_like(full)
        full.grad[first:] = grad_rows[i]
        opt_full.step()
        with torch.no_grad():
            full[keep] = original[keep]

    def rows_step(i: int) -> None:  # sdsweep: only the new rows are a parameter
        rows.grad = grad_rows[i].clone()
        opt_rows.step()

    t_full, t_rows = [], []
    for i in range(steps):  # interleaved
        t0 = time.perf_counter()
        full_step(i)
        t_full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows_step(i)
        t_rows.append(time.perf_counter() - t0)
    same = torch.allclose(full.detach()[first:], rows.detach(), atol=1e-7)
    untouched = torch.equal(full.detach()[:first], original[:first])
    state = lambda opt: sum(t.numel() * t.element_size() for st in opt.state.values()  # noqa: E731
                            for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    return {"vocab": vocab, "dim": dim, "vectors": vectors, "steps": steps,
            "full_matrix_s": statistics.median(t_full), "new_rows_s": statistics.median(t_rows),
            "full_matrix_adam_bytes": state(opt_full), "new_rows_adam_bytes": state(opt_rows),
            "new_rows_equal": bool(same), "other_rows_untouched": bool(untouched)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per arm per round")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    toy = toy_world(args.rounds, args.steps, args.batch)
    ref = toy["lora (text cached)"]["step_s"]
    print(f"toy world, batch {args.batch}, median of {args.rounds} interleaved rounds x {args.steps} steps "
          f"({args.threads} threads):")
    print(f"  {'arm':32s} {'ms/step':>8s} {'vs LoRA':>8s} {'trainable':>10s} {'AdamW state':>12s}  export")
    for name, r in toy.items():
        if name == "community files":
            continue
        print(f"  {name:32s} {r['step_s'] * 1e3:8.2f} {r['step_s'] / ref:7.2f}x {r['trainable']:10d} "
              f"{r['adam_state_bytes']:11d}B  {r['export']} {r['export_bytes']} B")
    print(f"  textual inversion exports (8 vectors): {toy['community files']}")
    sd = sd15_embedding_update(steps=30)
    print(f"SD 1.5 embedding update ({sd['vocab']} x {sd['dim']}, {sd['vectors']} new vector, AdamW, median of "
          f"{sd['steps']}):")
    print(f"  whole matrix + restore the other rows (diffusers, kohya): {sd['full_matrix_s'] * 1e3:.2f} ms, AdamW "
          f"state {sd['full_matrix_adam_bytes'] / 2**20:.1f} MiB")
    print(f"  new rows only (sdsweep):                                 {sd['new_rows_s'] * 1e3:.3f} ms, AdamW "
          f"state {sd['new_rows_adam_bytes'] / 2**10:.1f} KiB")
    print(f"  ratio {sd['full_matrix_s'] / sd['new_rows_s']:.0f}x; same new rows: {sd['new_rows_equal']}; "
          f"other rows untouched by the reference: {sd['other_rows_untouched']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"toy_world": toy, "sd15_embedding_update": sd}, indent=1))


if __name__ == "__main__":
    main()
