"""Quiet by default: a job's console shows neither the libraries' warnings from its workers nor
Ray's lines about an actor it restarts; SPELLSHIELD_VERBOSE=1 brings both back."""

import json
import logging
import os
import subprocess
import sys

import pytest

from spellshield.jobs.runtime import console
from spellshield.workers.console import VERBOSE, quiet_libraries
from tests.conftest import ROOT


def test_console_options(monkeypatch):
    import ray

    monkeypatch.delenv(VERBOSE, raising=False)
    with console(remote=True) as options:
        assert options == {"logging_level": logging.ERROR, "log_to_driver": False}
        assert ray._private.worker._worker_logs_enabled is False
    assert ray._private.worker._worker_logs_enabled is True  # restored: a later session in this process prints again
    monkeypatch.setenv(VERBOSE, "1")
    with console(remote=False) as options:  # a local cluster's workers inherit the variable
        assert options == {"logging_level": logging.WARNING, "log_to_driver": True}
        assert ray._private.worker._worker_logs_enabled is True
    with console(remote=True) as options:
        assert options["runtime_env"] == {"env_vars": {VERBOSE: "1"}}
    # a Ray job whose runtime env sets it already: ray.init must not set it again (Ray refuses)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {VERBOSE: "1"}}}))
    with console(remote=True) as options:
        assert "runtime_env" not in options


def test_quiet_libraries(monkeypatch):
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    try:
        diffusers_logging.set_verbosity_warning()
        monkeypatch.setenv(VERBOSE, "1")
        quiet_libraries()
        assert diffusers_logging.get_verbosity() == logging.WARNING
        monkeypatch.delenv(VERBOSE)
        quiet_libraries()
        assert diffusers_logging.get_verbosity() == logging.ERROR
    finally:
        diffusers_logging.set_verbosity(before)


SCRIPT = """
import os, sys
import ray
from spellshield.jobs.runtime import ray_cluster
from spellshield.workers.console import quiet_libraries
from spellshield.toys.pipelines import save_ddpm

class Worker:  # like GenerationWorker: loads a diffusers pipeline (diffusers warns: no accelerate)
    def __init__(self, model):
        quiet_libraries()
        from spellshield.pipeline.loading import load_pipeline
        self.pipe = load_pipeline(model)

    def die_once(self, marker):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the actor is restarted and the call retried, as the job's workers are
        return "survived"

tmp = sys.argv[1]
with ray_cluster(num_cpus=1):
    worker = ray.remote(Worker).options(max_restarts=1, max_task_retries=1, num_cpus=0.25).remote(save_ddpm(tmp + "/ddpm"))
    print(ray.get(worker.die_once.remote(tmp + "/marker")), flush=True)
"""


@pytest.mark.slow
# verbose is heavy (the CI budget): CI keeps the default, quiet console; verbose only lets Ray's lines through
@pytest.mark.parametrize("verbose", [False, pytest.param(True, marks=pytest.mark.heavy)])
def test_console_of_a_restarted_worker(tmp_path, verbose):
    env = {k: v for k, v in os.environ.items() if k not in (VERBOSE, "RAY_ADDRESS")}
    if verbose:
        env[VERBOSE] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console_text = proc.stdout + proc.stderr
    assert "survived" in proc.stdout
    noisy = ["accelerate", "A worker died", "retries remaining"]
    if verbose:
        assert all(line in console_text for line in noisy), console_text[-3000:]
    else:
        assert not any(line in console_text for line in noisy), console_text[-3000:]
        assert proc.stdout.strip() == "survived" and proc.stderr.strip() == ""
