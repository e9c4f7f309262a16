"""Which Ray a sweep runs on: without an address it always starts its own local Ray (even when
Ray's address file in /tmp/ray names a cluster that has died); with an address that no cluster
answers at, it fails within seconds, naming the address and the fix, instead of hanging."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps.driver import check_cluster_reachable
from sweeps.results import SweepError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "sweeps" / "configs" / "tiny-demo.yaml"


def _dead_address() -> str:
    """host:port where nothing listens (a port the kernel just handed out and took back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture
def dead_cluster_address_file():
    """Ray's address file naming a cluster that is gone (what a crashed `ray start` leaves), put
    back as it was afterwards."""
    from ray._private.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    before = path.read_text() if path.is_file() else None
    dead = _dead_address()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dead)
    yield dead
    if before is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(before)


def test_an_address_nobody_answers_at_fails_in_seconds_naming_it_and_the_fix():
    dead = _dead_address()
    started = time.perf_counter()
    with pytest.raises(SweepError) as err:
        check_cluster_reachable(dead)
    assert time.perf_counter() - started < 10
    assert dead in str(err.value) and "ray start --head" in str(err.value)
    with pytest.raises(SweepError, match="not host:port"):
        check_cluster_reachable("my-cluster")


def test_auto_names_the_dead_cluster_the_address_file_points_at(dead_cluster_address_file):
    with pytest.raises(SweepError) as err:
        check_cluster_reachable("auto")
    assert dead_cluster_address_file in str(err.value) and "address file" in str(err.value)


def _env() -> dict[str, str]:
    # RAY_AUTH_MODE as in a fresh shell: unset (an in-process Ray earlier in this pytest process
    # sets it to token in os.environ).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(OMP_NUM_THREADS="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", HF_HUB_OFFLINE="1")
    return env


def test_without_an_address_a_local_ray_is_started_despite_a_dead_clusters_address_file(
        dead_cluster_address_file):
    code = ("import os, ray\nfrom sweeps.config import load_sweep\nfrom sweeps.driver import ensure_ray\n"
            "from ray._raylet import AuthenticationMode, get_authentication_mode\n"
            f"cfg = load_sweep({str(TINY)!r})\nassert ensure_ray(cfg)\n"
            "print('GCS', ray.get_runtime_context().gcs_address)\n"
            "print('AUTH', get_authentication_mode() == AuthenticationMode.TOKEN,"
            " ray.get(ray.remote(lambda: os.environ.get('RAY_AUTH_MODE')).remote()))\nray.shutdown()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gcs = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("GCS"))
    assert gcs != dead_cluster_address_file
    # Token authentication stays on (the driver's mode, and the workers the local Ray started run
    # under it), and Ray's notice that it turned it on by default is not printed
    # (sweeps/ray_auth.py).
    assert "AUTH True token" in proc.stdout.splitlines(), proc.stdout
    assert "Token authentication" not in proc.stderr + proc.stdout, proc.stderr[-3000:]


def test_sdsweep_run_with_a_dead_address_exits_with_the_error_not_a_hang(tmp_path):
    dead = _dead_address()
    cmd = [sys.executable, "-m", "sweeps.cli", "run", str(TINY), "--address", dead, "--run-dir", str(tmp_path / "r")]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert proc.returncode != 0 and time.perf_counter() - started < 90
    assert f"ray_address {dead!r}: no Ray cluster answers" in proc.stderr, proc.stderr[-2000:]
