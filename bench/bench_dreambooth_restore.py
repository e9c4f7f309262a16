"""Per-trial cost of DreamBooth's base-model restore at SD 1.5 size, on the CPU.

A reused Ray worker keeps one base model for many trials; a DreamBooth trial changes every UNet
weight, so ``DreamBoothTrainer.configure_trainable`` snapshots the UNet's ``state_dict()`` to the
CPU (``v.detach().to("cpu", copy=True)``) before training, and ``restore_base_model`` copies it
back with ``load_state_dict(strict=True)`` into the same Parameters. This script times both with
the trainer's own methods, on an SD 1.5-size ``UNet2DConditionModel`` (``SD15_UNET`` of
``bench/flops_sd15.py``; random fp32 weights, 859.5 M numbers, 3.44 GB; no download). The
trainer is not built through ``__init__`` (that needs a whole pipeline, latent cache and
accelerator): ``DreamBoothTrainer.__new__`` plus the attributes the two methods read
(``model.unet``, ``db``, ``cfg``, ``_pristine``, ``ema``), so the timed code is the product's.

Each round, side by side:

- ``snapshot``: ``trainer.configure_trainable()`` (the copy out; allocates 3.44 GB);
- ``memcpy out`` / ``memcpy back``: ``Tensor.copy_`` of the same tensors into storage that is
  already allocated (pristine buffers, the Parameters): the bandwidth bound of each direction;
- a fake "training" change (noise added to every weight; untimed), then ``restore``:
  ``trainer.restore_base_model()``; every tensor is checked ``torch.equal`` to the snapshot;
- ``reload``: the reference alternative, ``UNet2DConditionModel.from_pretrained`` of the same
  weights saved once with ``save_pretrained(safe_serialization=True)`` into a temporary folder
  (warm page cache: the file was just written; a cold read would be slower), checked equal too.
  ``from_pretrained`` returns weights still mapped from the file (read lazily), so the reload is
  timed in two parts: the call (``reload_lazy``), then every weight written once in place
  (``reload_first_write``: the copy-on-write a trial's first optimizer step would pay);
  ``reload`` is their sum.

Reports medians (seconds and GB/s, GB = 1e9 bytes), ratios, the resident memory the snapshot
adds (current RSS before/after) and the process's peak RSS (``getrusage``). On a GPU the copy out
is device -> host over PCIe and the copy back host -> device; neither is measured here: these are
host memcpy costs. Peak RSS about 10.3 GB (the reload arm's second UNet, on top of the trainer's
UNet and of freed snapshot pages the allocator keeps); disk 3.44 GB in ``--tmpdir``.

    python bench/bench_dreambooth_restore.py [--rounds N] [--threads T] [--tmpdir DIR] [--json out.json]
    # ~1 min 45 s on the 2-core dev machine, quiet, with the defaults (5 rounds, 2 torch threads);
    # most of it is the reload arm and the untimed checks
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flops_sd15 import SD15_UNET  # noqa: E402  (also quiets library notices)

from diffusers import UNet2DConditionModel  # noqa: E402
from trainers.config import DreamBoothSettings, TrainConfig  # noqa: E402
from trainers.dreambooth import DreamBoothTrainer  # noqa: E402

# SD 1.5's block layout (diffusers' defaults, spelled out so the size cannot drift with them).
SD15_BLOCKS = dict(in_channels=4, out_channels=4,
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TIMED = ("snapshot", "restore", "memcpy_out", "memcpy_back", "reload_lazy", "reload_first_write", "reload")


def rss_bytes() -> int:
    """The process's current resident set size (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Seconds ``fn(*args)`` took, and what it returned."""
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def minimal_trainer(unet: UNet2DConditionModel) -> DreamBoothTrainer:
    """A DreamBoothTrainer carrying only what ``configure_trainable`` / ``restore_base_model``
    read: the full ``__init__`` would build a pipeline, a latent cache and an accelerator."""
    trainer = DreamBoothTrainer.__new__(DreamBoothTrainer)
    trainer.model = SimpleNamespace(unet=unet)
    trainer.db = DreamBoothSettings()  # whole UNet, no text encoder, no EMA: the default
    trainer.cfg = TrainConfig()
    trainer._pristine = {}
    trainer.ema = None
    return trainer


def all_equal(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` has exactly ``reference``'s keys and every tensor equal (``torch.equal``)."""
    return state.keys() == reference.keys() and all(torch.equal(v, reference[k]) for k, v in state.items())


@torch.no_grad()
def perturb(unet: UNet2DConditionModel, seed: int) -> None:
    """Fake training: add noise (std 0.01) to every weight, in place."""
    gen = torch.Generator().manual_seed(seed)
    for p in unet.parameters():
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=1e-2)


@torch.no_grad()
def copy_all(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor]) -> None:
    """``dst[k].copy_(src[k])`` for every key: a plain memcpy into storage already allocated."""
    for k, v in dst.items():
        v.copy_(src[k])


@torch.no_grad()
def write_once(module: torch.nn.Module) -> None:
    """Write every weight once, in place, unchanged (``mul_(1.0)`` is exact): what a trial's first
    optimizer step does to a freshly loaded model. ``from_pretrained`` returns weights mapped
    from the safetensors file, read and copied (copy-on-write) only when first touched."""
    for p in module.parameters():
        p.mul_(1.0)


def one_round(trainer: DreamBoothTrainer, saved: Path, seed: int) -> dict[str, Any]:
    """Snapshot, memcpy out / back, fake training, restore (checked), reload (checked)."""
    unet = trainer.model.unet
    objects = [(p, p.data_ptr()) for p in unet.parameters()]
    rss_before = rss_bytes()
    r: dict[str, Any] = {}
    r["snapshot"], _ = timed(trainer.configure_trainable)
    r["snapshot_rss_added"] = rss_bytes() - rss_before
    pristine = dict(trainer._pristine["unet"])  # references: restore_base_model clears its dict
    params = unet.state_dict()  # detached views of the Parameters' storage
    r["memcpy_out"], _ = timed(copy_all, pristine, params)  # same values: harmless
    r["memcpy_back"], _ = timed(copy_all, params, pristine)
    perturb(unet, seed)
    r["perturbed_differs"] = not any(torch.equal(v, pristine[k]) for k, v in unet.state_dict().items())
    r["restore"], _ = timed(trainer.restore_base_model)
    r["restore_exact"] = all_equal(unet.state_dict(), pristine)
    r["same_parameters"] = all(p is q and p.data_ptr() == ptr for p, (q, ptr) in zip(unet.parameters(), objects))
    del pristine, params, objects  # the snapshot is gone after a trial, as in the product
    r["reload_lazy"], reloaded = timed(UNet2DConditionModel.from_pretrained, saved)
    r["reload_first_write"], _ = timed(write_once, reloaded)
    r["reload"] = r["reload_lazy"] + r["reload_first_write"]
    r["reload_exact"] = all_equal(reloaded.state_dict(), unet.state_dict())
    del reloaded
    return r


def summarise(rounds: list[dict[str, Any]], nbytes: int) -> dict[str, Any]:
    """Median seconds and GB/s of each timed operation, ratios, and the checks over all rounds."""
    med = {k: statistics.median(r[k] for r in rounds) for k in TIMED}
    return {
        "median_s": med,
        "gb_per_s": {k: nbytes / 1e9 / s for k, s in med.items()},
        "ratios": {"reload / restore": med["reload"] / med["restore"],
                   "reload / (snapshot + restore)": med["reload"] / (med["snapshot"] + med["restore"]),
                   "snapshot / memcpy_out": med["snapshot"] / med["memcpy_out"],
                   "restore / memcpy_back": med["restore"] / med["memcpy_back"]},
        "all_perturbed": all(r["perturbed_differs"] for r in rounds),
        "all_restored_exact": all(r["restore_exact"] for r in rounds),
        "all_same_parameters": all(r["same_parameters"] for r in rounds),
        "all_reloads_exact": all(r["reload_exact"] for r in rounds),
        "median_snapshot_rss_added_bytes": statistics.median(r["snapshot_rss_added"] for r in rounds),
        # The first trial on a worker: its snapshot lands on pages the process never had (page
        # faults); later ones may reuse pages the previous snapshot freed, if the allocator kept them.
        "first_round": {"snapshot_s": rounds[0]["snapshot"],
                        "snapshot_rss_added_bytes": rounds[0]["snapshot_rss_added"]},
    }


def run(rounds: int, tmpdir: str | None) -> dict[str, Any]:
    """Build the SD 1.5-size UNet, save it once, then ``rounds`` interleaved rounds."""
    torch.manual_seed(0)
    build_s, unet = timed(lambda: UNet2DConditionModel(**SD15_UNET, **SD15_BLOCKS).eval().requires_grad_(False))
    state = unet.state_dict()
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    info: dict[str, Any] = {"params": sum(v.numel() for v in state.values()), "tensors": len(state),
                            "bytes": nbytes, "dtype": str(next(iter(state.values())).dtype),
                            "build_s": build_s, "rss_model_only_bytes": rss_bytes()}
    del state
    print(f"SD 1.5 UNet: {info['params'] / 1e6:.1f} M numbers, {info['tensors']} tensors, "
          f"{nbytes / 1e9:.2f} GB {info['dtype']}; built in {build_s:.1f} s", flush=True)
    trainer = minimal_trainer(unet)
    with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
        info["save_s"], _ = timed(lambda: unet.save_pretrained(tmp, safe_serialization=True))
        per_round = []
        for i in range(rounds):
            per_round.append(one_round(trainer, Path(tmp), seed=i))
            print(f"  round {i + 1}: " + ", ".join(f"{k} {per_round[-1][k]:.2f} s" for k in TIMED), flush=True)
    return {**info, "rounds": per_round, **summarise(per_round, nbytes), "peak_rss_bytes": peak_rss_bytes()}


def report(res: dict[str, Any], threads: int) -> None:
    """Print the medians, ratios, checks and memory."""
    gb = res["bytes"] / 1e9
    print(f"median of {len(res['rounds'])} rounds, {threads} torch threads, {gb:.2f} GB moved per operation:")
    labels = {"snapshot": "snapshot (configure_trainable: .to('cpu', copy=True))",
              "restore": "restore (restore_base_model: load_state_dict)",
              "memcpy_out": "memcpy out (copy_ into allocated buffers)",
              "memcpy_back": "memcpy back (copy_ into the Parameters)",
              "reload_lazy": "reload: from_pretrained returns (weights file-mapped)",
              "reload_first_write": "reload: every weight written once (copy-on-write)",
              "reload": "reload total (from_pretrained + first write)"}
    for k, label in labels.items():
        print(f"  {label:56s} {res['median_s'][k]:7.3f} s  {res['gb_per_s'][k]:6.2f} GB/s")
    for name, value in res["ratios"].items():
        print(f"  {name:56s} {value:7.2f}x")
    print(f"  fake training changed every tensor: {res['all_perturbed']}; restore exact (torch.equal, every "
          f"tensor): {res['all_restored_exact']}; same Parameter objects: {res['all_same_parameters']}; "
          f"reload exact: {res['all_reloads_exact']}")
    first = res["first_round"]
    print(f"  first round's snapshot (fresh pages): {first['snapshot_s']:.3f} s, "
          f"{res['bytes'] / 1e9 / first['snapshot_s']:.2f} GB/s")
    print(f"  RSS: model alone {res['rss_model_only_bytes'] / 1e9:.2f} GB; the snapshot adds "
          f"{first['snapshot_rss_added_bytes'] / 1e9:.2f} GB in round 1, "
          f"{res['median_snapshot_rss_added_bytes'] / 1e9:.2f} GB median; peak {res['peak_rss_bytes'] / 1e9:.2f} GB "
          f"(the reload's model beside the trainer's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over them)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--tmpdir", help="where the saved UNet goes (3.44 GB; default: the system's)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    res = run(args.rounds, args.tmpdir)
    res["threads"] = args.threads
    report(res, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
