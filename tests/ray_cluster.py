"""A real multi-node Ray cluster on this machine, for the cluster fault tests.

A head node (no CPUs: it schedules, trials never run on it) and worker nodes, each a separate
``ray start --block`` process in a session of its own, with its own CPU and a custom resource
that sweeps pin their work to. A node is stopped -- or killed, for a fault test -- by signalling
every process of its session (``start_new_session``: the session id is the ``ray start`` pid):
the ``ray start`` process, its raylet, agents and every worker process the raylet started (Ray
puts each worker in a process group of its own, but not in a session of its own). Nothing else on the machine is touched (never ``ray stop``, which would stop every Ray
on it). Stopping is idempotent and safe after a failed start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NODE_RESOURCE = "sdsweep_node"  # the custom resource trials ask for: only worker nodes have it

# Node death is noticed after period x threshold (Ray's defaults take ~30 s); the GCS reads these
# from its environment at start.
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                      "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}


def cluster_env() -> dict[str, str]:
    """The environment of the nodes and of drivers joining them: no token authentication (the
    nodes would each need the token), Ray's uv hook off, offline libraries, one thread."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **FAST_HEALTH_CHECKS)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """``with LocalCluster(workers=2) as c:`` -- ``c.address`` for ``sdsweep run --address``."""

    def __init__(self, workers: int = 2, cpus_per_worker: int = 1, object_store_mb: int = 300,
                 dashboard: bool = False) -> None:
        self.workers_wanted, self.cpus, self.store = workers, cpus_per_worker, object_store_mb * 2 ** 20
        # The dashboard (needs ray[default]) serves `ray job submit`.
        self.dashboard_port = _free_port() if dashboard else None
        # Short: Ray's Unix sockets live under it, and a socket path has a ~107-character limit.
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self.port = _free_port()
        self.head: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        assert self.dashboard_port is not None, "started without the dashboard"
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str], log: str, hide: Path | None = None) -> subprocess.Popen:
        # Each node's dashboard agent on a port of its own: Ray's default (52365) is one per machine,
        # and a node whose agent cannot bind it serves no HTTP (on the head: `ray job submit` then
        # answers "No available agent" for good). Seen with a second Ray on the machine.
        cmd = ["ray", "start", "--block", "--node-ip-address=127.0.0.1", f"--object-store-memory={self.store}",
               f"--dashboard-agent-listen-port={_free_port()}", *args]
        if hide is not None:
            # A node on a filesystem of its own: in a private mount namespace, `hide` is an empty
            # tmpfs, so nothing the driver writes under it is visible there (as on a second machine).
            hide.mkdir(parents=True, exist_ok=True)
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'mount -t tmpfs tmpfs "{hide}" && exec "$0" "$@"', *cmd]
        with (self.root / log).open("w") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=cluster_env(),
                                    start_new_session=True)

    def start(self) -> "LocalCluster":
        dash = (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
                if self.dashboard_port else ["--include-dashboard=false"])
        self.head = self._start(["--head", f"--port={self.port}", "--num-cpus=0", *dash,
                                 f"--temp-dir={self.root / 'ray'}"], "head.log")
        self._wait_for(1)
        for i in range(self.workers_wanted):
            self.add_worker()
        return self

    def add_worker(self, hide: Path | None = None) -> int:
        """Start one more worker node (one that cannot see ``hide``'s contents, if given); returns
        its index in ``self.workers``."""
        i = len(self.workers)
        self.workers.append(self._start([f"--address={self.address}", f"--num-cpus={self.cpus}",
                                         f"--resources={json.dumps({NODE_RESOURCE: 1})}"], f"worker{i}.log", hide))
        self._wait_for(1 + len([w for w in self.workers if w.poll() is None]))
        return i

    def alive_nodes(self) -> int:
        """How many nodes the GCS calls alive (asked from a short-lived driver process)."""
        try:  # a driver joining a GCS that is not up yet would retry for a long time
            socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
        except OSError:
            return 0
        code = (f"import ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
                "print('ALIVE', sum(n['Alive'] for n in ray.nodes()))")
        try:
            proc = subprocess.run(["python3", "-c", code], capture_output=True, text=True, env=cluster_env(),
                                  timeout=60)
        except subprocess.TimeoutExpired:
            return 0
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ALIVE")]
        return int(lines[-1].split()[1]) if lines else 0

    def _wait_for(self, nodes: int, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.head is not None and self.head.poll() is not None:
                raise RuntimeError(f"the head node exited:\n{(self.root / 'head.log').read_text()[-3000:]}")
            if self.alive_nodes() >= nodes:
                return
            time.sleep(1)
        raise TimeoutError(f"{nodes} nodes not alive after {timeout} s; logs in {self.root}")

    def node_of(self, pid: int) -> int | None:
        """The index of the worker node whose session holds process ``pid`` (a trial's)."""
        try:
            session = os.getsid(pid)
        except ProcessLookupError:
            return None
        return next((i for i, w in enumerate(self.workers) if w.pid == session), None)

    def kill_worker(self, i: int) -> None:
        """SIGKILL every process of worker node ``i``: its raylet and its trial processes."""
        _signal_session(self.workers[i], signal.SIGKILL)

    def stop(self) -> None:
        for proc in [*self.workers, *([self.head] if self.head else [])]:
            _signal_session(proc, signal.SIGTERM)
        deadline = time.time() + 15
        for proc in [*self.workers, *([self.head] if self.head else [])]:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _signal_session(proc, signal.SIGKILL)  # what SIGTERM left (workers the raylet did not reap)

    def __enter__(self) -> "LocalCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_session(proc: subprocess.Popen, sig: int) -> None:
    """Signal every process whose session is ``proc``'s (start_new_session: sid == its pid)."""
    for pid in [int(d) for d in os.listdir("/proc") if d.isdigit()]:
        try:
            if os.getsid(pid) == proc.pid:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
