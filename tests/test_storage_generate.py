"""generate with its model, index and prompts on a real S3 server (SeaweedFS): each process
loads them from its node's cache, the run is the one a local-path run writes, credentials
appear nowhere in run.json; a run directory on S3 is refused (not yet supported) instead of
a local directory named "s3:"."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from spellshield import storage
from spellshield.indexing.encoders import Encoder
from spellshield.indexing.search import open_index
from spellshield.jobs.cli import main
from spellshield.storage.cache import CACHE_ENV, fetch_tree
from spellshield.pipeline.prompts import PromptsError, read_prompts
from tests.conftest import bucket_on
from tests.s3server import ADMIN, run_job
from tests.test_generate import gen_config, tar_images

GEN = ["--num-images", "8", "--batch-size", "4", "--unit-size", "4", "--steps", "20", "--seed", "100", "--workers", "1",
       "--overcompensation", "1.6", "--correction-iterations", "1"]  # tests.test_generate.gen_config's settings


def test_model_directory_cache(s3_env, s3_bucket, memorizer_model, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    storage.put_tree(memorizer_model, f"{s3_bucket}/model")
    cold = fetch_tree(f"{s3_bucket}/model", "models")
    expected = sorted(os.path.relpath(os.path.join(d, n), memorizer_model) for d, _, names in os.walk(memorizer_model) for n in names)
    assert sorted(cold.downloaded) == expected
    assert fetch_tree(f"{s3_bucket}/model", "models").downloaded == []  # warm: nothing downloaded
    for name in expected:
        with open(os.path.join(memorizer_model, name), "rb") as a, open(os.path.join(cold.directory, name), "rb") as b:
            assert a.read() == b.read()


def test_prompts_from_s3(s3_env, s3_bucket):
    storage.write_bytes(f"{s3_bucket}/prompts.jsonl", b'"a cat"\n{"prompt": "a dog", "num_images": 3}\n')
    assert [(r.prompt, r.num_images) for r in read_prompts(f"{s3_bucket}/prompts.jsonl")] == [("a cat", 1), ("a dog", 3)]
    with pytest.raises(PromptsError, match=f"cannot read prompts file: {s3_bucket}/nope.jsonl does not exist"):
        read_prompts(f"{s3_bucket}/nope.jsonl")


def run_generate(argv, env, cwd):
    return run_job("generate", argv, env, cwd)


def machine_env(server, tmp_path, name):
    """A driver with its own working directory and cache, holding none of the data, pointed at
    the test ``server`` (S3 or GCS)."""
    home = tmp_path / name
    home.mkdir()
    env = {**os.environ, **server.env(), CACHE_ENV: str(tmp_path / f"{name}-cache"), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return home, env


@pytest.mark.slow
def test_generate_out_on_s3(ray_session, s3_server, s3_env, s3_bucket, memorizer_model, tmp_path):
    from spellshield.jobs.generate import generate, validate
    from spellshield.storage.commit import ATTEMPTS, LEASE, committed_units

    local_run = tmp_path / "local-run"
    generate(validate(gen_config(memorizer_model, local_run, num_images=8, unit_size=4, workers=1)))
    home, env = machine_env(s3_server, tmp_path, "driver")
    run = f"{s3_bucket}/run"
    code, err = run_generate(["--model", memorizer_model, "--out", run, *GEN], env, home)
    assert code == 0, err
    assert os.listdir(home) == []
    assert sorted(committed_units(run)) == ["unit-00000", "unit-00001"]
    assert storage.list_dir(f"{run}/{ATTEMPTS}", recursive=True) == [] and not storage.exists(f"{run}/{LEASE}")
    assert storage.read_json(f"{run}/run.json")["status"] == "finished"
    # the audit logs read straight from S3 by pyarrow datasets: one row per requested sample
    import pyarrow.dataset as ds

    location = storage.resolve(f"{run}/audit/samples")
    table = ds.dataset(location.path, filesystem=location.fs, format="parquet").to_table()
    assert sorted(table.column("sample").to_pylist()) == [f"s{i:06d}" for i in range(8)]
    for unit in ("unit-00000", "unit-00001"):  # unshielded: the same bits as the local run
        storage.get_file(f"{run}/images/{unit}.tar", str(tmp_path / f"{unit}.tar"))
        mine, theirs = tar_images(str(tmp_path / f"{unit}.tar")), tar_images(str(local_run / "images" / f"{unit}.tar"))
        assert mine.keys() == theirs.keys() and all((mine[k] == theirs[k]).all() for k in mine)
    code, err = run_generate(["--model", memorizer_model, "--out", run, *GEN], env, home)
    assert code == 2 and err.strip() == f"spellshield generate: error: {run} already holds a finished run; choose another --out"
    code, err = run_generate(["--resume", run], env, home)
    assert code == 0 and "already finished and every unit is whole on disk; nothing to do" in err


@pytest.mark.slow
def test_generate_with_model_and_index_on_s3(ray_session, s3_server, s3_env, s3_bucket, memorizer_model, protected_index,
                                             tmp_path):
    from spellshield.jobs.generate import generate, validate

    storage.put_tree(memorizer_model, f"{s3_bucket}/model")
    storage.put_tree(protected_index, f"{s3_bucket}/index", last="manifest.json")
    local_run = tmp_path / "local-run"
    generate(validate(gen_config(memorizer_model, local_run, protected_index, num_images=8, unit_size=4, workers=1)))

    home, env = machine_env(s3_server, tmp_path, "node")
    s3_run = tmp_path / "s3-run"
    argv = ["--model", f"{s3_bucket}/model", "--index", f"{s3_bucket}/index", "--out", str(s3_run), *GEN]
    code, err = run_generate(argv, env, home)
    assert code == 0, err
    assert os.listdir(home) == []  # nothing written in the driver's working directory

    def samples(run):
        frame = pd.concat(pd.read_parquet(p) for p in sorted(glob.glob(f"{run}/audit/samples/*.parquet")))
        return frame.sort_values("sample").reset_index(drop=True)

    mine, theirs = samples(s3_run), samples(local_run)
    same = ["unit", "sample", "prompt_index", "seed", "radius", "steps"]
    pd.testing.assert_frame_equal(mine[same], theirs[same])
    images = {}
    for unit in sorted(glob.glob(f"{s3_run}/images/*.tar")):
        images.update(tar_images(unit))
    local_images = {}
    for unit in sorted(glob.glob(f"{local_run}/images/*.tar")):
        local_images.update(tar_images(unit))
    # Unshielded samples are the same bits as the local run's (noise depends only on the seed);
    # where the shield acted, a few ulps of thread scheduling may take another path, so there
    # the S3 run's rows are checked against brute force on the local index instead.
    quiet = (mine["active_steps"] == 0) & (theirs["active_steps"] == 0)
    assert quiet.sum() >= 4
    for key in mine["sample"][quiet]:
        assert (images[key] == local_images[key]).all()
    written = mine[mine["image"].notna()]  # the written attempt of each sample (resampled ones have no image)
    assert sorted(written["sample"]) == sorted(images)
    latents = Encoder("pixels").encode(np.stack([images[k] for k in written["sample"]])).reshape(len(written), -1).numpy()
    found = open_index(protected_index).knn(latents, 1)
    assert [int(ids[0]) for ids, _ in found] == written["nearest_id"].tolist()
    np.testing.assert_allclose([float(d[0]) for _, d in found], written["nearest_distance"], rtol=1e-5)
    run = json.load(open(s3_run / "run.json"))
    assert run["config"]["model"] == f"{s3_bucket}/model" and run["config"]["shield"]["index"] == f"{s3_bucket}/index"
    text = open(s3_run / "run.json").read()
    assert ADMIN[0] not in text and ADMIN[1] not in text
    assert len(os.listdir(tmp_path / "node-cache" / "indexes")) == 1 and len(os.listdir(tmp_path / "node-cache" / "models")) == 1


def test_encoder_on_s3(s3_env, s3_bucket, tmp_path, monkeypatch):
    """--encoder s3://...: the autoencoder is loaded from this node's cache, with the fingerprint
    of the same weights on local disk (what generate checks an index against)."""
    from tests.test_vae_encoder import save_tiny_vae

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    local = save_tiny_vae(str(tmp_path / "vae"), seed=3)
    storage.put_tree(local, f"{s3_bucket}/vae")
    remote_spec, local_spec = Encoder(f"{s3_bucket}/vae").latent_spec(16), Encoder(local).latent_spec(16)
    assert remote_spec.fingerprint == local_spec.fingerprint and remote_spec.shape == local_spec.shape
    assert remote_spec.encoder == f"{s3_bucket}/vae"
    images = np.random.default_rng(0).integers(0, 255, size=(2, 16, 16, 3), dtype=np.uint8)
    assert (Encoder(f"{s3_bucket}/vae").encode(images) == Encoder(local).encode(images)).all()


@pytest.mark.slow
# gs is heavy (the CI budget): CI covers the same path on s3, and gs's conditional writes in test_storage_commit
@pytest.mark.parametrize("store", ["s3", pytest.param("gs", marks=pytest.mark.heavy)])
def test_driver_killed_then_resumed(store, request, memorizer_model, tmp_path):
    """A driver killed -9 mid-run on an S3 or GCS --out: while its lease is live a resume is
    refused; once it expired, --resume from another working directory takes the lease over (a
    compare-and-swap on its ETag / generation) and finishes the run, every sample exactly once,
    no attempt left over."""
    import time

    from spellshield.storage.commit import ATTEMPTS, LEASE, LEASE_TTL_ENV, committed_units

    run = f"{bucket_on(request, store)}/run"
    server = request.getfixturevalue({"s3": "s3_server", "gs": "gcs_server"}[store])
    argv = ["--model", memorizer_model, "--out", run, "--num-images", "16", "--batch-size", "4", "--unit-size", "4",
            "--steps", "60", "--seed", "5", "--workers", "1"]
    home, env = machine_env(server, tmp_path, "first")
    env[LEASE_TTL_ENV] = "6"
    proc = subprocess.Popen([sys.executable, "-m", "spellshield.jobs.generate", *argv], cwd=home, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not committed_units(run) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, by group id
        proc.wait()
    before = len(committed_units(run))
    assert 1 <= before < 4 and storage.exists(f"{run}/{LEASE}")
    second, env2 = machine_env(server, tmp_path, "second")
    env2[LEASE_TTL_ENV] = "6"
    code, err = run_generate(["--resume", run], env2, second)
    if code == 2:  # the killed driver's lease was still live: refused, one line, nothing written
        assert "held by another driver" in err and len(err.strip().splitlines()) == 1, err
        time.sleep(6)
        code, err = run_generate(["--resume", run], env2, second)
    assert code == 0, err
    assert sorted(committed_units(run)) == [f"unit-{i:05d}" for i in range(4)]
    assert storage.list_dir(f"{run}/{ATTEMPTS}", recursive=True) == [] and not storage.exists(f"{run}/{LEASE}")
    status = storage.read_json(f"{run}/run.json")
    assert status["status"] == "finished" and status["progress"]["resumed_units_skipped"] >= before
    import pyarrow.dataset as ds

    location = storage.resolve(f"{run}/audit/samples")
    samples = ds.dataset(location.path, filesystem=location.fs, format="parquet").to_table().to_pandas()
    written = samples[samples["image"].notna()]
    assert sorted(written["sample"]) == [f"s{i:06d}" for i in range(16)]  # every sample exactly once
    keys = []
    for unit in range(4):
        local = str(tmp_path / f"unit-{unit}.tar")
        storage.get_file(f"{run}/images/unit-{unit:05d}.tar", local)
        keys += list(tar_images(local))
    assert sorted(keys) == [f"s{i:06d}" for i in range(16)]
    assert os.listdir(home) == [] and os.listdir(second) == []


@pytest.mark.parametrize("problem", ["unreachable", "credentials", "bucket"])
def test_bad_storage_input_is_refused_before_ray(problem, capsys, s3_env, s3_bucket, memorizer_model, protected_index,
                                                 tmp_path, monkeypatch):
    """--model, --index and --out on S3 that cannot be used: one line, exit 2, nothing written."""
    from tests.s3server import free_ports

    storage.put_tree(memorizer_model, f"{s3_bucket}/model")
    storage.put_tree(protected_index, f"{s3_bucket}/index", last="manifest.json")
    before = sorted(loc.uri for loc in storage.list_dir(s3_bucket, recursive=True))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    expected = {"unreachable": "cannot reach the object store", "credentials": "refused the credentials",
                "bucket": "bucket no-such-bucket-9 does not exist"}[problem]
    cases = [["--model", f"{s3_bucket}/model", "--out", f"{s3_bucket}/run"],
             ["--model", memorizer_model, "--index", f"{s3_bucket}/index", "--out", str(tmp_path / "run")],
             ["--model", memorizer_model, "--out", f"{s3_bucket}/run"]]
    if problem == "bucket":
        cases = [["--model", "s3://no-such-bucket-9/model", "--out", str(tmp_path / "run")],
                 ["--model", memorizer_model, "--index", "s3://no-such-bucket-9/index", "--out", str(tmp_path / "run")],
                 ["--model", memorizer_model, "--out", "s3://no-such-bucket-9/run"]]
    elif problem == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "WRONG-SECRET-VALUE")
    for argv in cases:
        code = main(["generate", *argv, *GEN])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], (argv, err)
        assert "WRONG-SECRET-VALUE" not in err[0]
    for name, value in s3_env.env().items():  # back to the working identity to look
        monkeypatch.setenv(name, value)
    assert os.listdir(tmp_path) in (["cache"], [])
    assert sorted(loc.uri for loc in storage.list_dir(s3_bucket, recursive=True)) == before


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_resume_refused_while_a_driver_holds_the_run(store, capsys, request):
    from spellshield.storage.commit import LEASE, acquire_lease

    run = f"{bucket_on(request, store)}/run"
    lease = acquire_lease(f"{run}/{LEASE}", ttl_s=60)
    code = main(["generate", "--resume", run])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"spellshield generate: error: {run}/{LEASE} is held by another driver (host ")
    lease.release()
    assert main(["generate", "--resume", run]) == 2  # free now: the next problem is that there is no run
    assert capsys.readouterr().err.strip() == f"spellshield generate: error: {run} holds no run to resume (no run.json)"
