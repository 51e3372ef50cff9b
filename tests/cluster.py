"""A real Ray head for tests: started with ``ray start --head`` on 127.0.0.1 with free ports and
its own temporary directory, and stopped by process id (the whole process tree), never with
``ray stop``, which would also stop every other Ray instance on the machine. Every process of
the cluster (GCS, raylet, workers) descends from ``RayHead.proc``, so a test finds its own
workers with ``own_processes`` and never touches another cluster's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from spellshield.toys.processes import descendants


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int, grace: float = 5.0) -> None:
    pids = [pid] + descendants(pid)
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    for p in pids + descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def processes_with(title: bytes, among=None) -> list[int]:
    """Processes whose command line starts with ``title`` (a Ray worker's title, e.g.
    ``ray::GenerationWorker.run_unit``), restricted to the pids in ``among``."""
    out = []
    for pid in (among if among is not None else [int(p) for p in os.listdir("/proc") if p.isdigit()]):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(title):
                    out.append(int(pid))
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _ray_bin() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


class RayHead:
    """``with RayHead(num_cpus=2) as head: head.submit([...])``; ``head.add_node(...)`` starts
    another node (``ray start --address``) on this machine, with its own custom resources."""

    def __init__(self, num_cpus: int = 2, resources: str | None = None, dashboard: bool = True, env: dict | None = None):
        self.num_cpus = num_cpus
        self.env = env  # the head's environment (its workers inherit it); None: this process's
        self.resources = resources
        self.dashboard = dashboard
        self.port = free_port()
        self.dashboard_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []
        self.node_temp_dirs: list[str] = []  # temporary directories of added nodes that have their own
        # Short (unix socket paths are limited to 107 bytes) and ours alone: not /tmp/ray.
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")

    def own_processes(self, title: bytes) -> list[int]:
        """This cluster's processes whose command line starts with ``title``."""
        roots = [p.pid for p in [self.proc, *self.nodes] if p is not None]
        return processes_with(title, among=[pid for root in roots for pid in descendants(root)])

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> "RayHead":
        cmd = [_ray_bin(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port), "--num-cpus", str(self.num_cpus),
               "--ray-client-server-port", str(free_port()), "--disable-usage-stats",
               # Another Ray instance on this machine (the tests' own local cluster) holds the
               # default agent port; the job agent then never starts and submissions fail.
               "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()), "--temp-dir", self.temp_dir,
               "--include-dashboard", "true" if self.dashboard else "false"]
        if self.resources:
            cmd += ["--resources", self.resources]
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        deadline = time.time() + 90
        if not self.dashboard:
            return self._wait_without_dashboard(deadline)
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as r:
                    if r.status == 200 and self.alive_nodes() >= 1:
                        return self
            except OSError:
                time.sleep(0.5)
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {self.proc.returncode}")
        self.__exit__(None, None, None)
        raise RuntimeError("the Ray dashboard did not come up in 90 s")

    def _wait_without_dashboard(self, deadline: float) -> "RayHead":
        """Up when the GCS answers and the raylet has its socket (then ``ray.init`` attaches)."""
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {self.proc.returncode}")
            raylet = os.path.join(self.temp_dir, "session_latest", "sockets", "raylet")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    if os.path.exists(raylet):
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.__exit__(None, None, None)
        raise RuntimeError("ray start --head did not come up in 90 s")

    def submit(self, entrypoint: list[str], cwd: str, timeout: float = 300, runtime_env: dict | None = None,
               env: dict | None = None) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir .`` from ``cwd``; ``runtime_env`` (e.g. ``{"env_vars": {...}}``) as
        ``--runtime-env-json``; ``env``: the environment of the ``ray job submit`` process itself."""
        extra = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
        cmd = [_ray_bin(), "job", "submit", "--address", self.address, "--working-dir", ".", *extra, "--"] + entrypoint
        deadline = time.time() + 90
        while True:
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
            # The dashboard answers before its job agent is up: retry only that refusal.
            if "No available agent" not in proc.stderr or time.time() > deadline:
                return proc
            time.sleep(2)

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add_node(self, num_cpus: int = 2, resources: str | None = None, timeout: float = 60, env: dict | None = None,
                 own_temp_dir: bool = False) -> subprocess.Popen:
        """Start a worker node and wait until the cluster counts it. ``env``: the node's environment
        (its workers inherit it); ``own_temp_dir``: its own Ray temporary directory, as a separate
        machine has (``node_temp_dirs[-1]``), instead of the head's."""
        temp_dir = self.temp_dir
        if own_temp_dir:
            temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
            self.node_temp_dirs.append(temp_dir)
        cmd = [_ray_bin(), "start", "--block", "--address", self.gcs_address, "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(num_cpus), "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats",
               "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()), "--temp-dir", temp_dir]
        if resources:
            cmd += ["--resources", resources]
        before = self.alive_nodes()
        proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.nodes.append(proc)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.alive_nodes() > before:
                return proc
            if proc.poll() is not None:
                raise RuntimeError(f"ray start --address exited with {proc.returncode}")
            time.sleep(0.5)
        raise RuntimeError("the new node did not join in time")

    def kill_node(self, proc: subprocess.Popen) -> None:
        """Stop one worker node by process id (its whole process tree), as a machine loss would."""
        kill_tree(proc.pid, grace=0)
        proc.wait(timeout=10)

    def alive_nodes(self) -> int:
        with urllib.request.urlopen(f"{self.address}/nodes?view=summary", timeout=5) as r:
            data = json.load(r)
        summary = data.get("data", {}).get("summary", [])
        return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")

    def submit_async(self, entrypoint: list[str], cwd: str) -> str:
        """Submit without waiting; returns the job id."""
        cmd = [_ray_bin(), "job", "submit", "--no-wait", "--address", self.address, "--working-dir", ".", "--"] + entrypoint
        deadline = time.time() + 90
        while True:
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
            if "No available agent" not in proc.stderr or time.time() > deadline:
                break
            time.sleep(2)
        for line in (proc.stdout + proc.stderr).splitlines():
            if "raysubmit_" in line:
                return line[line.index("raysubmit_"):].split()[0].strip("'\".,")
        raise RuntimeError(f"no job id in: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")

    def job_status(self, job_id: str) -> str:
        with urllib.request.urlopen(f"{self.address}/api/jobs/{job_id}", timeout=5) as r:
            return json.load(r)["status"]

    def job_logs(self, job_id: str) -> str:
        with urllib.request.urlopen(f"{self.address}/api/jobs/{job_id}/logs", timeout=5) as r:
            return json.load(r).get("logs", "")

    def wait_job(self, job_id: str, timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.job_status(job_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(1)
        raise RuntimeError(f"job {job_id} still running after {timeout} s")

    def __exit__(self, *exc) -> None:
        for node in self.nodes:
            kill_tree(node.pid)
            node.wait(timeout=10)
        self.nodes = []
        if self.proc is not None:
            kill_tree(self.proc.pid)
            self.proc.wait(timeout=10)
            self.log.close()
            self.proc = None
        for temp_dir in [self.temp_dir, *self.node_temp_dirs]:
            shutil.rmtree(temp_dir, ignore_errors=True)
