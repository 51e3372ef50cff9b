"""A real Ray head for job-submission tests: started with ``ray start --head`` on 127.0.0.1 and
stopped by process id (the whole process tree), never with ``ray stop``, which would also stop
every other Ray instance on the machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc (no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int, grace: float = 5.0) -> None:
    pids = [pid] + descendants(pid)
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for p in pids + descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class RayHead:
    """``with RayHead(num_cpus=2) as head: head.submit([...])``"""

    def __init__(self, num_cpus: int = 2, resources: str | None = None):
        self.num_cpus = num_cpus
        self.resources = resources
        self.port = free_port()
        self.dashboard_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> "RayHead":
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port), "--num-cpus", str(self.num_cpus),
               "--ray-client-server-port", str(free_port()), "--disable-usage-stats",
               # Another Ray instance on this machine (the tests' own local cluster) holds the
               # default agent port; the job agent then never starts and submissions fail.
               "--dashboard-agent-listen-port", str(free_port())]
        if self.resources:
            cmd += ["--resources", self.resources]
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {self.proc.returncode}")
        self.__exit__(None, None, None)
        raise RuntimeError("the Ray dashboard did not come up in 90 s")

    def submit(self, entrypoint: list[str], cwd: str, timeout: float = 300) -> subprocess.CompletedProcess:
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [ray_bin, "job", "submit", "--address", self.address, "--working-dir", ".", "--"] + entrypoint
        deadline = time.time() + 90
        while True:
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
            # The dashboard answers before its job agent is up: retry only that refusal.
            if "No available agent" not in proc.stderr or time.time() > deadline:
                return proc
            time.sleep(2)

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid)
            self.proc.wait(timeout=10)
            self.log.close()
            self.proc = None
