"""Pickle refusal, weights_only loading, malicious pickles, and spec dispatch errors."""

from __future__ import annotations

import pathlib
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from trainers.models import BaseModel, ModelLoadError, PickleRefusedError, ensure_builtin, load_base_model
from trainers.single_file import to_original_state_dict


class _TouchOnUnpickle:
    """Unpickling this calls ``Path(marker).touch()``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def tiny() -> BaseModel:
    return load_base_model("builtin:tiny-sd")


@pytest.fixture(params=["plain_pickle", "torch_save", "zip_without_version", "zip_flat"])
def evil_ckpt(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"model.diffusion_model.out.2.bias": _TouchOnUnpickle(marker)}}
    if request.param == "plain_pickle":
        path.write_bytes(pickle.dumps(payload))
    elif request.param == "torch_save":
        torch.save(payload, path)
    else:  # hand-made zips torch.load's C++ reader rejects with internals ("hasRecord")
        with zipfile.ZipFile(path, "w") as z:
            name = "archive/data.pkl" if request.param == "zip_without_version" else "data.pkl"
            z.writestr(name, pickle.dumps(payload, protocol=2))
    return path, marker


def _assert_payload_is_live(path: Path, marker: Path) -> None:
    """Prove the file really would run code if unpickled unsafely (so the tests mean something)."""
    assert not marker.exists()
    if zipfile.is_zipfile(path) and any(n.endswith("/version") for n in zipfile.ZipFile(path).namelist()):
        torch.load(path, weights_only=False)  # the unsafe call sdsweep never makes
    elif zipfile.is_zipfile(path):
        pickle.loads(zipfile.ZipFile(path).read(next(n for n in zipfile.ZipFile(path).namelist()
                                                     if n.endswith("data.pkl"))))
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def _assert_safe_advice(message: str) -> None:
    """A refusal names the blocked global, says the file is unsafe, and never passes on torch's
    advice to re-run with the unsafe setting nor its C++ internals."""
    assert "unsafe" in message and "pathlib.Path" in message, message
    for torch_words in ("weights_only=False", "weights_only` set to `False", "Re-running", "add_safe_globals",
                        "hasRecord", "inline_container", "enhancement request"):
        assert torch_words not in message, f"torch's {torch_words!r} reached the user: {message}"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the protocol-4 payload
@pytest.mark.parametrize("allow_pickle", [False, True])
def test_malicious_pickle_never_runs(
    evil_ckpt: tuple[Path, Path], allow_pickle: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, marker = evil_ckpt
    # Even with torch's escape hatch set: sdsweep passes weights_only=True explicitly.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(PickleRefusedError, match="evil.ckpt") as err:
        load_base_model(str(path), allow_pickle=allow_pickle, single_file_config="builtin:tiny-sd")
    assert not marker.exists()
    assert ("allow_pickle" in str(err.value)) if not allow_pickle else ("weights_only" in str(err.value))
    if allow_pickle:
        _assert_safe_advice(str(err.value))
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    _assert_payload_is_live(path, marker)


def test_malicious_pickle_inside_a_diffusers_directory_never_runs(tmp_path: Path) -> None:
    root = tmp_path / "model"
    shutil.copytree(ensure_builtin("tiny-sd"), root)
    marker = tmp_path / "pwned"
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": _TouchOnUnpickle(marker)}, root / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(PickleRefusedError):
        load_base_model(str(root))
    with pytest.raises(PickleRefusedError, match=r"diffusion_pytorch_model\.bin") as err:
        load_base_model(str(root), allow_pickle=True)
    _assert_safe_advice(str(err.value))
    assert not marker.exists()
    _assert_payload_is_live(root / "unet" / "diffusion_pytorch_model.bin", marker)


@pytest.mark.parametrize("entries, words", [
    ({"archive/data.pkl": pickle.dumps({"w": 1}, protocol=2)}, r"archive/version"),
    ({"weights/readme.txt": b"hello"}, r"weights/data\.pkl"),
    ({"data.pkl": pickle.dumps({"w": 1}), "x/version": b"3"}, r"one top-level folder"),
])
def test_zip_not_written_by_torch_save_is_named_without_torch_internals(
    tmp_path: Path, entries: dict[str, bytes], words: str
) -> None:
    path = tmp_path / "odd.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    with pytest.raises(ModelLoadError, match=rf"odd\.ckpt: a zip archive but not a checkpoint torch\.save wrote.*{words}"
                       ) as err:
        load_base_model(str(path), allow_pickle=True, single_file_config="builtin:tiny-sd")
    assert not isinstance(err.value, PickleRefusedError), "a harmless pickle was called unsafe"
    assert "hasRecord" not in str(err.value) and "safetensors" in str(err.value)


def test_legit_pickle_checkpoint_needs_opt_in_then_loads(tiny: BaseModel, tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    state = to_original_state_dict(tiny.unet, tiny.vae, tiny.text_encoder)
    torch.save({"state_dict": state, "global_step": 470000}, path)  # the CompVis .ckpt shape
    with pytest.raises(PickleRefusedError, match=r"allow_pickle"):
        load_base_model(str(path), single_file_config="builtin:tiny-sd")
    loaded = load_base_model(str(path), allow_pickle=True, single_file_config="builtin:tiny-sd")
    assert loaded.identity == tiny.identity


def test_directory_with_only_bin_weights_is_refused_by_default(tiny: BaseModel, tmp_path: Path) -> None:
    root = tmp_path / "model"
    shutil.copytree(ensure_builtin("tiny-sd"), root)
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    tiny.unet.save_pretrained(root / "unet", safe_serialization=False)
    assert (root / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(PickleRefusedError, match=r"diffusion_pytorch_model\.bin.*allow_pickle"):
        load_base_model(str(root))
    assert load_base_model(str(root), allow_pickle=True).identity == tiny.identity


def test_nonsense_specs_name_the_accepted_forms(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"not a model!.*builtin:tiny-sd.*safetensors.*Hub id"):
        load_base_model("not a model!")
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"weights\.onnx.*Accepted forms"):
        load_base_model(str(tmp_path / "weights.onnx"))
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_base_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no such checkpoint"):
        load_base_model(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="not a base model"):
        load_base_model("builtin:tiny-clip")


def test_hub_id_offline_says_to_predownload() -> None:
    with pytest.raises(ModelLoadError, match=r"nobody-xyz/no-such-model.*(offline|no network).*local directory"):
        load_base_model("nobody-xyz/no-such-model")


def test_revision_on_a_local_model_is_an_error_not_ignored() -> None:
    with pytest.raises(ModelLoadError, match=r"revision.*Hub ids"):
        load_base_model("builtin:tiny-sd", revision="main")


def test_corrupt_safetensors_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="broken.safetensors"):
        load_base_model(str(path), single_file_config="builtin:tiny-sd")


def test_pickle_scan_names_globals_of_every_protocol_without_running_them(tmp_path: Path) -> None:
    import os

    from trainers.pickles import unsafe_globals

    for protocol in (0, 2, 4, 5):
        # Protocol 4+ names the second module through the memo (BINGET), not a fresh string.
        path = tmp_path / f"refs{protocol}.pkl"
        path.write_bytes(pickle.dumps([os.system, os.getcwd, torch.float32], protocol=protocol))
        assert unsafe_globals(path) == [f"{os.name}.system", f"{os.name}.getcwd"], protocol
    state = tmp_path / "state.pt"
    torch.save({"w": torch.ones(2)}, state)
    assert unsafe_globals(state) == []


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_torch_own_scan_is_no_substitute(tmp_path: Path) -> None:
    """Pins the reasons trainers/pickles.py gives for not using torch's
    ``get_unsafe_globals_in_checkpoint`` (torch 2.13): where torch's scan answers (torch.save's
    layout, protocol 2) it names the same globals as ours, but it raises instead of naming any for
    legacy files, plain pickles, other zips and protocol 4+ pickles, where ours names them. If a
    torch upgrade makes this fail, revisit that docstring (torch may now do the job)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint as torch_scan

    from trainers.pickles import unsafe_globals

    marker = tmp_path / "pwned"
    evil = {"w": _TouchOnUnpickle(marker)}
    files = {"tensors.pt": ({"w": torch.ones(2)}, {}), "evil.pt": (evil, {})}
    for name, (obj, kw) in files.items():
        torch.save(obj, tmp_path / name, **kw)
        assert sorted(torch_scan(tmp_path / name)) == sorted(unsafe_globals(tmp_path / name)), name
    assert unsafe_globals(tmp_path / "tensors.pt") == [] and "pathlib.Path" in unsafe_globals(tmp_path / "evil.pt")

    torch.save(evil, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(evil))
    torch.save(evil, tmp_path / "evil4.pt", pickle_protocol=4)
    with zipfile.ZipFile(tmp_path / "flat.ckpt", "w") as z:
        z.writestr("data.pkl", pickle.dumps(evil, protocol=2))
    for name, error in (("legacy.pt", ValueError), ("plain.pkl", ValueError), ("flat.ckpt", RuntimeError),
                        ("evil4.pt", pickle.UnpicklingError)):
        with pytest.raises(error):
            torch_scan(tmp_path / name)
        assert any(g.startswith("pathlib.") for g in unsafe_globals(tmp_path / name)), name
    assert not marker.exists()
