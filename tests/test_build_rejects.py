"""One build over real tars holding every kind of bad input: each bad sample is a rejects row with
its reason, every other sample is indexed with the right pixels, odd image modes included."""

import gzip
import io
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spellshield.indexing.manifest import read_manifest
from spellshield.indexing.search import open_index
from spellshield.jobs.build_index import build_index
from spellshield.jobs.dataflow import EncodeOptions
from tests.conftest import add_tar_members, jpeg_bytes

RES = 8


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def palette_with_transparency() -> bytes:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0: red (transparent), 1: blue
    image.paste(1, (8, 0, 16, 16))
    return encoded(image, "PNG", transparency=0)


@pytest.fixture(scope="module")
def built(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rejects")
    rng = np.random.default_rng(0)
    good = [jpeg_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(6)]
    odd = str(tmp / "odd-000000.tar")
    add_tar_members(odd, [
        ("good_000.jpg", good[0]), ("good_000.cls", b"3"),
        ("corrupt_000.jpg", good[1][: len(good[1]) // 2]),            # JPEG cut in half
        ("notes_000.txt", b"not an image"),                            # no image member
        ("tiny_000.png", encoded(Image.new("RGB", (4, 4), (9, 9, 9)), "PNG")),
        ("grey16_000.png", encoded(Image.fromarray(np.full((16, 16), 40000, np.uint16)), "PNG")),
        ("cmyk_000.jpg", encoded(Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG", quality=100)),
        ("palette_000.png", palette_with_transparency()),
        ("la_000.png", encoded(Image.new("LA", (16, 16), (0, 128)), "PNG")),
        ("float_000.tif", encoded(Image.fromarray(np.full((16, 16), 0.5, np.float32)), "TIFF")),
        ("cat.4.jpg", good[2]),                                        # a dot in the key
        ("good_001.jpg", good[3]),
    ])
    cut = str(tmp / "cut-000000.tar")
    add_tar_members(cut, [(f"cut_{i:03d}.jpg", good[4]) for i in range(5)])
    data = open(cut, "rb").read()
    member = 512 + -(-len(good[4]) // 512) * 512  # tar header + data padded to 512-byte blocks
    with open(cut, "wb") as f:
        f.write(data[: 3 * member + 512 + 100])  # inside the 4th member's data: 3 samples stand
    empty = tmp / "empty-000000.tar"
    empty.write_bytes(b"")
    out = str(tmp / "index")
    build_index(",".join([odd, cut, str(empty)]), out, EncodeOptions(resolution=RES, batch_size=4), shard_size=5)
    return out


def test_every_bad_sample_is_a_reject_with_its_reason(built):
    rejects = pq.read_table(os.path.join(built, "rejects.parquet")).to_pylist()
    reasons = {(r["key"], r["shard"]): r["reason"] for r in rejects}
    expected = {
        ("corrupt_000", "odd-000000.tar"): "undecodable image",
        ("notes_000", "odd-000000.tar"): "no image member (extensions: txt)",
        ("tiny_000", "odd-000000.tar"): "image too small: 4x4 < 8 px",
        ("float_000", "odd-000000.tar"): "unsupported image mode F",
        ("cat", "odd-000000.tar"): "a dot in the key splits the name early",
        ("cut_003", "cut-000000.tar"): "unreadable tar after 3 samples",
        ("*", "empty-000000.tar"): "unreadable tar after 0 samples",
    }
    assert set(reasons) == set(expected) and len(rejects) == len(expected)
    for where, reason in expected.items():
        assert reason in reasons[where], (where, reasons[where])
    assert read_manifest(built).rejects == len(expected)


def test_the_rest_is_indexed_with_the_right_pixels(built):
    manifest = read_manifest(built)
    shield = open_index(built)
    keys = shield.keys(range(manifest.count))
    assert keys == ["good_000", "grey16_000", "cmyk_000", "palette_000", "la_000", "good_001", "cut_000", "cut_001", "cut_002"]
    assert [s.count for s in manifest.shards] == [5, 4]

    def pixel(key, y, x):  # the stored RGB of a pixel, back in 0..255
        v = shield.vectors([keys.index(key)]).numpy()[0].reshape(3, RES, RES)
        return np.round((v[:, y, x] + 1) * 127.5).astype(int).tolist()

    assert pixel("grey16_000", 3, 3) == [156] * 3                     # 40000 / 65535, scaled to 8 bits
    assert pixel("cmyk_000", 3, 3) == [255, 255, 255]                 # no ink is white
    assert pixel("palette_000", 3, 0) == [255, 255, 255]              # transparent index: white
    assert pixel("palette_000", 3, 7) == [0, 0, 255]                  # opaque index: its colour
    assert all(abs(c - 128) <= 1 for c in pixel("la_000", 3, 3))      # black at alpha 128 over white


@pytest.fixture(scope="module")
def hostile(ray_session, tmp_path_factory):
    """A gzipped tar of what a WebDataset reader loses silently (issue 13), built with a small member limit."""
    tmp = tmp_path_factory.mktemp("hostile")
    colours = {name: c for c, name in enumerate(["dup1", "dup2", "pair_jpg", "pair_png", "ok"], start=1)}
    image = {name: encoded(Image.new("RGB", (16, 16), (30 * c, 0, 0)), "PNG") for name, c in colours.items()}
    raw = tmp / "hostile.tar"
    with tarfile.open(raw, "w") as tar:
        def add(name, data=None, kind=None):
            info = tarfile.TarInfo(name)
            if kind is None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type, info.linkname = kind, "ok.png"
                tar.addfile(info)
        add("dup.png", image["dup1"]), add("dup.png", image["dup2"])
        add("pair.jpg", image["pair_jpg"]), add("pair.png", image["pair_png"])  # PNG bytes named .jpg decode too
        add("ok.png", image["ok"])
        add("soft.png", kind=tarfile.SYMTYPE), add("hard.png", kind=tarfile.LNKTYPE)
        add("big.png", bytes(5000))
    path = str(tmp / "hostile-000000.tar.gz")
    with open(path, "wb") as f:
        f.write(gzip.compress(raw.read_bytes()))
    out = str(tmp / "index")
    build_index(path, out, EncodeOptions(resolution=RES, batch_size=3, max_member_bytes=4096), shard_size=10)
    return out, colours


def test_hostile_members_are_each_indexed_or_rejected(hostile):
    out, colours = hostile
    manifest = read_manifest(out)
    shield = open_index(out)
    keys = shield.keys(range(manifest.count))
    assert keys == ["dup", "dup.png#2", "pair", "pair.png", "ok"]
    reds = np.round((shield.vectors(range(manifest.count)).numpy().reshape(-1, 3, RES, RES)[:, 0, 0, 0] + 1) * 127.5)
    assert reds.astype(int).tolist() == [30 * colours[n] for n in ("dup1", "dup2", "pair_jpg", "pair_png", "ok")]
    rejects = {r["key"]: r["reason"] for r in pq.read_table(os.path.join(out, "rejects.parquet")).to_pylist()}
    assert rejects == {
        "soft": "symbolic link member soft.png -> ok.png: links are not followed (store the file itself)",
        "hard": "hard link member hard.png -> ok.png: links are not followed (store the file itself)",
        "big": "member big.png is 5000 bytes, over the 4096-byte limit (--max-member-bytes); not read",
    }
    assert manifest.count + manifest.rejects == 8  # every member of the tar has its row
