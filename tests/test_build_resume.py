"""A build killed part-way (SIGKILL, in a real subprocess) resumes from its checksummed parts and
writes the same index, byte for byte, as an uninterrupted build; float16 storage; the chunking
that makes encoder batches independent of which tars a run encodes."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from spellshield.indexing.corpus import decode_image, iter_shard
from spellshield.indexing.manifest import file_sha256, read_manifest
from spellshield.indexing.parts import PARTS, part_paths
from spellshield.indexing.search import open_index
from spellshield.indexing.store import shard_arrays
from spellshield.jobs.build_index import build_index
from spellshield.jobs.cli import main
from spellshield.jobs.dataflow import EncodeOptions, encoder_pool
from tests.conftest import ROOT
from spellshield.workers.encode import ChunkEncoder, chunk_latents, read_chunks

OPTIONS = dict(resolution=8, batch_size=100)


def index_files(path):
    """Every file of an index directory -> sha256, the manifest without its timing fields."""
    out = {}
    for d, _, files in os.walk(path):
        for name in files:
            full = os.path.join(d, name)
            out[os.path.relpath(full, path)] = file_sha256(full)
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    for key in ("seconds", "resumed_parts", "encode_seconds", "calibrate_seconds"):
        manifest["build"].pop(key)
    out["manifest.json"] = manifest
    return out


@pytest.fixture(scope="module")
def reference(ray_session, digits_corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "index")
    build_index(",".join(digits_corpus[:6]), out, EncodeOptions(**OPTIONS), shard_size=250)
    return out


def cleanup_group(proc):
    """Stop whatever the killed build left in its own process group (its Ray processes), by id."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_after_parts(proc, parts_dir, n, timeout=240.0):
    """SIGKILL the build subprocess (by its own pid, like a lost node or an OOM kill) as soon as
    its staging directory holds ``n`` finished parts (a part's .json marker is written last,
    atomically)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        finished = [f for f in os.listdir(parts_dir) if f.endswith(".json")] if os.path.isdir(parts_dir) else []
        if len(finished) >= n:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.01)
    raise AssertionError(f"the build did not write {n} parts within {timeout} s (returncode {proc.poll()})")


def crash_build(argv, parts_dir, after_parts, log_path):
    """Run build-index in a real subprocess and SIGKILL it once ``after_parts`` parts are finished;
    returns the part files finished at the kill (a further one may have landed first)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "spellshield.jobs.build_index", *argv], cwd=ROOT, env=env,
                                stdout=log, stderr=log, start_new_session=True)
        try:
            kill_after_parts(proc, str(parts_dir), after_parts)
        finally:
            cleanup_group(proc)
    assert proc.returncode == -signal.SIGKILL
    return sorted(n for n in os.listdir(parts_dir) if n.endswith(".json"))


def test_killed_build_resumes_to_the_same_index(ray_session, digits_corpus, reference, tmp_path, capsys):
    out = tmp_path / "index"
    corpus = ",".join(digits_corpus[:6])
    argv = ["--corpus", corpus, "--out", str(out), "--resolution", "8", "--batch-size", "100", "--shard-size", "250"]
    parts_dir = tmp_path / "index.partial" / PARTS
    finished = crash_build(argv, parts_dir, 3, tmp_path / "build.log")
    # killed mid-encode: parts 0-2 finished (a fourth may have finished before the kill landed), not all six
    assert 3 <= len(finished) < 6
    assert {f"part-{i:05d}.json" for i in range(3)} <= set(finished)
    assert not out.exists()

    # a partial build of another config is refused, naming the difference, and left as it was
    code = main(["build-index", *argv, "--dtype", "float16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another config (dtype is 'float16', the partial build's is 'float32')" in err[0]
    assert sorted(n for n in os.listdir(parts_dir) if n.endswith(".json")) == finished

    # corrupt one finished part: its checksum fails, so that tar is encoded again
    latents_path = part_paths(str(parts_dir), 1)[0]
    with open(latents_path, "r+b") as f:
        f.seek(8)
        f.write(b"\x00\x01\x02\x03")
    manifest = build_index(corpus, str(out), EncodeOptions(**OPTIONS), shard_size=250)
    assert manifest["build"]["resumed_parts"] == len(finished) - 1  # all but part 1, which failed its checksum
    assert "resuming" in capsys.readouterr().err
    assert not (tmp_path / "index.partial").exists()
    assert index_files(str(out)) == index_files(reference)


def test_float16_storage(ray_session, digits_corpus, reference, tmp_path):
    out = str(tmp_path / "fp16")
    build_index(",".join(digits_corpus[:2]), out, EncodeOptions(**OPTIONS, dtype="float16"), shard_size=250)
    manifest = read_manifest(out)
    assert manifest.dtype == "float16" and manifest.count == 450
    index = faiss.read_index(os.path.join(out, manifest.shards[0].file))
    inner = faiss.downcast_index(index.index)
    assert isinstance(index, faiss.IndexIDMap2) and isinstance(inner, faiss.IndexScalarQuantizer)
    assert inner.sq.qtype == faiss.ScalarQuantizer.QT_fp16 and inner.metric_type == faiss.METRIC_L2
    ids, vectors = shard_arrays(index, np.float16)
    assert ids.tolist() == list(range(250)) and vectors.dtype == np.float16
    # the stored truth: the float32 latents rounded to float16, exactly, as FAISS reconstructs them
    samples = [s for path in digits_corpus[:2] for s in iter_shard(path) if hasattr(s, "image")]
    pixels = np.stack([decode_image(s.image, 8) for s in samples[:250]])
    expected = (pixels.transpose(0, 3, 1, 2).reshape(250, -1).astype(np.float32) / 127.5 - 1.0).astype(np.float16)
    np.testing.assert_array_equal(vectors, expected.astype(np.float32))
    np.testing.assert_array_equal(inner.reconstruct_n(0, 250), vectors)
    # same ids and keys as the float32 build; vectors within fp16 rounding of its vectors
    ref = open_index(reference)
    assert open_index(out).keys(range(450)) == ref.keys(range(450))
    np.testing.assert_allclose(open_index(out).vectors(range(450)).numpy(), ref.vectors(range(450)).numpy(), atol=2**-11)
    found, dist = open_index(out).range_search(vectors[7:8], 1e-3)[0]
    assert found[0] == 7 and dist[0] == 0


def test_chunks_are_fixed_by_the_tar(digits_corpus):
    """Without Ray: a tar's chunks, and so every encoder batch, depend on the tar and chunk size only."""
    row = {"part": 4, "path": digits_corpus[0]}
    chunks = list(read_chunks(row, resolution=8, chunk_size=100))
    assert [(c["part"], c["chunk"], c["last"], len(c["keys"])) for c in chunks] == [
        (4, 0, False, 100), (4, 1, False, 100), (4, 2, True, 25)]
    encoder = ChunkEncoder("pixels", dtype="float16")
    encoded = encoder(dict(chunks[2]))
    latents = chunk_latents(encoded, "float16")
    assert latents.shape == (25, 3 * 8 * 8) and latents.dtype == np.float16 and "pixels" not in encoded
    keys = [s.key for s in iter_shard(digits_corpus[0])]
    assert sum((c["keys"] for c in chunks), []) == keys


def test_rows_of_parts_are_the_ids_tables(reference):
    """Global ids follow corpus order across parts and shards: the id tables say so."""
    manifest = read_manifest(reference)
    ids = np.concatenate([pq.read_table(os.path.join(reference, s.ids_file)).column("id").to_numpy() for s in manifest.shards])
    assert manifest.count == sum(1 for path in manifest.build["corpus"].split(",") for _ in iter_shard(path)) == 1349
    assert ids.tolist() == list(range(manifest.count)) and [s.count for s in manifest.shards] == [250] * 5 + [99]


def test_encoder_pool_takes_every_gpu_or_one_cpu_actor():
    def pool(gpus, **kw):
        p = encoder_pool(EncodeOptions(**kw), gpus)
        return p["concurrency"], p["num_gpus"], p["num_cpus"], p["device"]

    assert pool(4) == (4, 1, 0.25, "cuda")  # one actor per GPU, a fraction of a CPU each
    assert pool(4, num_encoders=2) == (2, 1, 0.25, "cuda")
    assert pool(2, num_encoders=8) == (2, 1, 0.25, "cuda")  # never more actors than GPUs
    assert pool(0) == (1, 0, 0.25, "cpu") and pool(0, num_encoders=3) == (3, 0, 0.25, "cpu")


def ppm_tar(path, colours):
    """A tar of 8x8 one-colour PPMs: its size depends only on the number of images, not their colours."""
    from PIL import Image

    from tests.conftest import add_tar_members

    members = []
    for i, colour in enumerate(colours):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buffer, format="PPM")
        members.append((f"img_{i:03d}.ppm", buffer.getvalue()))
    add_tar_members(str(path), members)


@pytest.mark.slow
def test_a_tar_swapped_for_same_size_content_after_a_crash_is_encoded_again(ray_session, tmp_path, capsys):
    """Resume by content: the part of a tar whose bytes changed (same size) between the crash and the
    rerun is not reused; the index is the one of the corpus as it is now, and records its checksums."""
    tars = [tmp_path / f"c-{n:03d}.tar" for n in range(4)]
    for n, path in enumerate(tars):
        ppm_tar(path, [(10 * n + i, 0, 0) for i in range(5)])
    out = tmp_path / "index"
    argv = ["--corpus", ",".join(map(str, tars)), "--out", str(out), "--resolution", "8", "--batch-size", "2"]
    parts_dir = tmp_path / "index.partial" / PARTS
    finished = crash_build(argv, parts_dir, 3, tmp_path / "build.log")
    assert finished[:3] == [f"part-{i:05d}.json" for i in range(3)] and len(finished) <= 4 and not out.exists()

    size = os.path.getsize(tars[0])
    ppm_tar(tars[0], [(200 + i, 0, 0) for i in range(5)])  # other pixels, the same bytes count
    assert os.path.getsize(tars[0]) == size
    ppm_tar(tars[1], [(100 + i, 0, 0) for i in range(12)])  # more images: another size, re-encoded too
    assert os.path.getsize(tars[1]) != size
    manifest = build_index(",".join(map(str, tars)), str(out), EncodeOptions(resolution=8, batch_size=2))
    err = capsys.readouterr().err
    for changed in tars[:2]:
        assert f"{changed} changed since its part was written (sha256 differs): encoding it again" in err
    # parts 0 and 1 were of the changed tars; part 2 (and part 3, if it finished before the kill) reused
    assert manifest["build"]["resumed_parts"] == len(finished) - 2 and manifest["count"] == 27
    reds = np.round((open_index(str(out)).vectors(range(27)).numpy().reshape(27, 3, 8, 8)[:, 0, 0, 0] + 1) * 127.5)
    assert reds.astype(int).tolist() == [*range(200, 205), *range(100, 112), *range(20, 25), *range(30, 35)]
    assert [s["sha256"] for s in manifest["build"]["sources"]] == [file_sha256(str(p)) for p in tars]
    assert main(["index", "verify", str(out)]) == 0
    # the corpus changing after the build is what `index verify` now catches
    ppm_tar(tars[2], [(99, 0, 0)] * 5)
    capsys.readouterr()
    assert main(["index", "verify", str(out)]) == 2
    assert f"corpus tar {os.path.abspath(tars[2])} changed since the index was built" in capsys.readouterr().err
