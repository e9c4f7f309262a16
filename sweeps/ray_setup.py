"""The sweep's Ray: a local one started (token auth kept, quietly), or a cluster joined after checking
it answers; and the GPU packing check, before Ray or once a GPU of the cluster can be probed."""

from __future__ import annotations

import os
from typing import Any

import ray

from sweeps.config import SweepConfig
from sweeps.console import condense_ray_notices
from sweeps.errors import SweepError
from sweeps.ray_auth import token_auth_for_local_ray
from sweeps.trial import trial_env


def ensure_ray(cfg: SweepConfig) -> bool:
    """Connect to the configured cluster or start a local Ray. Returns True if we started it.

    The cluster is ``ray_address`` (``sdsweep run --address``), else ``RAY_ADDRESS`` (set by
    ``ray job submit``). It is checked first (:func:`check_cluster_reachable`), so a wrong or dead
    address fails within seconds instead of Ray retrying its GCS connection forever. Without
    either, a local Ray is always *started* (``address="local"``): plain ``ray.init()`` would join
    whatever cluster Ray's address file in /tmp/ray names, a dead one included.

    Worker and raylet output is not forwarded to the driver's console (``log_to_driver=False``):
    trials report through Tune, their failures come back as results or one line each
    (sweeps/console.py), and a dying node's raylet would otherwise dump its state there (~40-100
    lines). It stays in each node's Ray session logs (``/tmp/ray/session_latest/logs``).
    """
    if ray.is_initialized():
        return False
    condense_ray_notices()
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        check_cluster_reachable(address)
        # On a cluster the job's own runtime env (ray job submit) applies; adding ours would make
        # Ray refuse to merge any key both set (cluster.yaml sets the node environment).
        ray.init(address=address, log_to_driver=False, logging_level=_ray_log_level())
        return False
    token_auth_for_local_ray()  # auth on, as Ray's default, without its notice (sweeps/ray_auth.py)
    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": trial_env()}, log_to_driver=False,
             logging_level=_ray_log_level())
    return True


def _ray_log_level() -> int:
    """Ray's driver-side log level: INFO with --verbose (Tune's classic output is off only without
    it), WARNING otherwise ("Started a local Ray instance", Tune's "Wrote the latest version ...")."""
    import logging

    return logging.INFO if os.environ.get("RAY_AIR_NEW_OUTPUT", "1") != "0" else logging.WARNING


CONNECT_TIMEOUT_S = 5.0  # a live GCS accepts a TCP connection at once; Ray's own retry loop never ends


def check_cluster_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`SweepError` naming ``address`` and the fix unless a Ray cluster answers there:
    ``host:port`` (the head's GCS), ``ray://host:port`` (Ray Client) or ``auto`` (the cluster Ray's
    address file names)."""
    import socket

    from ray._private.utils import read_ray_address

    target = read_ray_address() if address == "auto" else address
    fix = ("start it (`ray start --head`, or `ray up cluster.yaml`), correct the address, or run without "
           "--address / ray_address / RAY_ADDRESS to let sdsweep start a local Ray")
    if not target:
        raise SweepError(f"ray_address 'auto': no running Ray cluster found on this machine. Fix: {fix}")
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"ray_address {address!r}: not host:port or ray://host:port. Fix: use the address "
                         "`ray start --head` printed (e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        named = f"{address!r}" + (f" (Ray's address file names {target})" if address == "auto" else "")
        raise SweepError(f"ray_address {named}: no Ray cluster answers at {host}:{port} ({err}). Fix: {fix}") from None


@ray.remote(num_cpus=0)
def _gpu_memory_task() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30


GPU_PROBE_TIMEOUT_S = 120.0


def check_gpu_packing(cfg: SweepConfig, after_ray: bool) -> None:
    """Refuse a fractional-GPU packing that cannot fit (sweeps/plan.py), before any trial starts.

    The GPU's memory is ``resources.gpu_memory_gib``, else (a local Ray) this machine's GPU: both
    checked before Ray starts (``after_ray=False``). On a cluster it is probed once Ray is up
    (``after_ray=True``) by a task holding the trials' GPU share; if no GPU is free within
    ``GPU_PROBE_TIMEOUT_S`` the packing goes unchecked, with a note.
    """
    if cfg.resources.gpu <= 0:
        return
    from sweeps.plan import check_packing, local_gpu_memory_gib

    on_cluster = bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    memory = cfg.resources.gpu_memory_gib
    if memory is None and not on_cluster:
        memory = local_gpu_memory_gib()
    if not after_ray:
        if memory is not None:
            _print_plan(check_packing(cfg, memory))
        return
    if memory is not None or not on_cluster:
        return  # checked before Ray started, or a local Ray without a GPU (trials would never start)
    res = cfg.resources
    ref = _gpu_memory_task.options(num_gpus=min(res.gpu, 1.0), **({"resources": dict(res.custom)} if res.custom
                                                                  else {})).remote()
    ready, _ = ray.wait([ref], timeout=GPU_PROBE_TIMEOUT_S)
    if not ready:
        ray.cancel(ref, force=True)
        print(f"note: no GPU answered within {GPU_PROBE_TIMEOUT_S:.0f} s, so the GPU packing is unchecked; set "
              "resources.gpu_memory_gib to check it (`sdsweep plan SWEEP.yaml --gpu-memory GIB`)")
        return
    _print_plan(check_packing(cfg, ray.get(ref)))


def _print_plan(plan: Any) -> None:
    if plan is not None:
        big = plan.largest
        print(f"GPU plan: up to {plan.sharing} trial(s) per GPU x ~{big.estimate.total_gib:.1f} GiB "
              f"({big.method}, worst case) <= {plan.gpu_memory_gib:.1f} GiB ({plan.memory_source})", flush=True)
