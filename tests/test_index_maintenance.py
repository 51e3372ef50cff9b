"""`spellshield index verify` finds each kind of damage and names it; `index calibrate` writes the
1-NN quantiles of the corpus and of a held-out sample, equal to brute force, into the manifest."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spellshield.indexing.corpus import decode_image, iter_shard
from spellshield.indexing.manifest import file_sha256, read_manifest
from spellshield.indexing.search import open_index
from spellshield.jobs.build_index import build_index
from spellshield.jobs.cli import main
from spellshield.jobs.dataflow import EncodeOptions


@pytest.fixture(scope="module")
def index(ray_session, digits_corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("maint") / "index")
    build_index(",".join(digits_corpus[:3]), out, EncodeOptions(resolution=8, batch_size=128), shard_size=300)
    return out


@pytest.fixture
def copy(index, tmp_path):
    target = str(tmp_path / "copy")
    shutil.copytree(index, target)
    return target


def verify(capsys, path):
    code = main(["index", "verify", path])
    return code, capsys.readouterr().err.strip().splitlines()


def edit_manifest(path, change):
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    change(manifest)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def test_a_sound_index_verifies(index, capsys):
    code, err = verify(capsys, index)
    sha = file_sha256(os.path.join(index, "manifest.json"))
    assert code == 0 and err == [f"index verify: {index} is consistent: 675 vectors (float32) in 3 shard(s), 0 rejects, "
                                 f"calibration reproduced, 3 corpus tar(s) unchanged; manifest sha256 {sha} "
                                 f"(pin it with generate --index-sha256)"]


@pytest.mark.parametrize("edit, message", [
    # the attack of issue 13: a shield quietly disabled by a tiny radius in an otherwise sound index
    (lambda c: c.update(suggested_radius=1e-6), "manifest suggested_radius 1e-06 is not what its calibration gives"),
    # the radius kept consistent with an edited median: the recomputed quantiles catch it
    (lambda c: c.update(suggested_radius=1e-6, nn_distance_quantiles={**c["nn_distance_quantiles"], "0.5": 2e-6}),
     "manifest calibration quantile 0.5 is 2e-06, the index gives"),
    (lambda c: c.pop("seed"), "manifest calibration has no sample_size/seed"),
])
def test_tampered_calibration(copy, capsys, edit, message):
    edit_manifest(copy, lambda m: edit(m["calibration"]))
    code, err = verify(capsys, copy)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_index_no_longer_matching_its_corpus(copy, tmp_path, capsys):
    """A corpus tar changed after the build (same size): verify says the index no longer matches it."""
    manifest = read_manifest(copy)
    sources = manifest.build["sources"]
    assert [s["sha256"] for s in sources] == [file_sha256(s["path"]) for s in sources]
    moved = str(tmp_path / "moved.tar")
    shutil.copyfile(sources[1]["path"], moved)  # the test's own copy of the tar: the shared corpus stays intact
    edit_manifest(copy, lambda m: m["build"]["sources"][1].update(path=moved))
    assert verify(capsys, copy)[0] == 0
    with open(moved, "r+b") as f:
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 0x01]))
    code, err = verify(capsys, copy)
    assert code == 2 and err == [f"spellshield index: error: corpus tar {moved} changed since the index was built "
                                 "(sha256 differs): the index no longer matches its corpus; rebuild it"]
    # without the corpus at its recorded paths (an index moved elsewhere), verify says it did not check it
    os.remove(moved)
    code, err = verify(capsys, copy)
    assert code == 0 and "2 corpus tar(s) unchanged, 1 not at their recorded paths (not checked)" in err[0]


def test_corrupted_shard_bytes(copy, capsys):
    path = os.path.join(copy, "shards", "shard-00001.faiss")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    code, err = verify(capsys, copy)
    path = os.path.join(copy, "shards", "shard-00001.faiss")
    assert code == 2 and err == [f"spellshield index: error: index file {path} does not match its sha256 in the manifest "
                                 "(corrupted or replaced)"]


def test_missing_ids_file(copy, capsys):
    os.remove(os.path.join(copy, "shards", "ids-00002.parquet"))
    code, err = verify(capsys, copy)
    path = os.path.join(copy, "shards", "ids-00002.parquet")
    assert code == 2 and err == [f"spellshield index: error: index file {path} is missing"]


def test_duplicated_id(copy, capsys):
    # a duplicated id with a matching checksum: only the id check can catch it
    path = os.path.join(copy, "shards", "ids-00000.parquet")
    table = pq.read_table(path)
    ids = table.column("id").to_numpy().copy()
    ids[10] = ids[9]
    pq.write_table(table.set_column(0, table.schema.field("id"), pa.array(ids)), path)
    edit_manifest(copy, lambda m: m["shards"][0].update(ids_sha256=file_sha256(path)))
    code, err = verify(capsys, copy)
    assert code == 2 and err == ["spellshield index: error: shards/ids-00000.parquet: id 9 appears 2 times"]


def test_count_mismatch(copy, capsys):
    edit_manifest(copy, lambda m: m.update(count=m["count"] + 1))
    code, err = verify(capsys, copy)
    assert code == 2 and err == ["spellshield index: error: manifest count 676 differs from the shards' total 675"]


def test_shard_count_mismatch(copy, capsys):
    edit_manifest(copy, lambda m: m["shards"][2].update(count=76, last_id=675))
    code, err = verify(capsys, copy)
    assert code == 2 and err == ["spellshield index: error: shards/shard-00002.faiss holds 75 vectors, the manifest says 76"]


def brute_force_nn(queries, base, exclude_self=False):
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - base[None, :, :].astype(np.float64)) ** 2).sum(-1))
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return d.min(1)


def test_calibrate_with_holdout(copy, digits_corpus, capsys):
    before = read_manifest(copy)
    holdout = ",".join(digits_corpus[6:8])
    code = main(["index", "calibrate", copy, "--holdout", holdout, "--holdout-size", "100", "--sample-size", "5000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and "suggested radius" in err[-1]
    after = read_manifest(copy)
    assert after.shards == before.shards and after.count == before.count  # only the calibration changed
    cal = after.calibration
    base = open_index(copy).vectors(range(after.count)).numpy()
    corpus_nn = brute_force_nn(base, base, exclude_self=True)
    images = [decode_image(s.image, 8) for path in digits_corpus[6:8] for s in iter_shard(path)][:100]
    held = np.stack(images).transpose(0, 3, 1, 2).reshape(100, -1).astype(np.float32) / 127.5 - 1.0
    held_nn = brute_force_nn(held, base)
    assert cal["sample_size"] == 675 and cal["holdout"]["sample_size"] == 100
    for q, value in cal["nn_distance_quantiles"].items():
        assert value == pytest.approx(np.quantile(corpus_nn, float(q)), rel=1e-5, abs=1e-5)
    for q, value in cal["holdout"]["nn_distance_quantiles"].items():
        assert value == pytest.approx(np.quantile(held_nn, float(q)), rel=1e-5, abs=1e-5)
    expected = min(0.5 * np.median(corpus_nn), np.quantile(held_nn, 0.01))
    assert cal["suggested_radius"] == pytest.approx(expected, rel=1e-5) and cal["holdout"]["corpus"] == holdout
    assert verify(capsys, copy)[0] == 0  # the rewritten manifest is still consistent


# -- the judges' calibration (issue 14): stored by the build and by `index calibrate`, checked ----
def test_build_index_stores_the_judges_calibration(index):
    from spellshield.indexing.encoders import Encoder
    from spellshield.pipeline import judges
    from spellshield.workers.final_check import corpus_images, prepare_judges

    shield = open_index(index)
    encoder = Encoder(shield.manifest.latent.encoder).init()
    loaded = prepare_judges(shield, encoder)
    assert loaded.source == "stored"
    images = corpus_images(shield, encoder, np.arange(shield.manifest.count))  # all 675: fewer than the sample size
    assert loaded.perceptual == judges.calibrate(images) and loaded.roughness_limit == judges.roughness_limit(images)


def test_tampered_judges_file(copy, capsys):
    name, _ = read_manifest(copy).judges_file
    with open(os.path.join(copy, name), "a") as f:
        f.write(" ")
    code, err = verify(capsys, copy)
    assert code == 2 and len(err) == 1 and f"{name} does not match its sha256 in the manifest" in err[0], err


def test_calibrate_stores_the_judges_of_an_index_without_them(copy, capsys):
    from spellshield.indexing.encoders import Encoder
    from spellshield.indexing.manifest import JUDGES, write_listed_json
    from spellshield.workers.final_check import prepare_judges

    name, _ = read_manifest(copy).judges_file
    os.remove(os.path.join(copy, name))
    edit_manifest(copy, lambda m: m["calibration"].pop("judges"))  # an index built before the judges were stored
    assert verify(capsys, copy)[0] == 0
    encoder = Encoder(read_manifest(copy).latent.encoder).init()
    computed = prepare_judges(open_index(copy), encoder)
    assert computed.source == "computed" and f"spellshield index calibrate {copy}" in capsys.readouterr().err
    code = main(["index", "calibrate", copy])
    err = capsys.readouterr().err.strip().splitlines()
    stored_name, _ = read_manifest(copy).judges_file
    assert code == 0 and err[-1].endswith(f"judges' calibration -> {os.path.join(copy, stored_name)}")
    stored = prepare_judges(open_index(copy), encoder)
    assert stored.source == "stored" and stored == dataclasses.replace(computed, source="stored")
    assert capsys.readouterr().err == ""
    # a stale file listed (other settings): calibrate writes a new one, lists it, removes the old one
    with open(os.path.join(copy, stored_name)) as f:
        payload = json.load(f)
    stale = write_listed_json(copy, JUDGES, {**payload, "settings": {**payload["settings"], "ssim_window": 3}})
    edit_manifest(copy, lambda m: m["calibration"].update(judges=stale))
    assert main(["index", "calibrate", copy]) == 0
    assert read_manifest(copy).judges_file[0] == stored_name and not os.path.exists(os.path.join(copy, stale["file"]))
    assert sorted(f for f in os.listdir(copy) if f.startswith("judges-")) == [stored_name]
    assert verify(capsys, copy)[0] == 0
