"""GPU smoke: a 2-trial sweep on CUDA that asserts where every module runs, and in what dtype.

CI has no GPU (docs/ARCHITECTURE.md "On a GPU"), so the code paths only a GPU exercises are checked here,
whenever a GPU machine is lent:

    python bench/gpu_smoke.py                 # CUDA: 2 trials of the toy world per method
    python bench/gpu_smoke.py --method textual_inversion     # one method only
    python bench/gpu_smoke.py --cpu-dry-run   # no Ray, no GPU: the same checks, expecting cpu/fp32
    python bench/gpu_smoke.py --sweep-on-cpu  # the Ray sweep on the CPU (checks this script's wiring)

Each method runs its toy-world demo (LoRA: sweeps/configs/demo.yaml, textual inversion:
demo-ti.yaml, DreamBooth: demo-dreambooth.yaml with 4 class images), shortened. Inside each trial (by wrapping ``sweeps.trial.make_trainer`` and
``evaluate_images`` in the worker) it asserts: the trainer's device is the GPU; trainable
parameters (LoRA adapters, new embedding rows, DreamBooth's UNet) are fp32 and every frozen
UNet / VAE weight is in the weight dtype (bf16, or fp16 without bf16) on it, the text encoder in
the method's ``text_encoder_dtype`` (the weight dtype for LoRA, fp32 for textual inversion); the
UNet, VAE decoder and text encoder compute in the autocast dtype while sampling and the UNet
while training; every scoring model (CLIP, DINO-style backbone, checker) has fp32 weights on the
trial's GPU, computes there in fp32, and no scoring model sits on another device; the reference
embeddings are computed once and reused by later evaluations (and trials on a reused worker).
Outside the trials: the latent cache was encoded on the GPU the build task reserved and the
baseline was generated with the trials' device, weight dtype and autocast. Then it prints
throughput (steps/s, samples/s, evaluation seconds, peak memory per trial).

Exit status: 0 all checks passed, 1 a check failed (each failure printed), 2 no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Ray workers inherit the environment: make them import this checkout, not an installed copy.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

import torch  # noqa: E402

CHECKS_FILE = "smoke_checks.json"  # per trial, in its storage directory


@dataclass(frozen=True)
class Expect:
    """Where everything should be: the device type, frozen-weight dtype and sampling autocast."""

    device_type: str
    weight_dtype: torch.dtype
    autocast: torch.dtype | None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the diffusion modules' layers output while sampling."""
        return self.autocast or self.weight_dtype


DEMOS = {"lora": "demo.yaml", "textual_inversion": "demo-ti.yaml",  # method -> its toy-world demo
         "dreambooth": "demo-dreambooth.yaml"}


def smoke_sweep(storage: Path, gpu: float, steps: int, device: str | None = None,
                method: str = "lora") -> dict[str, Any]:
    """The sweep: the method's toy-world demo (CLIP, checker) plus DINO, 2 trials, short, no W&B;
    ``device`` pins ``train.device`` (the CPU modes), else trials use their GPU."""
    import yaml

    raw = yaml.safe_load((REPO / "sweeps" / "configs" / DEMOS[method]).read_text())
    raw.update(name="gpu-smoke", storage_path=str(storage), checkpoints_to_keep=1,
               resources={"cpu": 2, "gpu": gpu}, tracking={"wandb": False}, scheduler={"type": "none"})
    raw["base"]["train"].update(max_train_steps=steps, lr_warmup_steps=min(10, steps), mixed_precision="auto",
                                device=device)
    raw["search"].update(num_samples=2, max_concurrent_trials=2)
    if method == "dreambooth":  # a few class images, drawn quickly (on the cache task's GPU)
        raw["base"]["dreambooth"].update(num_class_images=4, class_steps=5)
        raw["search"]["spaces"][0]["params"]["dreambooth.num_class_images"] = {
            "type": "categorical", "choices": [4], "default": 4}
    raw["evaluation"]["every"] = steps // 2
    images = raw["evaluation"]["images"]
    images["generation"].update(seeds=[0, 1], steps=10)
    images["metrics"] = [*images["metrics"], "dino"]
    images["vision_model"] = "builtin:tiny-vit"
    return raw


# ---------------------------------------------------------------------------------------------
# The checks (run inside the trial's worker, or in-process for --cpu-dry-run)
# ---------------------------------------------------------------------------------------------


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"gpu_smoke: {what}")


def _check_weights(name: str, module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                   trainable_dtype: torch.dtype = torch.float32) -> None:
    from trainers.devices import same_device

    for pname, p in module.named_parameters():
        want = trainable_dtype if p.requires_grad else dtype
        _require(same_device(p.device, device) and p.dtype == want,
                 f"{name}.{pname} is {p.dtype} on {p.device}; expected {want} on {device} "
                 f"({'trainable' if p.requires_grad else 'frozen'})")


def _last_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The module's last Linear/Conv2d that is not part of a LoRA adapter (whose output dtype
    shows the precision the module computes in)."""
    layers = [m for n, m in module.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and "lora_" not in n]
    return layers[-1]


class Probe:
    """Records the device and dtype of chosen layers' outputs, per phase ("train" or "sample":
    an evaluation, whose scoring runs after sampling, outside its autocast)."""

    def __init__(self) -> None:
        self.phase = "train"
        self.seen: dict[tuple[str, str], set[tuple[str, torch.dtype]]] = {}

    def watch(self, name: str, layer: torch.nn.Module) -> None:
        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            t = out[0] if isinstance(out, tuple) else out
            self.seen.setdefault((self.phase, name), set()).add((str(t.device), t.dtype))
        layer.register_forward_hook(hook)

    def check(self, phase: str, name: str, device: torch.device, dtype: torch.dtype) -> None:
        from trainers.devices import same_device

        got = self.seen.get((phase, name))
        _require(bool(got), f"{name} never ran during {phase}")
        for dev, dt in got or ():
            _require(same_device(dev, device) and dt == dtype,
                     f"{name} computed in {dt} on {dev} during {phase}; expected {dtype} on {device}")


def _state() -> dict[str, Any]:
    """Per worker process: the probe, the wrapped originals, the reference tensors. Kept on the
    ``sweeps.trial`` module because Ray may unpickle this script's functions (and their copy of
    its globals) once per trial, while a reused worker keeps one ``sweeps.trial``."""
    from sweeps import trial

    return trial.__dict__.setdefault("_smoke_state", {})


def check_setup(trainer: Any, expect: Expect) -> None:
    """Right after the trainer is built: device, LoRA fp32, frozen UNet in the weight dtype."""
    _require(trainer.device.type == expect.device_type, f"trainer device {trainer.device}, expected {expect.device_type}")
    _require(trainer.weight_dtype == expect.weight_dtype, f"weight dtype {trainer.weight_dtype}, expected {expect.weight_dtype}")
    _check_weights("unet", trainer.model.unet, trainer.device, trainer.unet_dtype)
    if trainer.trains_text_encoder:  # else it is not placed until sampling
        _check_weights("text_encoder", trainer.model.text_encoder, trainer.device, trainer.text_encoder_dtype)
    _require(all(p.dtype == torch.float32 for p in trainer.trainable), "a trainable parameter is not fp32")
    probe = _state().setdefault("probe", Probe())
    probe.phase = "train"
    probe.seen.clear()
    if not getattr(trainer.model.unet, "_smoke_hooked", False):  # a reused worker keeps the model
        probe.watch("unet", trainer.model.unet.conv_out)
        probe.watch("vae.decoder", trainer.model.vae.decoder.conv_out)
        probe.watch("text_encoder", _last_layer(trainer.model.text_encoder))
        trainer.model.unet._smoke_hooked = True


def _scorers(evaluator: Any) -> dict[str, torch.nn.Module]:
    from trainers import metrics as mt

    cfg, dev, out = evaluator.cfg, evaluator.device, {}
    scorers = {m.scorer for m in evaluator.metrics}
    if "clip" in scorers:
        out["clip"] = mt.get_clip(cfg.clip, dev)[0]
    if "vision" in scorers:
        out["vision"] = mt.get_vision_model(cfg.vision_model, dev)[0]
    if "checker" in scorers:
        out["checker"] = mt.get_checker(cfg.checker, dev)
    return out


def checked_evaluation(original: Any, evaluator: Any, trainer: Any, expect: Expect, *args: Any) -> dict[str, Any]:
    """Run the trial's evaluation (``original``) and check every module it used."""
    from trainers import devices, scoring_models

    probe: Probe = _state()["probe"]
    dev = trainer.device
    probe.check("train", "unet", dev, expect.compute_dtype)
    _require(devices.same_device(evaluator.device, dev), f"evaluator scores on {evaluator.device}, trainer on {dev}")
    for name, model in _scorers(evaluator).items():  # loads them on the evaluator's device
        if not getattr(model, "_smoke_hooked", False):
            probe.watch(name, _last_layer(model))
            model._smoke_hooked = True
    probe.phase = "sample"
    result = original(evaluator, trainer, *args)
    m = trainer.model
    for name in ("unet", "vae", "text_encoder"):
        want = {"unet": trainer.unet_dtype, "text_encoder": trainer.text_encoder_dtype}.get(name, trainer.weight_dtype)
        _check_weights(name, getattr(m, name), dev, want)
    for name in ("unet", "vae.decoder", "text_encoder"):
        probe.check("sample", name, dev, expect.compute_dtype)
    for name, model in _scorers(evaluator).items():
        _check_weights(name, model, dev, torch.float32)
        probe.check("sample", name, dev, torch.float32)  # scored after sampling, outside autocast
    for cache in (scoring_models._CLIP_CACHE, scoring_models._VISION_CACHE, scoring_models._CHECKER_CACHE):
        stray = [k for k in cache if not devices.same_device(k[1], dev)]
        _require(not stray, f"scoring models cached on another device: {stray}")
    refs = {k: id(v) for k, v in evaluator.references._embeddings.items()}
    _require(len(refs) == 2, f"expected CLIP and DINO reference embeddings, found {sorted(refs)}")
    _require(_state().setdefault("refs", refs) == refs, "reference embeddings were recomputed")
    probe.phase = "train"
    probe.seen.clear()
    return result


def check_outside_trials(state: dict[str, Any], expect: Expect) -> None:
    """sweep.json: the cache build's encode device and the baseline's placement."""
    encode = state["cache_builds"][0].get("encode_device", "")
    _require(encode.startswith(expect.device_type), f"latent cache encoded on {encode!r}, expected {expect.device_type}")
    placed = state["baseline"]["placement"]
    want = {"weight_dtype": str(expect.weight_dtype).removeprefix("torch."),
            "autocast": str(expect.autocast).removeprefix("torch.") if expect.autocast else None}
    _require(placed["device"].startswith(expect.device_type) and all(placed[k] == v for k, v in want.items()),
             f"baseline placement {placed}, expected {expect.device_type} {want}")


def make_smoke_trial(expect: Expect) -> Any:
    """A Tune trainable: ``sweeps.trial.run_trial`` with the checks wrapped around its trainer
    and evaluation. Defined here, so Ray ships it (and the checks) to the workers by value."""

    def smoke_trial(config: dict[str, Any], *, sweep: dict[str, Any], cache: dict[str, list[Any]]) -> None:
        from sweeps import trial

        state = _state()
        if "originals" not in state:  # once per worker process (workers are reused)
            state["originals"] = (trial.make_trainer, trial.evaluate_images)
            make, evaluate = state["originals"]

            def make_trainer(*a: Any, **kw: Any) -> Any:
                trainer = make(*a, **kw)
                check_setup(trainer, expect)
                return trainer

            def evaluate_images(evaluator: Any, trainer: Any, out_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
                result = checked_evaluation(evaluate, evaluator, trainer, expect, out_dir, extra)
                done = trial.storage_trial_dir() / CHECKS_FILE
                log = json.loads(done.read_text()) if done.is_file() else []
                log.append({"step": extra.get("step"), "device": str(trainer.device),
                            "weight_dtype": str(trainer.weight_dtype)})
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(log))
                return result

            trial.make_trainer, trial.evaluate_images = make_trainer, evaluate_images
        trial.run_trial(config, sweep=sweep, cache=cache)

    return smoke_trial


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run_sweep_smoke(expect: Expect, gpu: float, steps: int, device: str | None = None, method: str = "lora") -> int:
    """The 2-trial Ray sweep of ``method`` with the checks; prints throughput; returns the exit status."""
    from sweeps import driver
    from sweeps.config import SweepConfig

    _state().clear()  # a second method's sweep in this process checks its own references
    print(f"--- {method}")
    with tempfile.TemporaryDirectory(prefix="sdsweep-gpu-smoke-") as tmp:
        cfg = SweepConfig.model_validate(smoke_sweep(Path(tmp), gpu, steps, device, method))
        driver.run_trial = make_smoke_trial(expect)  # what driver._trainable hands to Tune
        t0 = time.perf_counter()
        run = driver.run_sweep(cfg, run_dir=Path(tmp) / "run")
        wall = time.perf_counter() - t0
        state = json.loads((run.run_dir / "sweep.json").read_text())
        failures = []
        try:
            check_outside_trials(state, expect)
        except AssertionError as err:
            failures.append(str(err))
        print(f"sweep wall {wall:.1f} s; cache build {state['cache_builds'][0]}; "
              f"baseline eval {state['baseline']['eval_s']:.2f} s at {state['baseline']['placement']}")
        print(f"{'trial':<14}{'status':<11}{'steps/s':>9}{'samples/s':>11}{'eval s':>8}{'peak MB':>9}"
              f"{'est. MB':>9}  checks")
        for result in run.results:
            m, path = result.metrics or {}, Path(result.path)
            estimate = _estimated_mb(cfg, result.config or {})
            errors = json.loads((path / "sdsweep_error.json").read_text()) if (path / "sdsweep_error.json").is_file() else None
            checks = json.loads((path / CHECKS_FILE).read_text()) if (path / CHECKS_FILE).is_file() else []
            print(f"{m.get('trial_id', path.name)[:13]:<14}{m.get('trial_status', '?'):<11}"
                  f"{m.get('steps_per_s', float('nan')):>9.2f}{m.get('samples_per_s', float('nan')):>11.1f}"
                  f"{m.get('eval_s', float('nan')):>8.2f}{m.get('peak_memory_mb', float('nan')):>9.0f}"
                  f"{estimate:>9.0f}  {len(checks)} evaluations checked")
            if errors:
                failures.append(f"trial {path.name}: {errors['error_type']}: {errors['error']}")
            elif not checks:
                failures.append(f"trial {path.name}: no evaluation was checked")
    return _verdict(failures)


def _estimated_mb(cfg: Any, config: dict[str, Any]) -> float:
    """The memory estimate's allocator part (``sdsweep plan``'s estimate, sweeps/plan.py) for a
    trial's hyperparameters: what its measured ``peak_memory_mb`` (max_memory_allocated) compares with."""
    from sweeps.plan import estimate_for

    return estimate_for(cfg, cfg.search_space().flat_params(config)).allocated_bytes / 2**20


def cpu_dry_run(steps: int = 2, method: str = "lora") -> int:
    """The same checks in-process on the CPU (no Ray): cache build, baseline, one short trial."""
    from sweeps import driver, trial
    from sweeps.baseline import score_baselines
    from sweeps.config import SweepConfig, trial_run_config
    from trainers.models import load_model
    from trainers.run import prepare_data

    expect = Expect("cpu", torch.float32, None)
    failures: list[str] = []
    _state().clear()  # in-process: nothing from an earlier run counts
    with tempfile.TemporaryDirectory(prefix="sdsweep-gpu-smoke-") as tmp:
        cfg = SweepConfig.model_validate(smoke_sweep(Path(tmp), 0, 20, device="cpu", method=method))
        model = load_model(cfg.base.model)
        data = prepare_data(cfg.base, model, cache_text=True)
        baselines = score_baselines(cfg, model)
        state = {"cache_builds": [dict(data.report.__dict__)], "baseline": baselines["by_key"][baselines["primary"]]}
        check_outside_trials(state, expect)
        run_cfg = trial_run_config(cfg, {}).model_copy(update={"output_dir": str(Path(tmp) / "work")})
        extra, _ = driver.build_extra(cfg, model)  # DreamBooth's class images, as the cache task builds them
        trainer = trial.make_trainer(run_cfg, load_model(cfg.base.model), data, None,
                                     extra.get(run_cfg.method))
        try:
            check_setup(trainer, expect)
            evaluator = trial.worker_evaluator(cfg, trainer.device)
            # drift compares with the base model's images at each placement, as a sweep's trials do
            evaluator.set_base({k: b["base_embeddings"] for k, b in baselines["by_key"].items()})
            for k in range(2):  # the second evaluation must reuse the reference embeddings
                trainer.train(until_step=steps * (k + 1))
                checked_evaluation(trial.evaluate_images, evaluator, trainer, expect,
                                   Path(tmp) / f"eval-{k}", {"step": trainer.global_step})
        except AssertionError as err:
            failures.append(str(err))
        finally:
            trainer.teardown()
    return _verdict(failures)


def _verdict(failures: list[str]) -> int:
    for f in failures:
        print(f"FAILED: {f}")
    print("gpu_smoke: all checks passed" if not failures else f"gpu_smoke: {len(failures)} check(s) failed")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, pick the expectations, run; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--cpu-dry-run", action="store_true", help="in-process on the CPU, expecting cpu/fp32")
    mode.add_argument("--sweep-on-cpu", action="store_true", help="the Ray sweep on the CPU, expecting cpu/fp32")
    ap.add_argument("--steps", type=int, default=40, help="training steps per trial (evaluated twice)")
    ap.add_argument("--gpu-per-trial", type=float, default=1.0, help="resources.gpu (0.5: both trials on one GPU)")
    ap.add_argument("--method", choices=sorted(DEMOS), action="append",
                    help="the method(s) to smoke (default: every one, one sweep each)")
    args = ap.parse_args(argv)
    methods = args.method or sorted(DEMOS)
    from sweeps.cli import quiet_libraries

    quiet_libraries()
    if args.cpu_dry_run:
        return max(cpu_dry_run(method=m) for m in methods)
    if args.sweep_on_cpu:
        return max(run_sweep_smoke(Expect("cpu", torch.float32, None), 0, args.steps, device="cpu", method=m)
                   for m in methods)
    if not torch.cuda.is_available():
        print(f"gpu_smoke: no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
              "this smoke test needs a GPU. Use --cpu-dry-run to check its logic on the CPU.", file=sys.stderr)
        return 2
    from trainers.devices import run_placement

    where = run_placement(None, "auto")  # what the trials' trainers will resolve on this GPU
    print(f"gpu_smoke on {torch.cuda.get_device_name(0)}: expecting {where}")
    expect = Expect("cuda", where.weight_dtype, where.autocast_dtype)
    return max(run_sweep_smoke(expect, args.gpu_per_trial, args.steps, method=m) for m in methods)


if __name__ == "__main__":
    sys.exit(main())
