"""cluster.yaml: valid for Ray's cluster launcher, GPU workers only run trials, no hyperparameters.

Validation goes through Ray's own code path: ``ray up`` calls
``ray.autoscaler._private.util.prepare_config`` (merge with the AWS defaults, merge setup
commands) and then ``validate_config`` (the JSON schema ``ray/autoscaler/ray-schema.json`` plus
Ray's cross-field checks). Only the cloud calls (EC2 instance-type lookup, IAM) are left out.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def load() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text(encoding="utf-8"))


def ray_validated(cfg: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does with the file before talking to the cloud; raises if Ray rejects it."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def walk(node: Any) -> Iterator[tuple[str | None, Any]]:
    """Every (key, value) pair and every scalar of a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k), v
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)
    else:
        yield None, node


def class_fields(path: Path, *classes: str) -> set[str]:
    """Annotated field names of pydantic classes, read from source (no torch import needed)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {stmt.target.id for node in tree.body if isinstance(node, ast.ClassDef) and node.name in classes
            for stmt in node.body if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}


def schema_keys(node: Any) -> set[str]:
    """Every property name the Ray launcher schema defines, at any depth."""
    keys: set[str] = set()
    if isinstance(node, dict):
        keys |= set(node.get("properties", {}))
        for v in node.values():
            keys |= schema_keys(v)
    elif isinstance(node, list):
        for v in node:
            keys |= schema_keys(v)
    return keys


def hyperparameter_names() -> tuple[set[str], set[str]]:
    """(forbidden keys, forbidden words in values), taken from the code and the shipped spaces."""
    hparams = class_fields(REPO / "trainers" / "config.py", "TrainConfig", "LoraSettings")
    dotted: set[str] = set()
    for space in (REPO / "search_spaces").glob("*.yaml"):
        for key in yaml.safe_load(space.read_text(encoding="utf-8"))["params"]:
            dotted.add(key)
            hparams.add(key.rsplit(".", 1)[-1])
    # Sweep-file sections (search, scheduler, evaluation, ...) that Ray's launcher never uses.
    ray_keys = schema_keys(json.loads(RAY_SCHEMA.read_text()))
    sweep_only = (class_fields(REPO / "sweeps" / "config.py", "SweepConfig")
                  | class_fields(REPO / "sweeps" / "sections.py", "SearchSettings", "SchedulerSettings",
                                 "EvaluationSettings")) - ray_keys - {"type", "mode", "name"}
    words = {h for h in hparams if "_" in h} | dotted  # distinctive enough to search inside commands
    return hparams | dotted | sweep_only, words


def hyperparameters_in(cfg: dict[str, Any]) -> list[str]:
    keys, words = hyperparameter_names()
    found = [k for k, _ in walk(cfg) if k in keys]
    for _, value in walk(cfg):
        if isinstance(value, str):
            found += [w for w in words if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", value)]
    return found


# --- the file as shipped ------------------------------------------------------------------------


def test_ray_cluster_launcher_accepts_the_file():
    cfg = load()
    jsonschema.validate(cfg, json.loads(RAY_SCHEMA.read_text()))  # the file alone, before defaults
    prepared = ray_validated(cfg)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_trials_have_gpu_workers_and_the_head_runs_none():
    prepared = ray_validated(load())
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0, \
        "the head must offer Ray no CPU/GPU so trials and the cache build go to GPU workers"
    assert head["max_workers"] == 0
    gpu = {name: t for name, t in types.items() if name != prepared["head_node_type"]
           and t["resources"].get("GPU", 0) >= 1}
    assert gpu, "no GPU worker node type"
    assert any(t["max_workers"] >= 1 for t in gpu.values()), "no GPU worker type may ever start"
    for name, t in gpu.items():
        assert t["min_workers"] == 0, f"{name}: idle GPU nodes should scale to zero"
        assert t["resources"].get("CPU", 0) >= 1, f"{name}: trials ask for CPUs too"


def test_every_node_installs_the_project_from_the_mounted_repo():
    cfg = load()
    prepared = ray_validated(cfg)
    repo_mounts = [remote for remote, local in cfg["file_mounts"].items() if local in (".", "./")]
    assert repo_mounts, "the repository is not copied to the nodes"
    install = re.compile(rf"cd {re.escape(repo_mounts[0])} && python3 -m pip install -e \.$")
    for role in ("head_setup_commands", "worker_setup_commands"):  # after Ray merged setup_commands
        assert any(install.search(c) for c in prepared[role]), f"{role}: no `pip install -e .` of the repo"


def test_no_command_or_option_mentions_torchvision():
    strings = [v for _, v in walk(load()) if isinstance(v, str)]
    assert strings and not [s for s in strings if "torchvision" in s.lower()]


def test_the_image_carries_the_ray_version_the_project_pins():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(re.fullmatch(r"ray(\[[\w,]+\])?==(\S+)", d).group(2) for d in deps if d.startswith("ray"))
    image = load()["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{pin}-"), f"{image} does not match ray=={pin} in pyproject.toml"


def test_every_node_sees_the_shared_storage_and_cache():
    options = " ".join(load()["docker"]["run_options"])
    mount = re.search(r"-v (\S+):(\S+)", options)
    assert mount and mount.group(1) == mount.group(2), "shared storage must have the same path everywhere"
    cache = re.search(r"-e SDSWEEP_CACHE=(\S+)", options)
    assert cache and cache.group(1).startswith(mount.group(2) + "/")


def test_the_file_holds_no_hyperparameters():
    keys, words = hyperparameter_names()
    assert {"learning_rate", "rank", "train.learning_rate", "lora.rank", "num_samples"} <= keys | words
    assert hyperparameters_in(load()) == []


# --- the checks can fail --------------------------------------------------------------------------


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda c: c.update(setup_comands=c.pop("setup_commands")), id="misspelled-top-level-key"),
    pytest.param(lambda c: c["available_node_types"]["gpu_a10g"].update(max_worker=8), id="misspelled-node-key"),
    pytest.param(lambda c: c["available_node_types"]["gpu_a10g"]["resources"].update(GPU=0.5), id="fractional-gpu"),
])
def test_ray_rejects_a_broken_copy(mutate):
    cfg = load()
    mutate(cfg)
    with pytest.raises(jsonschema.ValidationError):
        ray_validated(cfg)


def test_a_hyperparameter_smuggled_into_the_file_is_found():
    cfg = load()
    cfg["available_node_types"]["gpu_a10g"]["node_config"]["learning_rate"] = 1e-4
    cfg["setup_commands"].append("sdsweep run x.yaml --set base.train.learning_rate=1e-4")
    assert sorted(set(hyperparameters_in(cfg))) == ["learning_rate", "train.learning_rate"]
