"""Shared by the e2e tests: readers for what a finished sweep left in its run directory, the
browser-side tools that look at it (headless Chromium, optuna-dashboard), and killing a driver."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a driver started in a session of its own and every process it started (its Ray),
    and nothing else: not `ray stop --force`, which would also kill a Ray this pytest process uses."""
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(tree, timeout=60)


def wandb_steps(run_dir: Path, trial_dir: Path) -> list[int]:
    """Every `step` the trial's W&B run logged, over all its offline segments, in order."""
    from sweeps.tracking import read_offline_run, wandb_run_id

    trial_id = json.loads((trial_dir / "result.json").read_text().splitlines()[0])["trial_id"]
    run_id = wandb_run_id(run_dir.name, trial_id)
    segments = sorted(p.parent for p in (run_dir / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))
    assert segments, f"no W&B run for {trial_id}"
    return [int(h["step"]) for seg in segments for h in read_offline_run(seg).history if "step" in h]


def chromium(url: str, *args: str, budget_ms: int = 10000) -> subprocess.CompletedProcess:
    """Run headless Chromium on ``url`` with ``args`` (``--dump-dom``, ``--screenshot=...``) and a
    throwaway profile, scripts given ``budget_ms`` of virtual time; fails the test if it fails."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "no chromium: run `bash tests/install_chromium.sh` (Debian's chromium; needs root or sudo)"
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args, url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def chromium_text(url: str) -> str:
    """The text headless Chromium renders for ``url`` (scripts run, styles and scripts dropped)."""
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", chromium(url, "--dump-dom", budget_ms=15000).stdout, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@contextmanager
def optuna_dashboard(storage: str) -> Iterator[str]:
    """``optuna-dashboard STORAGE`` (the `dashboard` extra) as a user starts it, on a free local
    port; yields its base URL once its API answers, and stops it after."""
    import socket
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("optuna-dashboard")
    server = subprocess.Popen([str(exe), storage, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/api/studies", timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError(f"optuna-dashboard {storage} did not answer on {base} within ~20 s")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def beyond_seed_noise(gain: dict) -> float:
    """The lower end of a margin's interval over the seeds alone, the prompts held fixed: what the
    confirmation's seed part of the two-way bootstrap (``se_seeds``, sweeps/bootstrap.py) says of
    the claim "on these prompts, the seeds' noise cannot explain it" -- a claim about these held-out
    prompts, narrower than the two-way interval's claim about prompts like them."""
    from scipy.stats import t

    return gain["margin"] - t.ppf(1 - (1 - gain["confidence"]) / 2, gain["seeds"] - 1) * gain["se_seeds"]
