"""DreamBooth (first slice) on the toy world: the whole UNet trains in fp32, the text encoder
optionally, the optimizer choice fails loudly, and both export layouts load back in diffusers.
The shared contract (loss, loader, resume, teardown hash) is in test_trainer_contract.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

from conftest import model_digest
from trainers.config import DreamBoothSettings, TrainConfig
from trainers.data import DataConfig, preflight
from trainers.dreambooth import INFO_FILE, DreamBoothTrainer
from trainers.latents import build_latent_cache
from trainers.models import load_base_model
from trainers.toyworld import weights_dir


@pytest.fixture
def toy():
    return load_base_model("builtin:toyworld")


def _trainer(model, tmp_path: Path, train: dict | None = None, **db) -> DreamBoothTrainer:
    settings = DreamBoothSettings(**db)
    cfg = DataConfig(path="builtin:toystar", resolution=32)
    data = build_latent_cache(preflight(cfg), cfg, model, root=tmp_path / "cache",
                              cache_text=DreamBoothTrainer.caches_text(settings))
    tcfg = TrainConfig(**{"learning_rate": 1e-4, "max_train_steps": 4, "train_batch_size": 2, **(train or {})})
    return DreamBoothTrainer(model, data, tcfg, settings, tmp_path / "out")


def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 4, 4, generator=g)
    h = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), h).sample


def test_the_whole_unet_trains_in_fp32_even_under_bf16_and_the_base_is_not_rounded(toy, tmp_path):
    fresh = {k: v.clone() for k, v in toy.unet.state_dict().items()}
    tr = _trainer(toy, tmp_path, train={"mixed_precision": "bf16"})
    assert {p.dtype for p in toy.unet.parameters()} == {torch.float32}
    assert all(torch.equal(v, fresh[k]) for k, v in toy.unet.state_dict().items()), "setup rounded the UNet"
    tr.train()
    changed = sum(not torch.equal(v, fresh[k]) for k, v in toy.unet.state_dict().items())
    assert changed >= 0.9 * len(fresh), f"only {changed} of {len(fresh)} UNet tensors trained"
    tr.teardown()
    assert all(torch.equal(v, fresh[k]) for k, v in toy.unet.state_dict().items())


def test_the_text_encoder_trains_with_its_own_rate_and_is_restored(toy, tmp_path):
    before = model_digest(toy)
    assert not DreamBoothTrainer.caches_text(DreamBoothSettings(train_text_encoder=True))
    tr = _trainer(toy, tmp_path, train_text_encoder=True, text_encoder_lr=3e-5)
    assert [g["lr"] for g in tr.optimizer.param_groups] == [1e-4, 3e-5]
    te0 = {k: v.clone() for k, v in toy.text_encoder.state_dict().items()}
    tr.train()
    assert any(not torch.equal(v, te0[k]) for k, v in toy.text_encoder.state_dict().items())
    tr.teardown()
    assert model_digest(toy) == before


def test_8bit_adam_on_the_cpu_is_an_error_naming_the_setting_and_changes_nothing(toy, tmp_path):
    before = model_digest(toy)
    with pytest.raises(ValueError, match="dreambooth.optimizer adamw_8bit needs a CUDA GPU"):
        _trainer(toy, tmp_path, optimizer="adamw_8bit")
    assert model_digest(toy) == before


def test_both_exports_load_back_in_diffusers_and_equal_the_trained_unet(toy, tmp_path):
    tr = _trainer(toy, tmp_path, train={"max_train_steps": 3})
    tr.train()
    trained = _unet_out(toy.unet.eval())
    ckpt = tr.save_checkpoint(tmp_path / "ckpt")
    tr.teardown()
    dest = tmp_path / "best"
    dest.mkdir()
    files = DreamBoothTrainer.export_files(ckpt, dest, "run-1", {"trial_id": "t1"})
    assert files == ["unet", INFO_FILE, "run-1-dreambooth.safetensors"]
    # diffusers layout: the fine-tuned UNet beside the base model's other components.
    pipe = StableDiffusionPipeline.from_pretrained(weights_dir(), safety_checker=None,
                                                   unet=UNet2DConditionModel.from_pretrained(str(dest / "unet")))
    assert torch.allclose(_unet_out(pipe.unet), trained, atol=1e-6)
    assert not torch.allclose(_unet_out(toy.unet), trained, atol=1e-3), "the base UNet was left trained"
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red sks shape on a blue background", num_inference_steps=2, height=32, width=32).images
    # Single file (A1111 / ComfyUI / kohya): loaded back with diffusers' single-file converters, offline.
    single = load_base_model(str(dest / files[2]), single_file_config=str(weights_dir()))
    assert torch.allclose(_unet_out(single.unet), trained, atol=1e-6)
    assert torch.equal(single.vae.state_dict()["decoder.conv_out.weight"], toy.vae.state_dict()["decoder.conv_out.weight"])
    with safe_open(str(dest / files[2]), "pt") as f:
        meta = f.metadata()
    info = json.loads(meta["sdsweep"])
    assert (info["method"], info["step"], info["base_model_identity"]) == ("dreambooth", 3, toy.identity)
    assert json.loads(meta["sdsweep_best"]) == {"trial_id": "t1"}


# ----- prior preservation ------------------------------------------------------------------------

CLASS_PROMPTS = ("a red circle on a blue background", "a green square on a white background")


def _db(**kw) -> DreamBoothSettings:
    return DreamBoothSettings(**{"prior_loss_weight": 1.0, "class_prompt": CLASS_PROMPTS, "num_class_images": 4,
                                 "class_steps": 2, **kw})


@pytest.fixture
def drawn(monkeypatch):
    """Counts the class images the base model actually draws (wraps the generator)."""
    from trainers import evaluate

    counter = {"images": 0}
    real = evaluate.generate

    def counted(model, settings, *a, **k):
        out = real(model, settings, *a, **k)
        counter["images"] += len(out)
        return out

    monkeypatch.setattr(evaluate, "generate", counted)
    return counter


def test_class_images_are_drawn_once_per_key_in_order_and_a_new_count_draws_anew(toy, tmp_path, drawn):
    from trainers.class_images import ensure_class_images

    first = ensure_class_images(toy, _db(), 4, 32, root=tmp_path)
    assert (first.generated, drawn["images"]) == (4, 4)
    names = sorted(p.name for p in first.folder.glob("class_*.png"))
    assert names == [f"class_{i:05d}.png" for i in range(4)]
    captions = [(first.folder / n.replace(".png", ".txt")).read_text().strip() for n in names]
    assert captions == [CLASS_PROMPTS[i % 2] for i in range(4)]  # image i: prompt i mod 2
    again = ensure_class_images(toy, _db(), 4, 32, root=tmp_path)
    assert (again.folder, again.generated, drawn["images"]) == (first.folder, 0, 4)
    more = ensure_class_images(toy, _db(), 5, 32, root=tmp_path)
    assert more.folder != first.folder and more.generated == 5
    other = ensure_class_images(toy, _db(class_seed=1), 4, 32, root=tmp_path)
    assert other.folder != first.folder


def _prior_trainer(model, tmp_path: Path, db: DreamBoothSettings, train: dict | None = None) -> DreamBoothTrainer:
    from trainers.config import RunConfig

    run = RunConfig.model_validate({"model": "builtin:toyworld", "data": {"path": "builtin:toystar", "resolution": 32},
                                    "method": "dreambooth", "dreambooth": db.model_dump(),
                                    "cache_dir": str(tmp_path / "cache")})
    extra, report = DreamBoothTrainer.prepare_extra(run, model, "cpu")
    assert report["class_images"] == db.num_class_images
    cfg = DataConfig(path="builtin:toystar", resolution=32)
    data = build_latent_cache(preflight(cfg), cfg, model, root=tmp_path / "cache" / "latents", cache_text=True)
    tcfg = TrainConfig(**{"learning_rate": 1e-4, "max_train_steps": 4, "train_batch_size": 2, **(train or {})})
    return DreamBoothTrainer(model, data, tcfg, db, tmp_path / "out", extra=extra)


def test_the_prior_loss_is_the_instance_term_plus_the_weighted_class_term_min_snr_on_instances_only(toy, tmp_path):
    """The DreamBooth paper's objective, checked against separate forward passes of the two halves:
    L = w_snr-weighted instance MSE + prior_loss_weight x plain class MSE."""
    tr = _prior_trainer(toy, tmp_path, _db(prior_loss_weight=0.7), train={"snr_gamma": 5.0})
    toy.unet.eval()
    distinguishing = 0
    with torch.no_grad():
        for micro in range(8):
            combined = float(tr.compute_loss(micro))
            gen = tr._generator(micro)
            idx, lat, noise, t = tr.draw(tr.data, *tr.batch_indices(micro), gen)
            cidx = tr._class_indices(micro)
            _, clat, cnoise, ct = tr.draw(tr.class_data, cidx, torch.zeros(len(cidx), dtype=torch.bool), gen)
            instance = tr.diffusion_loss(lat, noise, t, tr.encoder_hidden_states(idx))  # min-SNR weighted
            prior = tr.per_sample_loss(clat, cnoise, ct, tr.encoder_hidden_states(cidx, tr.class_data)).mean()
            assert combined == pytest.approx(float(instance) + 0.7 * float(prior), rel=1e-5)
            weights = tr._snr_weights(ct)
            if bool((weights < 0.9).any()):  # a class timestep where min-SNR would change the term
                distinguishing += 1
                weighted_prior = (tr.per_sample_loss(clat, cnoise, ct, tr.encoder_hidden_states(cidx, tr.class_data))
                                  * weights).mean()
                assert combined != pytest.approx(float(instance) + 0.7 * float(weighted_prior), rel=1e-4)
    assert distinguishing, "no micro-batch drew a class timestep where min-SNR weighting differs from 1"
    tr.teardown()


def test_a_trial_uses_the_first_num_class_images_of_a_larger_build(toy, tmp_path):
    from trainers.class_images import ensure_class_images

    tr = _prior_trainer(toy, tmp_path, _db(num_class_images=4))
    big = tr.extra["class"]
    tr.teardown()
    small = DreamBoothTrainer(toy, tr.data, tr.cfg, _db(num_class_images=2), tmp_path / "o2", extra=tr.extra)
    assert small.class_data.ids == big.ids[:2]
    assert {int(i) for m in range(20) for i in small._class_indices(m)} == {0, 1}
    small.train()
    small.teardown()
    assert ensure_class_images(toy, _db(), 4, 32, root=tmp_path / "cache" / "class_images").generated == 0


def test_a_class_folder_of_your_own_goes_through_preflight_and_must_hold_enough_images(toy, tmp_path):
    from trainers.config import RunConfig
    from trainers.data import DatasetError

    folder = tmp_path / "classes"
    folder.mkdir()
    for i, path in enumerate(sorted(Path(preflight(DataConfig(path="builtin:toytriangle", resolution=32))[0].path
                                          .parent).glob("*.png"))[:3]):
        (folder / f"c{i}.png").write_bytes(path.read_bytes())
        (folder / f"c{i}.txt").write_text("a red triangle on a green background")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("x")

    def run(n: int) -> RunConfig:
        return RunConfig.model_validate({
            "model": "builtin:toyworld", "data": {"path": "builtin:toystar", "resolution": 32}, "method": "dreambooth",
            "dreambooth": {"prior_loss_weight": 1.0, "class_data_path": str(folder), "num_class_images": n}})

    with pytest.raises(DatasetError, match="broken.png"):
        DreamBoothTrainer.prepare_extra(run(3), toy, "cpu")
    (folder / "broken.png").unlink()
    (folder / "broken.txt").unlink()
    with pytest.raises(DatasetError, match="3 class images, but dreambooth.num_class_images is 5"):
        DreamBoothTrainer.prepare_extra(run(5), toy, "cpu")
    extra, report = DreamBoothTrainer.prepare_extra(run(3), toy, "cpu")
    assert report["class_images_drawn"] == 0 and len(extra["class"]) == 3


def test_prior_preservation_needs_exactly_one_source_of_class_images():
    with pytest.raises(ValueError, match="needs exactly one of class_prompt"):
        DreamBoothSettings(prior_loss_weight=1.0)
    with pytest.raises(ValueError, match="needs exactly one of class_prompt"):
        DreamBoothSettings(prior_loss_weight=1.0, class_prompt="a dog", class_data_path="/x")
    assert DreamBoothSettings(class_prompt="a dog").class_prompt == ("a dog",)


def test_a_sweep_draws_the_class_images_once_for_the_largest_searched_count(toy, tmp_path, drawn):
    from sweeps.config import SweepConfig
    from sweeps.driver import build_extra

    cfg = SweepConfig.model_validate({
        "name": "db", "base": {
            "model": "builtin:toyworld", "data": {"path": "builtin:toystar", "resolution": 32},
            "method": "dreambooth", "cache_dir": str(tmp_path / "cache"),
            "dreambooth": {"class_prompt": list(CLASS_PROMPTS), "class_steps": 2}},
        "search": {"spaces": [{"method": "dreambooth", "params": {
            "dreambooth.num_class_images": {"type": "categorical", "choices": [2, 3]},
            "dreambooth.prior_loss_weight": {"type": "float", "low": 0.0, "high": 1.0}}}]}})
    extra, report = build_extra(cfg, toy)
    assert report["dreambooth"]["class_images"] == 3 and report["dreambooth"]["class_images_drawn"] == 3
    assert drawn["images"] == 3 and len(extra["dreambooth"]["class"]) == 3
    again, report = build_extra(cfg, toy)  # a second sweep (or a resume) with the same key
    assert report["dreambooth"]["class_images_drawn"] == 0 and drawn["images"] == 3
    assert again["dreambooth"]["class"].key == extra["dreambooth"]["class"].key


def test_with_ema_evaluation_and_export_use_the_ema_weights_and_resume_is_bit_exact(tmp_path):
    from diffusers.training_utils import EMAModel

    def make(sub: str) -> DreamBoothTrainer:
        return _trainer(load_base_model("builtin:toyworld"), tmp_path / sub,
                        train={"max_train_steps": 6, "learning_rate": 3e-4}, use_ema=True, ema_decay=0.9)

    straight = make("a")
    # Independent reference: diffusers' EMAModel stepped by hand after each step of a twin trainer.
    twin = make("twin")
    ref = EMAModel(twin.model.unet.parameters(), decay=0.9, use_ema_warmup=True)
    for _ in range(6):
        twin.train_step()
        ref.step(twin.model.unet.parameters())
    straight.train()
    assert all(torch.equal(a, b) for a, b in zip(straight.ema.shadow_params, ref.shadow_params))
    live = {k: v.clone() for k, v in straight.model.unet.state_dict().items()}
    with straight.evaluation_model() as sampled:
        sampled_w = [p.detach().clone() for p in sampled.unet.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(sampled_w, ref.shadow_params))
    assert all(torch.equal(v, live[k]) for k, v in straight.model.unet.state_dict().items()), "EMA left in the UNet"
    export = tmp_path / "export"
    export.mkdir()
    straight.export_weights(export)
    shipped = UNet2DConditionModel.from_pretrained(str(export / "unet"))
    assert all(torch.equal(a, b) for a, b in zip(shipped.parameters(), ref.shadow_params))

    first = make("b")
    first.train(until_step=3)
    ckpt = first.save_checkpoint(tmp_path / "b" / "ckpt")
    resumed = make("c")
    resumed.load_checkpoint(ckpt)
    resumed.train()
    assert resumed.ema.optimization_step == straight.ema.optimization_step == 6
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema.shadow_params, straight.ema.shadow_params))
    for tr in (straight, twin, first, resumed):
        tr.teardown()


def test_the_single_file_export_reloads_the_base_model_the_way_the_trial_loaded_it(toy, tmp_path):
    # A base model given as a single file needs its single_file_config to load (offline); the
    # export's reload of the base model must carry it, as every reload of the sweep's model does.
    from trainers.config import ModelSpec
    from trainers.models import load_model
    from trainers.single_file import save_single_file

    save_single_file(toy, tmp_path / "base.safetensors", {})
    spec = ModelSpec(source=str(tmp_path / "base.safetensors"), single_file_config=str(weights_dir()))
    base = load_model(spec)
    assert base.load_spec == spec.model_dump()
    tr = _trainer(base, tmp_path, train={"max_train_steps": 1})
    tr.train()
    ckpt = tr.save_checkpoint(tmp_path / "ckpt")
    tr.teardown()
    (tmp_path / "best").mkdir()
    files = DreamBoothTrainer.export_files(ckpt, tmp_path / "best", "run-1", {"trial_id": "t1"})
    assert (tmp_path / "best" / files[-1]).is_file()


@pytest.mark.parametrize("variant", [{}, {"train_text_encoder": True}, {"use_ema": True, "ema_decay": 0.9}],
                         ids=["unet", "text_encoder", "ema"])
def test_a_checkpoint_holds_each_tensor_once_and_the_last_one_no_optimizer_state(variant, tmp_path):
    """The bytes docs/METHODS.md states (bench/checkpoint_bytes.py's design applied to these modules'
    shapes), and what is left out is still restored exactly: a checkpoint loads back into a fresh
    trainer with every trained weight, AdamW slot and EMA weight equal to the saver's."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from checkpoint_bytes import checkpoint_bytes
    from conftest import safetensors_data_bytes
    from trainers.checkpoints import STATE_TENSORS

    def make(sub: str, steps: int = 2) -> DreamBoothTrainer:
        return _trainer(load_base_model("builtin:toyworld"), tmp_path / sub, train={"max_train_steps": steps},
                        **variant)

    def state(tr: DreamBoothTrainer) -> dict[str, torch.Tensor]:
        out = {f"param.{n}": p.detach().clone() for n, p in tr.named_trainable.items()}
        for i, st in tr.optimizer.state_dict()["state"].items():
            out.update({f"optim.{i}.{k}": torch.as_tensor(v).clone() for k, v in st.items()})
        out.update({f"ema.{i}": t.clone() for i, t in enumerate(tr.ema.shadow_params if tr.ema else [])})
        return out

    def check_bytes(ckpt: Path, is_last: bool) -> None:
        export = sum(safetensors_data_bytes(f) for f in ckpt.glob("*/*.safetensors"))
        written = {"export": export, "resume": safetensors_data_bytes(ckpt / STATE_TENSORS)}
        assert written == checkpoint_bytes(unet, te, ema=bool(variant.get("use_ema")), design="after", last=is_last)

    tr = make("a")
    unet = list(tr.model.unet.parameters())
    te = list(tr.model.text_encoder.parameters()) if variant.get("train_text_encoder") else None
    tr.train(until_step=1)
    mid, at_mid = tr.save_checkpoint(tmp_path / "mid"), state(tr)
    check_bytes(mid, is_last=False)
    tr.train()
    last = tr.save_checkpoint(tmp_path / "last", optimizer_state=False)
    check_bytes(last, is_last=True)
    resumed = make("b")
    resumed.load_checkpoint(mid)
    got = state(resumed)
    assert got.keys() == at_mid.keys() and all(torch.equal(got[k], at_mid[k]) for k in got)
    finished = make("c")
    finished.load_checkpoint(last)
    want = {k: v for k, v in state(tr).items() if not k.startswith("optim.")}
    got = state(finished)
    assert finished.global_step == 2 and all(torch.equal(got[k], want[k]) for k in want)
    assert finished.train() == []  # nothing left to train: the optimizer state is never needed
    longer = make("d", steps=4)
    with pytest.raises(ValueError, match=r"last checkpoint of a finished run.*without optimizer state.*max_train_steps 4"):
        longer.load_checkpoint(last)
    for t in (tr, resumed, finished, longer):
        t.teardown()
