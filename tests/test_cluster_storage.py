"""The round trip of issue 9 on a two-node Ray cluster that shares no filesystem with its data:
corpus on S3 (SeaweedFS) -> build-index to S3 -> generate with model, index and run on S3, a
generation worker killed -9 mid-unit, the driver killed -9, ``generate --resume`` -> the run
read back from S3.

Each node is a ``ray start`` process with its own Ray temporary directory, its own TMPDIR, HOME
and node cache (``SPELLSHIELD_CACHE_DIR``) in its environment, which its workers inherit, as
separate machines would have. The drivers run from an empty working directory with a cache of
their own. Everything is stopped by the process ids this test started.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request

import pytest

from spellshield import storage
from spellshield.storage.cache import CACHE_ENV
from tests.cluster import RayHead, alive, descendants
from tests.conftest import CIFAR_DIR
from tests.s3server import ADMIN, run_job
from tests.test_generate import tar_images

pytestmark = pytest.mark.slow

NUM_IMAGES, UNIT_SIZE = 24, 4
UNITS = NUM_IMAGES // UNIT_SIZE


def corpus_tars(digits_corpus) -> list[str]:
    """Two CIFAR-10 tars where ../shared has them, else two generated digits tars."""
    cifar = sorted(glob.glob(os.path.join(CIFAR_DIR, "train-*.tar")))
    return cifar[:2] if len(cifar) >= 2 else digits_corpus[:2]


def images_in(tar: str) -> int:
    with tarfile.open(tar) as f:
        return sum(1 for m in f if m.name.rsplit(".", 1)[-1] in ("png", "jpg", "jpeg"))


def files_under(root) -> dict[str, int]:
    """{relative path: size} of every file under ``root``."""
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            out[os.path.relpath(path, root)] = os.path.getsize(path)
    return out


class Machine:
    """The directories one node (or one driver) of the cluster may write: its cache, its TMPDIR,
    its HOME; ``env()`` is the process environment that points it there."""

    def __init__(self, root, name, s3_env: dict):
        self.name = name
        self.cache, self.tmp, self.home = (root / f"{name}-{what}" for what in ("cache", "tmp", "home"))
        for d in (self.cache, self.tmp, self.home):
            d.mkdir()
        self.s3_env = s3_env

    def env(self, **extra) -> dict:
        env = {**os.environ, **self.s3_env, CACHE_ENV: str(self.cache), "TMPDIR": str(self.tmp), "HOME": str(self.home),
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **extra}
        env.pop("RAY_ADDRESS", None)
        env.pop("XDG_CACHE_HOME", None)  # the node cache comes from CACHE_ENV alone
        return env


def running_unit_worker(head: RayHead) -> int | None:
    """The pid of a generation worker of this cluster that is inside ``run_unit`` now, from
    Ray's state API; None while there is none."""
    from ray.util.state import list_tasks

    try:
        tasks = list_tasks(address=head.address, filters=[("name", "=", "GenerationWorker.run_unit"), ("state", "=", "RUNNING")],
                           raise_on_missing_output=False, timeout=10)
    except Exception:  # the state API answers late while the cluster is busy: ask again
        return None
    ours = set(descendants(head.proc.pid)) | {p for node in head.nodes for p in descendants(node.pid)}
    for task in tasks:
        if task.worker_pid in ours:  # never a process of another Ray on this machine
            return task.worker_pid
    return None


def wait_for(condition, what: str, timeout: float = 300, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


# heavy: the CI budget (30 min on 2 cores); the same path is covered in CI by test_two_node_cluster (two nodes) and test_credentials_reach_the_workers_of_an_existing_cluster_through_the_job (a ray start cluster on S3); run with -m heavy
@pytest.mark.heavy
def test_round_trip_on_two_nodes_without_a_shared_filesystem(s3_server, s3_env, s3_bucket, memorizer_model, digits_corpus,
                                                             tmp_path):
    from spellshield.storage.commit import ATTEMPTS, LEASE, LEASE_TTL_ENV, committed_units

    tars = corpus_tars(digits_corpus)
    for path in tars:
        storage.put_file(path, f"{s3_bucket}/corpus/{os.path.basename(path)}")
    storage.put_tree(memorizer_model, f"{s3_bucket}/model")
    corpus, model, index, run = (f"{s3_bucket}/corpus/*.tar", f"{s3_bucket}/model", f"{s3_bucket}/index", f"{s3_bucket}/run")

    s3 = s3_server.env()
    head_machine, b_machine, driver = (Machine(tmp_path, name, s3) for name in ("head", "b", "driver"))
    cwd = tmp_path / "cwd"  # the drivers' working directory: empty, and it must stay so
    cwd.mkdir()
    # what must not change: the working directory, every HOME (but its .cache/), the local model and corpus
    untouched = [cwd, head_machine.home, b_machine.home, driver.home, memorizer_model, os.path.dirname(tars[0])]
    snapshot = {str(d): files_under(d) for d in untouched}
    top = sorted(os.listdir(tmp_path))

    driver_env = driver.env(**{LEASE_TTL_ENV: "6"})
    with RayHead(num_cpus=2, resources='{"head_node": 1}', env=head_machine.env()) as head:
        head.add_node(num_cpus=2, resources='{"node_b": 1}', env=b_machine.env(), own_temp_dir=True)
        address = head.gcs_address
        temp_dirs = [head.temp_dir, *head.node_temp_dirs]
        assert len(set(temp_dirs)) == 2

        code, err = run_job("build_index", ["--corpus", corpus, "--out", index, "--resolution", "8", "--batch-size", "200",
                                            "--address", address], driver_env, cwd, timeout=600)
        assert code == 0, err
        manifest = storage.read_json(f"{index}/manifest.json")
        assert manifest["count"] + manifest["rejects"] == sum(images_in(t) for t in tars)

        argv = ["--model", model, "--index", index, "--out", run, "--num-images", str(NUM_IMAGES), "--unit-size", str(UNIT_SIZE),
                "--batch-size", "4", "--steps", "60", "--seed", "11", "--workers", "2", "--max-unit-attempts", "5",
                # a digits model against a CIFAR index draws "off-manifold" samples: flag them rather
                # than resample and drop, so that every requested sample is written
                "--on-breach", "flag", "--address", address]
        proc = subprocess.Popen([sys.executable, "-m", "spellshield.jobs.generate", *argv], cwd=cwd, env=driver_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            # a generation worker killed -9 in the middle of a unit (found by Ray's state API)
            victim = wait_for(lambda: running_unit_worker(head), "a unit in progress")
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: not alive(victim), "the killed worker to die")
            # the driver killed -9 once the pool went on after the lost worker, with units left
            wait_for(lambda: len(committed_units(run)) >= 2 or proc.poll() is not None, "two committed units")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
        before = len(committed_units(run))
        assert 1 <= before < UNITS and storage.exists(f"{run}/{LEASE}")

        # --resume from the same empty working directory: refused while the dead driver's lease
        # is live (one line), taken over once it expired
        code, err = run_job("generate", ["--resume", run, "--address", address], driver_env, cwd, timeout=600)
        if code == 2:
            assert "held by another driver" in err and len(err.strip().splitlines()) == 1, err
            time.sleep(6)
            code, err = run_job("generate", ["--resume", run, "--address", address], driver_env, cwd, timeout=600)
        assert code == 0, err

        status = storage.read_json(f"{run}/run.json")
        before_audit = sorted(loc.uri for loc in storage.list_dir(run, recursive=True))

        # audit from S3, on the cluster, its report written back to the run's audit/ prefix
        code, err = run_job("audit", [run, "--index", index, "--address", address], driver_env, cwd, timeout=600)
        assert code == 0, err
        assert f"audit: report: {run}/audit/report.html" in err

        # no credential in any log of either node (Ray's and the workers')
        for temp_dir in temp_dirs:
            for path in glob.glob(os.path.join(temp_dir, "**", "logs", "**", "*"), recursive=True):
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        assert ADMIN[1].encode() not in f.read(), path

    # every requested sample exactly once, read from S3 with pyarrow datasets
    import pyarrow.dataset as ds

    assert status["status"] == "finished" and status["progress"]["resumed_units_skipped"] >= before
    assert sorted(committed_units(run)) == [f"unit-{i:05d}" for i in range(UNITS)]
    assert storage.list_dir(f"{run}/{ATTEMPTS}", recursive=True) == [] and not storage.exists(f"{run}/{LEASE}")
    location = storage.resolve(f"{run}/audit/samples")
    samples = ds.dataset(location.path, filesystem=location.fs, format="parquet").to_table().to_pandas()
    expected = [f"s{i:06d}" for i in range(NUM_IMAGES)]
    assert sorted(samples["sample"]) == expected and samples["image"].notna().all()  # one row, one image each
    keys = []
    with tempfile.TemporaryDirectory(dir=driver.tmp) as local:
        for unit in range(UNITS):
            storage.get_file(f"{run}/images/unit-{unit:05d}.tar", os.path.join(local, f"{unit}.tar"))
            keys += list(tar_images(os.path.join(local, f"{unit}.tar")))
    assert sorted(keys) == expected

    summary = storage.read_json(f"{run}/audit/summary.json")
    assert summary["num_images"] == NUM_IMAGES and summary["report"] == f"{run}/audit/report.html"
    assert summary["audit"]["index_manifest_sha256"] == hashlib.sha256(storage.read_bytes(f"{index}/manifest.json")).hexdigest()
    after_audit = sorted(loc.uri for loc in storage.list_dir(run, recursive=True))
    assert set(before_audit) <= set(after_audit)  # the audit only adds its report
    assert {u for u in set(after_audit) - set(before_audit)} >= {f"{run}/audit/summary.json", f"{run}/audit/report.html"}
    assert all(u.startswith(f"{run}/audit/") for u in set(after_audit) - set(before_audit))

    # each node's workers filled their own cache: the model and the index, once per node
    for machine in (head_machine, b_machine):
        assert len(os.listdir(machine.cache / "models")) == 1, machine.name
        assert len(os.listdir(machine.cache / "indexes")) == 1, machine.name
        index_files = files_under(machine.cache / "indexes")
        assert any(name.endswith(".faiss") for name in index_files), (machine.name, index_files)

    # nothing written on local disk outside the caches and temporary directories
    assert os.listdir(cwd) == []
    # (a HOME's .cache/ is the user's cache directory: the audit's matplotlib keeps its font list there)
    assert {d: {f: n for f, n in files_under(d).items() if not f.startswith(".cache/")} for d in snapshot} == snapshot
    assert sorted(os.listdir(tmp_path)) == top

    # no credential in what the run wrote
    for uri in (f"{run}/run.json", f"{index}/manifest.json", f"{run}/audit/summary.json", f"{run}/audit/report.html"):
        text = storage.read_bytes(uri).decode()
        assert ADMIN[0] not in text and ADMIN[1] not in text, uri


def test_credentials_reach_the_workers_of_an_existing_cluster_through_the_job(s3_server, s3_env, s3_bucket, memorizer_model,
                                                                             tmp_path):
    """A cluster whose nodes have no storage credentials: a job without them is refused in one
    line (nothing written); with them in the job's runtime environment (``env_vars``) the
    driver and every worker have them, and no secret reaches run.json or the job's output.
    The trade-off docs/storage.md states: Ray keeps the runtime environment, secrets included,
    in its job table, readable by whoever can read the dashboard."""
    from tests.conftest import ROOT

    storage.put_tree(memorizer_model, f"{s3_bucket}/model")
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    bare.pop("RAY_ADDRESS", None)
    run = f"{s3_bucket}/run"
    generate = ["python", "-m", "spellshield.jobs.generate", "--model", f"{s3_bucket}/model", "--out", run, "--num-images", "4",
                "--unit-size", "4", "--batch-size", "4", "--steps", "10", "--workers", "1"]
    with RayHead(num_cpus=2, env=bare) as head:
        refused = head.submit(generate, cwd=ROOT, env=bare)
        assert refused.returncode != 0
        # the job's one error line (ray job submit echoes the job's output, so it may appear twice)
        lines = {line for line in (refused.stdout + refused.stderr).splitlines() if "spellshield generate: error:" in line}
        assert len(lines) == 1 and f"{s3_bucket}/model" in lines.pop(), (refused.stdout + refused.stderr)[-3000:]
        assert storage.list_dir(run, recursive=True) == []  # nothing written

        secrets = {**s3_server.env(), CACHE_ENV: str(tmp_path / "job-cache")}
        done = head.submit(generate, cwd=ROOT, env=bare, runtime_env={"env_vars": secrets})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", done.stdout + done.stderr).group(0)
        logs = head.job_logs(job_id)
        with urllib.request.urlopen(f"{head.address}/api/jobs/{job_id}", timeout=5) as r:
            job = json.load(r)
    assert storage.read_json(f"{run}/run.json")["status"] == "finished"
    for text in (storage.read_bytes(f"{run}/run.json").decode(), logs, done.stdout, done.stderr, refused.stdout, refused.stderr):
        assert ADMIN[1] not in text and ADMIN[0] not in text
    assert job["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == ADMIN[1]  # the trade-off: the job table has it
