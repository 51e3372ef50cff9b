"""memorizer, index calibrate (with --holdout) and index verify with every path on a real S3 server
(SeaweedFS): the same model and the same calibration as on local disk, nothing in the working
directory."""

from __future__ import annotations

import os
import shutil

import pytest

from spellshield import storage
from spellshield.jobs.cli import main
from spellshield.storage.cache import CACHE_ENV
from tests.s3server import run_job
from tests.test_storage_generate import machine_env


def put_corpus(digits_corpus, bucket) -> str:
    """The digits shards under ``bucket/corpus/``; their brace pattern."""
    for path in digits_corpus:
        storage.put_file(path, f"{bucket}/corpus/{os.path.basename(path)}")
    return f"{bucket}/corpus/digits-{{000000..{len(digits_corpus) - 1:06d}}}.tar"


@pytest.mark.slow
def test_memorizer_on_s3(s3_server, s3_env, s3_bucket, digits_corpus, memorizer_model, tmp_path):
    corpus = put_corpus(digits_corpus, s3_bucket)
    home, env = machine_env(s3_server, tmp_path, "driver")
    code, err = run_job("memorizer", ["--corpus", corpus, "--out", f"{s3_bucket}/model", "--resolution", "8",
                                      "--batch-size", "256"], env, home)
    assert code == 0, err
    assert os.listdir(home) == []
    local = sorted(os.path.relpath(os.path.join(d, n), memorizer_model) for d, _, names in os.walk(memorizer_model) for n in names)
    base = f"{s3_bucket}/model/"
    assert sorted(loc.uri[len(base):] for loc in storage.list_dir(f"{s3_bucket}/model", recursive=True)) == local
    for name in local:  # the same latents in the same order: the same weights (rejects name shards by basename)
        if name.endswith((".safetensors", ".json")):
            with open(os.path.join(memorizer_model, name), "rb") as f:
                assert storage.read_bytes(f"{base}{name}") == f.read(), name
    code, err = run_job("memorizer", ["--corpus", corpus, "--out", f"{s3_bucket}/model", "--resolution", "8"], env, home)
    assert code == 2 and err.strip() == f"spellshield memorizer: error: {s3_bucket}/model already holds a finished model; choose another --out"


def test_calibrate_and_verify_on_s3(capsys, s3_env, s3_bucket, digits_corpus, protected_index, tmp_path, monkeypatch):
    """index calibrate s3://... --holdout s3://...: the manifest on S3 gets the calibration the
    same command writes locally; index verify s3://... then reproduces it."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    put_corpus(digits_corpus, s3_bucket)
    storage.put_tree(protected_index, f"{s3_bucket}/index", last="manifest.json")
    local = str(tmp_path / "local-index")
    shutil.copytree(protected_index, local)
    options = ["--holdout-size", "40", "--sample-size", "200", "--seed", "3"]
    assert main(["index", "calibrate", local, "--holdout", digits_corpus[7], *options]) == 0
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    holdout = f"{s3_bucket}/corpus/{os.path.basename(digits_corpus[7])}"
    assert main(["index", "calibrate", f"{s3_bucket}/index", "--holdout", holdout, *options]) == 0
    remote = storage.read_json(f"{s3_bucket}/index/manifest.json")["calibration"]
    expected = storage.read_json(os.path.join(local, "manifest.json"))["calibration"]
    assert remote["holdout"].pop("corpus") == holdout and expected["holdout"].pop("corpus") == digits_corpus[7]
    assert remote == expected and remote["holdout"]["sample_size"] == 40
    capsys.readouterr()
    assert main(["index", "verify", f"{s3_bucket}/index"]) == 0
    assert "calibration reproduced" in capsys.readouterr().err
    assert os.listdir(work) == []


def tree(directory) -> dict:
    """{relative path: bytes} of every file under ``directory`` (the cache's lock file aside)."""
    found = {}
    for d, _, names in os.walk(directory):
        for name in names:
            if name != ".lock":
                with open(os.path.join(d, name), "rb") as f:
                    found[os.path.relpath(os.path.join(d, name), directory)] = f.read()
    return found


def test_calibrate_on_s3_leaves_the_cache_entry_of_the_old_manifest_as_it_was(s3_env, s3_bucket, protected_index,
                                                                              tmp_path, monkeypatch):
    """A cache entry holds the index version its key (the manifest's sha256) names: calibrating an
    index on S3 writes its new judges file elsewhere, and the new manifest gets its own entry."""
    from spellshield.indexing.index_cache import fetch_index, local_index_dir
    from spellshield.indexing.manifest import manifest_hash

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    index = f"{s3_bucket}/index"
    storage.put_tree(protected_index, index, last="manifest.json")
    old = local_index_dir(index)
    assert os.path.basename(old) == manifest_hash(index)
    before = tree(old)
    assert main(["index", "calibrate", index, "--sample-size", "200", "--seed", "5"]) == 0  # another seed: new judges
    judges = storage.read_json(f"{index}/manifest.json")["calibration"]["judges"]
    assert f"{judges['file']}" not in before
    assert tree(old) == before  # the old version's entry: not a file more, not a byte changed
    new = fetch_index(index)
    assert os.path.basename(new.directory) == manifest_hash(index) != os.path.basename(old)
    assert judges["file"] in new.downloaded  # entered the new entry checked against the new manifest's sha256
    assert storage.file_sha256(os.path.join(new.directory, judges["file"])) == judges["sha256"]


@pytest.mark.parametrize("problem", ["bucket", "unreachable", "credentials"])
def test_bad_gs_input_is_refused_before_anything(problem, capsys, gcs_env, gcs_bucket, digits_corpus, memorizer_model, tmp_path,
                                                 monkeypatch):
    """gs:// runs and builds are supported (tests/test_storage_gs.py); a gs:// path that cannot be
    used is one line naming the problem, exit 2, before Ray starts, nothing written: a missing
    bucket, an unreachable STORAGE_EMULATOR_HOST, no Google credentials at all."""
    from tests.s3server import free_ports
    from tests.test_storage_generate import GEN

    storage.write_json(f"{gcs_bucket}/run/run.json", {"status": "finished", "config": {}})
    before = [loc.uri for loc in storage.list_dir(gcs_bucket, recursive=True)]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    bucket = gcs_bucket
    cases = [["generate", "--model", memorizer_model, "--out", f"{bucket}/new-run", *GEN]]
    if problem == "bucket":
        bucket, expected = "gs://no-such-bucket-9", "bucket no-such-bucket-9 does not exist"
        cases = [["generate", "--model", memorizer_model, "--out", f"{bucket}/run", *GEN], ["generate", "--resume", f"{bucket}/run"],
                 ["build-index", "--corpus", f"{bucket}/corpus/digits-*.tar", "--out", str(work / "index")],
                 ["build-index", "--corpus", digits_corpus[0], "--out", f"{bucket}/index"], ["audit", f"{bucket}/run"]]
    elif problem == "unreachable":
        endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        expected = (f"cannot reach the object store at {endpoint} to write {bucket}/new-run; "
                    f"is it running, and is STORAGE_EMULATOR_HOST right?")
    else:  # no emulator and no credentials: the run's create-only writes cannot be made, said before the store is contacted
        monkeypatch.delenv("STORAGE_EMULATOR_HOST")
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
        expected = "no Google credentials for gs://: set GOOGLE_APPLICATION_CREDENTIALS"
    for argv in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], (argv, err)
        assert err[0].startswith(f"spellshield {argv[0]}: error: ")
    monkeypatch.undo()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_env.endpoint)
    assert [loc.uri for loc in storage.list_dir(gcs_bucket, recursive=True)] == before
    assert os.listdir(work) == []


# heavy: the CI budget (30 min on 2 cores); the same path is covered in CI by test_build_generate_audit_on_gs and the s3 build, generate and audit tests; run with -m heavy
@pytest.mark.heavy
def test_demo_on_s3(s3_server, s3_env, s3_bucket, tmp_path):
    """demo --out s3://...: corpus, index, model, both runs, their reports and summary.json on
    the store; nothing in the working directory."""
    home, env = machine_env(s3_server, tmp_path, "driver")
    out = f"{s3_bucket}/demo"
    code, err = run_job("demo", ["--out", out, "--num-images", "8", "--steps", "10"], env, home, timeout=900)
    assert code == 0, err
    assert os.listdir(home) == []
    summary = storage.read_json(f"{out}/summary.json")
    assert summary["reports"] == {name: f"{out}/run-{name}/audit/report.html" for name in ("unshielded", "shielded")}
    assert summary["num_images"] == 8 and summary["near_duplicate_rate_shielded"] == 0.0
    for name in ("index/manifest.json", "model/model_index.json", "corpus/digits-000007.tar", "run-shielded/run.json",
                 "run-unshielded/audit/summary.json", "run-shielded/audit/report.html"):
        assert storage.is_file(f"{out}/{name}"), name
    code, err = run_job("demo", ["--out", out], env, home)
    assert code == 2 and err.strip() == f"spellshield demo: error: {out} already holds a finished demo; choose another --out"


def bad_input_cases(bucket, corpus_dir, index) -> list[list[str]]:
    """Every newly URI-capable path of these commands, on the store ``bucket`` (an s3:// URI)."""
    return [["memorizer", "--corpus", f"{bucket}/corpus/digits-*.tar", "--out", "model"],
            ["memorizer", "--corpus", corpus_dir, "--out", f"{bucket}/model"],
            ["index", "calibrate", f"{bucket}/index"],
            ["index", "calibrate", index, "--holdout", f"{bucket}/corpus/digits-000007.tar"],
            ["index", "verify", f"{bucket}/index"],
            ["demo", "--out", f"{bucket}/demo"]]


@pytest.mark.parametrize("problem", ["unreachable", "credentials", "bucket"])
def test_bad_storage_input_of_every_job(problem, capsys, s3_env, s3_bucket, digits_corpus, protected_index, tmp_path,
                                        monkeypatch):
    """One line naming the problem, exit 2, before Ray starts, nothing written on the store or
    in the working directory (the index calibrated locally keeps its manifest)."""
    from tests.s3server import free_ports

    put_corpus(digits_corpus, s3_bucket)
    storage.put_tree(protected_index, f"{s3_bucket}/index", last="manifest.json")
    before = sorted(loc.uri for loc in storage.list_dir(s3_bucket, recursive=True))
    with open(os.path.join(protected_index, "manifest.json"), "rb") as f:
        manifest = f.read()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    bucket, expected = s3_bucket, {"unreachable": "cannot reach the object store", "credentials": "refused the credentials",
                                   "bucket": "bucket no-such-bucket-9 does not exist"}[problem]
    if problem == "bucket":
        bucket = "s3://no-such-bucket-9"
    elif problem == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "WRONG-SECRET-VALUE")
    for argv in bad_input_cases(bucket, os.path.dirname(digits_corpus[0]), protected_index):
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], (argv, err)
        assert err[0].startswith(f"spellshield {argv[0]}: error: ") and "WRONG-SECRET-VALUE" not in err[0]
    for name, value in s3_env.env().items():  # back to the working identity to look
        monkeypatch.setenv(name, value)
    assert sorted(loc.uri for loc in storage.list_dir(s3_bucket, recursive=True)) == before
    assert os.listdir(work) == []
    with open(os.path.join(protected_index, "manifest.json"), "rb") as f:
        assert f.read() == manifest


def test_existing_results_and_missing_prefixes_on_s3(capsys, s3_env, s3_bucket, tmp_path, monkeypatch):
    """An --out on S3 that already holds a model or a demo, an index or corpus prefix with
    nothing there: one line each, exit 2, nothing written."""
    storage.write_bytes(f"{s3_bucket}/model/model_index.json", b"{}")
    storage.write_bytes(f"{s3_bucket}/demo/summary.json", b"{}")
    before = sorted(loc.uri for loc in storage.list_dir(s3_bucket, recursive=True))
    monkeypatch.chdir(tmp_path)
    cases = {
        ("memorizer", "--corpus", f"{s3_bucket}/none-*.tar", "--out", "m"): f"corpus pattern {s3_bucket}/none-*.tar matches no file",
        ("memorizer", "--corpus", f"{s3_bucket}/model/model_index.json", "--out", f"{s3_bucket}/model"):
            f"{s3_bucket}/model already holds a finished model; choose another --out",
        ("demo", "--out", f"{s3_bucket}/demo"): f"{s3_bucket}/demo already holds a finished demo; choose another --out",
        ("index", "calibrate", f"{s3_bucket}/nothing"): f"{s3_bucket}/nothing is not a finished index: no manifest.json",
        ("index", "verify", f"{s3_bucket}/nothing"): f"{s3_bucket}/nothing is not a finished index: no manifest.json",
        ("project-index", f"{s3_bucket}/nothing"): f"{s3_bucket}/nothing is not a finished index: no manifest.json",
    }
    for argv, expected in cases.items():
        code = main(list(argv))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], (argv, err)
    assert sorted(loc.uri for loc in storage.list_dir(s3_bucket, recursive=True)) == before
    assert os.listdir(tmp_path) == []


def test_project_index_on_s3(capsys, s3_env, s3_bucket, protected_index, tmp_path, monkeypatch):
    """project-index s3://... --lists: the projection and inverted file are uploaded beside the
    index; the ivf and projected backends opened on the URI fetch them into the node's cache and
    find what exact search on the local index finds."""
    from spellshield.indexing.search import open_index

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    index = f"{s3_bucket}/index"
    storage.put_tree(protected_index, index, last="manifest.json")
    assert main(["project-index", index, "--dims", "16", "--lists", "0"]) == 0
    uploaded = [loc.uri[len(index) + 1:] for loc in storage.list_dir(f"{index}/projection-16", recursive=True)]
    assert "projection-16/projection.json" in uploaded and any(n.endswith("/ivf.json") for n in uploaded)
    assert not os.path.exists(os.path.join(protected_index, "projection-16"))  # the local index is untouched
    exact = open_index(protected_index)
    queries = exact.vectors(list(range(0, 900, 45))).reshape(20, -1) + 0.01
    expected = [list(ids) for ids, _ in exact.knn(queries, 3)]
    for backend in ("ivf", "projected"):
        shield = open_index(index, backend=backend, dims=16)
        assert [list(ids) for ids, _ in shield.knn(queries, 3)] == expected, backend
    capsys.readouterr()
    assert main(["project-index", index, "--dims", "16", "--lists", "0"]) == 2  # as on local disk: --overwrite to rebuild
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"spellshield project-index: error: {index}/projection-16/ivf-64 exists already (pass overwrite=True to rebuild it)")
    assert sorted(loc.uri[len(index) + 1:] for loc in storage.list_dir(f"{index}/projection-16", recursive=True)) == sorted(uploaded)
    assert sorted(os.listdir(tmp_path)) == ["cache"]
