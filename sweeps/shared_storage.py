"""Before a sweep on a multi-node cluster starts: can every node see the sweep's storage?

Trials write checkpoints, samples and W&B files into the run directory, and read and write the
latent cache, from whichever node they run on; the driver, ``sdsweep results`` and a resumed trial
on another node read them back. Ray itself only notices a node-local ``storage_path`` when the
first checkpoint from a worker node goes missing. So the driver writes a token file into each
storage root and a zero-CPU task pinned to every alive node reads it back; a node that cannot see
it fails the sweep up front, naming the key, the node and the fix. (``storage_path`` is a
filesystem path; ``pyarrow.fs`` URIs such as ``s3://`` are not supported yet.)
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import ray

from sweeps.results import SweepError

MARKER = ".sdsweep-shared-check"


@ray.remote(num_cpus=0)
def _read_marker(path: str) -> str | None:
    """On one node: the marker's text, or None when this node does not see the file."""
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_shared_storage(roots: dict[str, str], timeout: float = 60.0) -> None:
    """Raise :class:`SweepError` unless every alive node of the connected cluster sees each of
    ``roots`` (config key -> local directory). A no-op on a single-node cluster."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    # The driver's own node sees what the driver wrote. Not checking it also keeps a worker off
    # the head: under `ray job submit`, a worker started there with the job's runtime env and gone
    # again lets the head's runtime-env agent delete the uploaded working directory -- the driver's
    # current directory (seen: wandb.init's os.getcwd() then failed).
    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in nodes if n["NodeID"] != here]
    for key, root in roots.items():
        directory = Path(root)
        directory.mkdir(parents=True, exist_ok=True)
        marker, token = directory / MARKER, secrets.token_hex(16)
        marker.write_text(token)
        try:
            refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: _read_marker.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
                for n in nodes}
            seen = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout)))
        finally:
            marker.unlink(missing_ok=True)
        blind = sorted(node for node, text in seen.items() if text != token)
        if blind:
            raise SweepError(
                f"{key}: {root} is not shared storage: {len(blind)} of {len(nodes)} nodes do not see what the driver "
                f"writes there (node {', '.join(blind)}). Every node writes and reads the run directory and the "
                f"latent cache. Fix: set {key} to a directory on a filesystem every node mounts at the same path "
                "(NFS, a cluster filesystem)")


def storage_roots(cfg: Any) -> dict[str, str]:
    """The directories a sweep's nodes share: the run storage and the latent cache."""
    from trainers.run import latent_cache_root

    return {"storage_path": str(cfg.storage_path), "base.cache_dir (or SDSWEEP_CACHE)": str(latent_cache_root(cfg.base))}
