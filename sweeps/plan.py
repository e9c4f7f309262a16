"""``sdsweep plan``: what one trial of a sweep needs on a GPU, how many trials the config packs on
one GPU, and whether they fit, before anything runs.

Ray does not enforce GPU memory: ``resources.gpu: 0.25`` starts four trials on one GPU whether or
not they fit, and the ones that do not die of CUDA out-of-memory minutes in. The plan takes each
searched method's worst case over the search space (the largest batch, rank, resolution; prior
preservation, text-encoder training, EMA and no gradient checkpointing when the space can pick
them), estimates it with :mod:`trainers.memory`, and compares ``trials sharing a GPU x the largest
estimate`` with the GPU's memory (``resources.gpu_memory_gib``, ``--gpu-memory``, or the GPU this
process or the cluster has). ``sdsweep run`` refuses a packing that cannot fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeps.errors import SweepError  # standard library only: `sdsweep --help` imports this module

if TYPE_CHECKING:  # imported where used: sweeps.config pulls in torch
    from sweeps.config import SweepConfig

@dataclass
class MethodPlan:
    """One method's worst-case trial and its estimate."""

    method: str
    worst: dict[str, Any]  # the searched memory keys at their worst values
    estimate: Any  # trainers.memory.MemoryEstimate
    savers: list[str] = field(default_factory=list)  # what lowers it (Trainer.memory_savers)


@dataclass
class Plan:
    """What a sweep asks of a GPU and whether it fits."""

    methods: list[MethodPlan]
    gpu: float  # resources.gpu
    sharing: int  # trials that can share one GPU at once (0: trials use no GPU)
    concurrent: int
    gpu_memory_gib: float | None
    memory_source: str
    scoring_note: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def largest(self) -> MethodPlan:
        return max(self.methods, key=lambda m: m.estimate.total_bytes)

    @property
    def fits(self) -> int | None:
        """Trials of the largest method that fit one GPU (None: GPU memory unknown)."""
        if self.gpu_memory_gib is None:
            return None
        return int(self.gpu_memory_gib // self.largest.estimate.total_gib)

    def problem(self) -> str | None:
        """Why the packing cannot fit (naming the key and the fix), or None."""
        fits = self.fits
        if not self.sharing or fits is None or self.sharing <= fits:
            return None
        big = self.largest
        need = self.sharing * big.estimate.total_gib
        lower = ", ".join(big.savers)
        if fits == 0:
            fix = f"no packing fits: use a GPU with more memory, or lower the search space's worst case ({lower})"
        else:
            fix = (f"set resources.gpu to {_fraction_for(fits)} or more ({fits} trial{'s' * (fits > 1)} per GPU), "
                   f"or lower the worst case ({lower})")
        return (f"resources.gpu: {self.gpu:g} packs {self.sharing} trials on one GPU, but a {big.method} trial may "
                f"need ~{big.estimate.total_gib:.1f} GiB ({big.estimate.shape.describe()}): {self.sharing} x "
                f"{big.estimate.total_gib:.1f} = {need:.1f} GiB > {self.gpu_memory_gib:.1f} GiB "
                f"({self.memory_source}). Fix: {fix}")

    def lines(self) -> list[str]:
        """The plan as console lines."""
        out = [f"memory per trial on a GPU, worst case of the search space (estimate: docs/SWEEPS.md, 'GPU memory'):"]
        for m in self.methods:
            out.append(f"  {m.method:<18} {m.estimate.total_gib:6.1f} GiB  {m.estimate.shape.describe()}")
            out.append(f"  {'':<18} {'':>6}      {m.estimate.breakdown()}")
        if self.scoring_note:
            out.append(f"  note: {self.scoring_note}")
        if not self.sharing:
            out.append("resources.gpu: 0: trials run on CPUs (the estimate is for running this sweep on a GPU)")
        else:
            out.append(f"resources.gpu: {self.gpu:g} per trial, max_concurrent_trials {self.concurrent}: up to "
                       f"{self.sharing} trial{'s' * (self.sharing > 1)} share one GPU")
        fits = self.fits
        if fits is None:
            out.append("GPU memory unknown here: pass --gpu-memory GIB (or set resources.gpu_memory_gib) to check "
                       "the packing")
        else:
            out.append(f"GPU memory {self.gpu_memory_gib:.1f} GiB ({self.memory_source}): {fits} "
                       f"{self.largest.method} trial{'s' * (fits != 1)} fit on one GPU")
            problem = self.problem()
            if problem:
                out.append(f"REFUSED: {problem}")
            elif self.sharing:
                out.append(f"packing OK: {self.sharing} x {self.largest.estimate.total_gib:.1f} GiB <= "
                           f"{self.gpu_memory_gib:.1f} GiB")
        out.extend(f"note: {n}" for n in self.notes)
        return out


def _fraction_for(trials_per_gpu: int) -> str:
    """The smallest ``resources.gpu`` (2 decimals, rounded up) that packs at most that many."""
    return f"{math.ceil(100 / trials_per_gpu) / 100:g}" if trials_per_gpu > 1 else "1"


def sharing(cfg: SweepConfig) -> int:
    """How many trials can share one GPU at once (0 without GPUs)."""
    g = cfg.resources.gpu
    if g <= 0:
        return 0
    per_gpu = 1 if g >= 1 else int(math.floor(1 / g + 1e-9))
    return min(per_gpu, cfg.search.max_concurrent_trials)


def local_gpu_memory_gib() -> float | None:
    """The memory of this process's first CUDA GPU, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def scoring_models_bytes(cfg: SweepConfig) -> tuple[int, str | None]:
    """The scoring models' weight bytes (loaded fp32 on each trial's GPU) and a note for any
    that could not be sized (not on disk)."""
    from trainers.memory import weight_file_bytes
    from trainers.scoring_models import _resolve

    images = cfg.evaluation.images
    if images is None:
        return 0, None
    total, unknown = 0, []
    for what, spec in (("CLIP model", images.clip), ("vision model", images.vision_model),
                       ("preference_model", images.preference_model)):
        if spec is None:
            continue
        try:
            root = _resolve(spec, what)
        except Exception:  # noqa: BLE001 - a Hub id not downloaded yet: say it is not counted
            root = None
        if root is None or not Path(root).is_dir():
            unknown.append(spec)
        else:
            total += weight_file_bytes(Path(root))
    note = f"scoring models not on disk, not counted: {', '.join(unknown)}" if unknown else None
    return total, note


def estimate_for(cfg: SweepConfig, params: dict[str, Any], arch: Any = None, scoring: int | None = None) -> Any:
    """The memory estimate (trainers/memory.py) of one trial of ``cfg`` with hyperparameters
    ``params`` on a GPU: its evaluation batch and scoring models included."""
    from sweeps.config import trial_run_config
    from trainers.memory import Architecture, estimate_trial_memory, trial_shape

    arch = arch or Architecture.from_spec(cfg.base.model)
    scoring = scoring_models_bytes(cfg)[0] if scoring is None else scoring
    eval_batch = 1
    if cfg.evaluation.images is not None:
        gen = cfg.evaluation.images.generation
        eval_batch = min(gen.batch_size, len(gen.prompts) * len(gen.seeds))
    run_cfg = trial_run_config(cfg, params, source=f"plan ({params.get('method', cfg.base.method)})")
    return estimate_trial_memory(arch, trial_shape(run_cfg, "cuda", eval_batch), scoring)


def plan_sweep(cfg: SweepConfig, gpu_memory_gib: float | None = None) -> Plan:
    """The plan of ``cfg`` (see the module docstring). ``gpu_memory_gib`` overrides
    ``resources.gpu_memory_gib`` and this machine's GPU."""
    from search_spaces import load_space
    from sweeps.config import trial_run_config
    from trainers import get_trainer_class
    from trainers.memory import Architecture

    arch = Architecture.from_spec(cfg.base.model)
    scoring, note = scoring_models_bytes(cfg)
    space = cfg.search_space()
    defaults = {s.method: s.defaults() for s in (load_space(x) for x in cfg.search.spaces)}
    methods = []
    for method in space.methods:
        trainer = get_trainer_class(method)
        searched = {k: v for k, v in space.candidates(method).items() if k in trainer.memory_keys}
        params: dict[str, Any] = {"method": method, **defaults[method]}
        best = estimate_for(cfg, params, arch, scoring)
        worst: dict[str, Any] = {}
        for key, values in searched.items():  # greedy: each key at its most memory-hungry value
            for v in values:
                trial = estimate_for(cfg, {**params, key: v}, arch, scoring)
                if trial.total_bytes > best.total_bytes:
                    best, params, worst[key] = trial, {**params, key: v}, v
            worst.setdefault(key, params.get(key))
        savers = trainer.memory_savers(trial_run_config(cfg, params, source=f"plan ({method})").settings)
        methods.append(MethodPlan(method, worst, best, savers))
    source = "given"
    memory = gpu_memory_gib if gpu_memory_gib is not None else cfg.resources.gpu_memory_gib
    if memory is None:
        memory, source = local_gpu_memory_gib(), "this machine's GPU"
    elif gpu_memory_gib is None:
        source = "resources.gpu_memory_gib"
    return Plan(methods, cfg.resources.gpu, sharing(cfg), cfg.search.max_concurrent_trials, memory, source, note)


def check_packing(cfg: SweepConfig, gpu_memory_gib: float | None = None) -> Plan | None:
    """Raise :class:`SweepError` if the sweep's GPU packing cannot fit; the plan otherwise (None
    when trials use no GPU)."""
    if cfg.resources.gpu <= 0:
        return None
    plan = plan_sweep(cfg, gpu_memory_gib)
    problem = plan.problem()
    if problem:
        raise SweepError(problem)
    return plan


def add_command(sub: Any) -> None:
    """The ``sdsweep plan`` subcommand (registered by sweeps/cli.py)."""
    plan = sub.add_parser("plan", help="what a sweep's trials need on a GPU, and whether the packing fits")
    plan.add_argument("sweep", help="sweep YAML")
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                      help="one GPU's memory (default: resources.gpu_memory_gib, else this machine's GPU)")
    plan.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                      help="override a sweep-file key, e.g. --set resources.gpu=0.25 (repeatable)")
    plan.set_defaults(func=_cmd_plan)


def _cmd_plan(args: Any) -> int:
    from sweeps.overrides import parse_set
    from sweeps.config import load_sweep
    from sweeps.searched import largest_value

    cfg = load_sweep(args.sweep, parse_set(args.set))
    plan = plan_sweep(cfg, args.gpu_memory)
    space = cfg.search_space()
    print(f"sweep {cfg.name}: {cfg.search.num_samples} trials of {', '.join(space.methods)}, "
          f"up to {largest_value(cfg, 'train.max_train_steps')} steps each, {cfg.search.max_concurrent_trials} at once")
    lines = plan.lines()
    problem = plan.problem()
    print("\n".join(line for line in lines if not line.startswith("REFUSED")))
    if problem:
        raise SweepError(problem)
    return 0
