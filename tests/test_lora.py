"""LoRA trainer and the shared training loop, on the built-in tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from trainers.base import NonFiniteLossError
from trainers.config import LoraSettings, TrainConfig
from trainers.data import DataConfig, preflight
from trainers.latents import build_latent_cache, encode_prompts
from trainers.lora import LORA_WEIGHTS, LoraTrainer


def make_trainer(model, demo_dir: Path, tmp_path: Path, *, flip: bool = True, cache_text: bool = True,
                 lora: dict | None = None, **train) -> LoraTrainer:
    cfg = DataConfig(path=str(demo_dir), resolution=64, random_flip=flip)
    data = build_latent_cache(preflight(cfg), cfg, model, root=tmp_path / "cache", cache_text=cache_text)
    tcfg = TrainConfig(**{"learning_rate": 1e-3, "max_train_steps": 20, "train_batch_size": 2, **train})
    return LoraTrainer(model, data, tcfg, LoraSettings(**(lora or {})), output_dir=tmp_path / "out")


def fixed_eval_loss(trainer: LoraTrainer, steps=range(10_000, 10_008)) -> float:
    """Loss on fixed micro-steps (fixed noise, timesteps and images) without updating anything."""
    with torch.no_grad():
        trainer.model.unet.eval()
        return sum(float(trainer.compute_loss(m)) for m in steps) / len(steps)


def test_training_lowers_the_loss_on_fixed_noise(tiny_model, demo_dir, tmp_path):
    tr = make_trainer(tiny_model, demo_dir, tmp_path, learning_rate=3e-3, max_train_steps=40)
    before = fixed_eval_loss(tr)
    history = tr.train()
    assert len(history) == 40 and tr.global_step == 40
    assert fixed_eval_loss(tr) < before * 0.95


def test_training_never_calls_the_vae(tiny_model, demo_dir, tmp_path):
    tr = make_trainer(tiny_model, demo_dir, tmp_path)

    def forbidden(*a, **k):
        raise AssertionError("the VAE was called during training")

    tiny_model.vae.encode = forbidden
    tiny_model.vae.decode = forbidden
    tiny_model.vae.forward = forbidden
    tr.train(until_step=3)
    assert tr.global_step == 3


def test_loss_matches_the_direct_formula_and_diffusers_compute_snr(tiny_model, demo_dir, tmp_path):
    """Independent reference: the DDPM forward process and targets written out from the paper's
    formulas, min-SNR weights from SNR = abar/(1-abar) and from diffusers' own compute_snr."""
    from diffusers.training_utils import compute_snr

    g = torch.Generator().manual_seed(123)
    for pred_type in ("epsilon", "v_prediction"):
        tr = make_trainer(tiny_model, demo_dir, tmp_path / pred_type, prediction_type=pred_type, snr_gamma=5.0)
        lat = torch.randn(3, 4, 8, 8, generator=g)
        eps = torch.randn(3, 4, 8, 8, generator=g)
        t = torch.tensor([3, 400, 990])
        hidden = torch.randn(3, 77, tiny_model.unet.config.cross_attention_dim, generator=g)
        ac = tr.noise_scheduler.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        noisy = (ac.sqrt() * lat + (1 - ac).sqrt() * eps).float()
        target = eps if pred_type == "epsilon" else (ac.sqrt() * eps - (1 - ac).sqrt() * lat).float()
        snr = (ac / (1 - ac)).flatten()
        assert torch.allclose(compute_snr(tr.noise_scheduler, t).double(), snr, rtol=1e-5)
        w = torch.clamp(snr, max=5.0) / (snr if pred_type == "epsilon" else snr + 1)
        assert torch.allclose(tr._snr_weights(t).double(), w, rtol=1e-5)
        with torch.no_grad():
            pred = tiny_model.unet(noisy, t, hidden).sample
            expected = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * w.float()).mean()
            got = tr.diffusion_loss(lat, eps, t, hidden)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), pred_type
        tr.teardown()


def test_zero_terminal_snr_gives_finite_min_snr_weights(tiny_model, demo_dir, tmp_path):
    import dataclasses

    from diffusers import DDPMScheduler

    tiny_model = dataclasses.replace(tiny_model, noise_scheduler=DDPMScheduler.from_config(
        tiny_model.noise_scheduler.config, rescale_betas_zero_snr=True))
    assert float(tiny_model.noise_scheduler.alphas_cumprod[-1]) == 0.0  # SNR 0 at the last step
    t = torch.tensor([0, 500, 998, 999])
    for pred_type, last in (("epsilon", 1.0), ("v_prediction", 0.0)):
        tr = make_trainer(tiny_model, demo_dir, tmp_path / pred_type, prediction_type=pred_type, snr_gamma=5.0)
        w = tr._snr_weights(t)
        assert torch.isfinite(w).all(), w
        # The limit of min(SNR, g)/SNR as SNR -> 0 is 1; min(SNR, g)/(SNR + 1) is 0 there.
        assert float(w[-1]) == last
        ac = tiny_model.noise_scheduler.alphas_cumprod[t[:3]].double()
        snr = ac / (1 - ac)
        ref = torch.clamp(snr, max=5.0) / (snr if pred_type == "epsilon" else snr + 1)
        assert torch.allclose(w[:3].double(), ref, rtol=1e-5)
        tr.teardown()


def test_resume_is_bit_exact_and_weights_keep_changing(tiny_model_factory, demo_dir, tmp_path):
    n, k = 6, 3
    kw = dict(max_train_steps=n, lr_scheduler="cosine", lr_warmup_steps=2, gradient_accumulation_steps=2,
              lora={"rank": 4, "alpha": 8, "dropout": 0.1})
    straight = make_trainer(tiny_model_factory(), demo_dir, tmp_path / "a", **kw)
    straight.train()
    first = make_trainer(tiny_model_factory(), demo_dir, tmp_path / "b", **kw)
    first.train(until_step=k)
    ckpt = first.save_checkpoint(tmp_path / "b" / "ckpt")
    at_k = {n_: p.detach().clone() for n_, p in first.named_trainable.items()}
    resumed = make_trainer(tiny_model_factory(), demo_dir, tmp_path / "c", **kw)
    resumed.load_checkpoint(ckpt)
    assert resumed.global_step == k
    resumed.train()
    assert resumed.global_step == n
    for name, p in straight.named_trainable.items():
        assert torch.equal(p, resumed.named_trainable[name]), name
    s_opt, r_opt = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    for i, st in s_opt["state"].items():
        for slot, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(r_opt["state"][i][slot])), (i, slot)
    assert straight.lr_scheduler.get_last_lr() == resumed.lr_scheduler.get_last_lr()
    changed = sum(not torch.equal(at_k[n_], p) for n_, p in resumed.named_trainable.items())
    assert changed == len(at_k), "some LoRA tensors stopped changing after resume"


@pytest.fixture
def tiny_model_factory(tiny_sd_dir):
    from trainers.models import load_base_model

    return lambda: load_base_model("builtin:tiny-sd")


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    h = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), h).sample


def test_saved_lora_loads_in_a_diffusers_pipeline_with_the_trained_scale(tiny_model, tiny_sd_dir, demo_dir, tmp_path):
    tr = make_trainer(tiny_model, demo_dir, tmp_path, learning_rate=5e-3, lora={"rank": 4, "alpha": 16})
    tr.train(until_step=10)
    path = tr.export_weights(tmp_path / "export")
    assert path.name == LORA_WEIGHTS
    tiny_model.unet.eval()
    trained = _unet_out(tiny_model.unet)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of sks toy", num_inference_steps=2, height=64, width=64, output_type="np")
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    base_out = _unet_out(pipe.unet)
    pipe.load_lora_weights(str(path.parent))
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert not torch.allclose(torch.from_numpy(before), torch.from_numpy(after))
    # The pipeline's UNet with our file equals the trained UNet: rank, alpha and keys all right.
    loaded = _unet_out(pipe.unet)
    assert not torch.allclose(loaded, base_out)
    assert torch.allclose(loaded, trained, atol=1e-5)


def test_lora_file_metadata_names_base_model_hyperparameters_and_step(tiny_model, demo_dir, tmp_path):
    tr = make_trainer(tiny_model, demo_dir, tmp_path, lora={"rank": 4, "alpha": 2})
    tr.train(until_step=2)
    path = tr.export_weights(tmp_path / "export")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    info = json.loads(meta["sdsweep"])
    assert info["base_model"] == "builtin:tiny-sd" and info["base_model_identity"] == tiny_model.identity
    assert info["step"] == 2 and info["lora"]["rank"] == 4 and info["train"]["learning_rate"] == 1e-3
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == 4 and adapter["unet.lora_alpha"] == 2
    assert keys and all(k.startswith("unet.") for k in keys)


def test_text_encoder_lora_trains_with_its_own_lr_and_exports(tiny_model, tiny_sd_dir, demo_dir, tmp_path):
    tr = make_trainer(tiny_model, demo_dir, tmp_path, cache_text=False,
                      lora={"train_text_encoder": True, "text_encoder_lr": 2e-4})
    assert [g["lr"] for g in tr.optimizer.param_groups] == [1e-3, 2e-4]
    te_before = {n: p.detach().clone() for n, p in tr.named_trainable.items() if n.startswith("text_encoder.")}
    assert te_before
    tr.train(until_step=3)
    assert any(not torch.equal(te_before[n], tr.named_trainable[n]) for n in te_before)
    path = tr.export_weights(tmp_path / "export")
    keys = load_file(str(path)).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    ids = pipe.tokenizer(["a photo of sks toy"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        base = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(str(path.parent))
        lora = pipe.text_encoder(ids)[0]
        tiny_model.text_encoder.eval()
        ours = tiny_model.text_encoder(ids)[0]
    assert not torch.allclose(base, lora) and torch.allclose(lora, ours, atol=1e-5)


def test_nan_loss_stops_with_an_error_naming_the_step_and_cause(tiny_model, demo_dir, tmp_path):
    tr = make_trainer(tiny_model, demo_dir, tmp_path, checkpointing_steps=1)
    tr.train(until_step=2)
    tr.data.std[:] = float("inf")  # what an exploding model looks like to the loss
    with pytest.raises(NonFiniteLossError) as err:
        tr.train()
    msg = str(err.value)
    assert "step 3" in msg and "learning rate" in msg and "Last good step: 2" in msg
    assert tr.global_step == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_warmup_and_schedule_set_the_learning_rate(tiny_model, demo_dir, tmp_path):
    tr = make_trainer(tiny_model, demo_dir, tmp_path, lr_scheduler="linear", lr_warmup_steps=4, max_train_steps=8)
    lrs = [s.lr for s in tr.train()]
    assert lrs[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[5:] == pytest.approx([7.5e-4, 5e-4, 2.5e-4])


def test_gradient_accumulation_averages_micro_batches(tiny_model_factory, demo_dir, tmp_path):
    acc = make_trainer(tiny_model_factory(), demo_dir, tmp_path / "a", gradient_accumulation_steps=3,
                       max_grad_norm=None)
    ref = make_trainer(tiny_model_factory(), demo_dir, tmp_path / "b", max_grad_norm=None)
    with torch.no_grad():
        for name, p in ref.named_trainable.items():
            p.copy_(acc.named_trainable[name])
    for m in range(3):
        (ref.compute_loss(m) / 3).backward()
    stats = acc.train_step()
    assert acc.global_step == 1 and acc.lr_scheduler.last_epoch == 1
    lr, b1, b2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 1e-2
    for name, p in ref.named_trainable.items():
        # One AdamW step from zero state is p - lr*(g/(|g|+eps)) (bias-corrected) - lr*wd*p.
        g = p.grad
        expected = p.detach() * (1 - lr * wd) - lr * g / (g.abs() + eps)
        assert torch.allclose(acc.named_trainable[name].detach(), expected, atol=1e-6), name
    assert stats.loss > 0


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model_factory, demo_dir, tmp_path):
    runs = []
    for gc in (False, True):
        tr = make_trainer(tiny_model_factory(), demo_dir, tmp_path / str(gc), gradient_checkpointing=gc)
        tr.model.unet.train()
        loss = tr.compute_loss(0)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in tr.named_trainable.items()}))
        assert tr.model.unet.is_gradient_checkpointing == gc
    assert torch.allclose(runs[0][0], runs[1][0], atol=1e-6)
    for n, g in runs[0][1].items():
        assert torch.allclose(g, runs[1][1][n], atol=1e-6), n


def test_teardown_restores_the_base_unet(tiny_model, demo_dir, tmp_path):
    tiny_model.unet.eval()
    base = _unet_out(tiny_model.unet)
    tr = make_trainer(tiny_model, demo_dir, tmp_path, learning_rate=5e-3)
    tr.train(until_step=5)
    tiny_model.unet.eval()
    assert not torch.allclose(_unet_out(tiny_model.unet), base)
    tr.teardown()
    assert torch.allclose(_unet_out(tiny_model.unet), base, atol=1e-6)
    assert not any(p.requires_grad for p in tiny_model.unet.parameters())


def test_same_seed_same_weights_other_seed_other_weights(tiny_model_factory, demo_dir, tmp_path):
    def final(seed: int, sub: str) -> dict:
        tr = make_trainer(tiny_model_factory(), demo_dir, tmp_path / sub, seed=seed)
        tr.train(until_step=3)
        return {n: p.detach().clone() for n, p in tr.named_trainable.items()}

    a, b, c = final(0, "a"), final(0, "b"), final(1, "c")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_checkpoints_are_pruned_to_the_total_limit(tiny_model, demo_dir, tmp_path):
    tr = make_trainer(tiny_model, demo_dir, tmp_path, max_train_steps=7, checkpointing_steps=2,
                      checkpoints_total_limit=2)
    tr.train()
    names = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert names == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((tmp_path / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["base_model"] == tiny_model.identity


def test_cached_text_embeddings_equal_a_live_text_encoder_forward(tiny_model, demo_dir, tmp_path):
    tr = make_trainer(tiny_model, demo_dir, tmp_path)
    idx, _ = tr.batch_indices(4)
    live = encode_prompts(tiny_model.text_encoder, tiny_model.tokenizer, [tr.data.captions[int(i)] for i in idx])
    assert torch.allclose(tr.encoder_hidden_states(idx), live, atol=1e-5)


def test_unknown_target_module_is_a_clear_error(tiny_model, demo_dir, tmp_path):
    with pytest.raises(ValueError, match="target_modules"):
        make_trainer(tiny_model, demo_dir, tmp_path, lora={"target_modules": ["no_such_proj"]})


def test_gradient_clipping_limits_the_update(tiny_model_factory, demo_dir, tmp_path):
    # AdamW's update is g/(|g|+eps): scale-free, except when the clipped norm approaches eps.
    # Clipping to 1e-12 therefore shrinks the first update by orders of magnitude.
    def first_update(max_norm, sub):
        tr = make_trainer(tiny_model_factory(), demo_dir, tmp_path / sub, max_grad_norm=max_norm,
                          adam_weight_decay=0.0)  # decay alone would move the weights
        before = {n: p.detach().clone() for n, p in tr.named_trainable.items()}
        stats = tr.train_step()
        delta = sum((p.detach() - before[n]).abs().sum() for n, p in tr.named_trainable.items())
        return float(delta), stats.grad_norm

    free, norm = first_update(None, "free")
    clipped, pre_clip_norm = first_update(1e-12, "clipped")
    assert norm is None and pre_clip_norm > 1e-6
    assert clipped < free * 1e-3


def test_mixed_precision_resolves_per_device():
    from trainers.devices import resolve_mixed_precision

    assert resolve_mixed_precision("auto", torch.device("cpu")) == "no"
    assert resolve_mixed_precision("no", torch.device("cpu")) == "no"
    assert resolve_mixed_precision("bf16", torch.device("cpu")) == "bf16"  # CPU autocast has bf16
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_mixed_precision("fp16", torch.device("cpu"))
    assert resolve_mixed_precision("fp16", torch.device("cuda")) == "fp16"


def test_validation_loss_is_deterministic_seed_independent_and_drops_with_training(tiny_model_factory, demo_dir,
                                                                                  tmp_path):
    a = make_trainer(tiny_model_factory(), demo_dir, tmp_path / "a", seed=0, learning_rate=3e-3, max_train_steps=40)
    b = make_trainer(tiny_model_factory(), demo_dir, tmp_path / "b", seed=7, snr_gamma=5.0, train_batch_size=3)
    v0 = a.validation_loss()
    assert v0 == a.validation_loss(), "validation loss is not deterministic"
    assert v0 == pytest.approx(b.validation_loss(), rel=1e-5), \
        "validation inputs depend on the trial's seed, batch size or loss weighting"
    a.train()
    assert a.validation_loss() < v0


def test_conv_lora_exports_and_loads_in_diffusers_both_layouts(tiny_model, tiny_sd_dir, demo_dir, tmp_path):
    """LoRA on the ResNet convolutions too: diffusers keeps peft's key names for them; our file and
    its kohya conversion must both load into a pipeline that computes what the trainer trained."""
    from safetensors.torch import save_file

    from trainers.lora import kohya_state_dict

    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    tr = make_trainer(tiny_model, demo_dir, tmp_path, learning_rate=5e-3,
                      lora={"rank": 4, "alpha": 8, "target_modules": targets})
    tr.train(until_step=6)
    sd = tr.lora_state_dict()
    assert any(".resnets.0.conv1." in k for k in sd) and any(".attn2.to_k." in k for k in sd)
    path = tr.export_weights(tmp_path / "export")
    kohya = kohya_state_dict(sd, {"unet": 8})
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.lora_down") for k in kohya)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    tiny_model.unet.eval()
    trained = _unet_out(tiny_model.unet)
    for folder, name in ((path.parent, LORA_WEIGHTS), (tmp_path, "kohya.safetensors")):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
        base_out = _unet_out(pipe.unet)
        pipe.load_lora_weights(str(folder), weight_name=name)
        assert not torch.allclose(_unet_out(pipe.unet), base_out)
        assert torch.allclose(_unet_out(pipe.unet), trained, atol=1e-5), name


def test_kohya_export_loads_in_diffusers_with_the_real_alpha(tiny_model, tiny_sd_dir, demo_dir, tmp_path):
    from safetensors.torch import save_file

    from trainers.lora import kohya_state_dict

    tr = make_trainer(tiny_model, demo_dir, tmp_path, cache_text=False, learning_rate=5e-3,
                      lora={"rank": 4, "alpha": 16, "train_text_encoder": True})
    tr.train(until_step=6)
    kohya = kohya_state_dict(tr.lora_state_dict(), {"unet": 16, "text_encoder": 16})
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in kohya)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn") for k in kohya)
    assert all(float(v) == 16.0 for k, v in kohya.items() if k.endswith(".alpha"))
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    tiny_model.unet.eval()
    tiny_model.text_encoder.eval()
    trained = _unet_out(tiny_model.unet)
    ids = tiny_model.tokenizer(["a photo of sks toy"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    with torch.no_grad():
        trained_text = tiny_model.text_encoder(ids)[0]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors")
    assert torch.allclose(_unet_out(pipe.unet), trained, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(pipe.text_encoder(ids)[0], trained_text, atol=1e-5)
