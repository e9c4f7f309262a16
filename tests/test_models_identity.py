"""Model identities: every component's weights are hashed once per load."""

from __future__ import annotations

import pytest

import trainers.fingerprints as fingerprints
from trainers.models import load_base_model, module_fingerprint


def test_each_component_is_fingerprinted_once_per_load(tiny_sd_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[int] = []
    digest = fingerprints.tensors_digest

    def counting(tensors):  # every fingerprint reads all of a module's bytes: count them
        hashed.append(len(tensors))
        return digest(tensors)

    monkeypatch.setattr(fingerprints, "tensors_digest", counting)
    model = load_base_model("builtin:tiny-sd")
    sizes = sorted(len(m.state_dict()) for m in (model.unet, model.vae, model.text_encoder))
    assert sorted(hashed) == sizes, "a component's weights were hashed more than once (or not at all)"
    # ... and the identities are still those of the weights.
    monkeypatch.undo()
    assert model.vae_identity == module_fingerprint(model.vae)
    assert model.identity == fingerprints.weights_identity(model.unet, model.vae, model.text_encoder)
