"""Reading tars and decoding images: every problem is a Reject with a reason, never a crash."""

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from spellshield.indexing.corpus import (DEFAULT_MAX_MEMBER_BYTES, CorpusError, Reject, Sample, decode_image, expand_shards,
                                         iter_shard)
from tests.conftest import add_tar_members, jpeg_bytes


def png(image, mode=None):
    buffer = io.BytesIO()
    im = Image.fromarray(image)
    assert mode is None or im.mode == mode
    im.save(buffer, format="PNG")
    return buffer.getvalue()


def test_good_and_bad_members(tmp_path):
    good = jpeg_bytes(np.full((32, 32, 3), 128, np.uint8))
    path = str(tmp_path / "mixed.tar")
    add_tar_members(path, [
        ("a_1.jpg", good), ("a_1.cls", b"3"),
        ("broken_2.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg"),
        ("readme_3.txt", b"hello"),
        ("cat.4.jpg", good),
        ("b_5.jpg", good),
    ])
    items = list(iter_shard(path))
    assert [type(i).__name__ for i in items] == ["Sample", "Sample", "Reject", "Reject", "Sample"]
    assert items[0].key == "a_1" and items[0].extras == {"cls": b"3"}
    assert items[2].key == "readme_3" and "no image member" in items[2].reason
    assert items[3].key == "cat" and "dot in the key" in items[3].reason
    with pytest.raises(ValueError, match="undecodable"):
        decode_image(items[1].image, 32)


def test_truncated_tar_keeps_what_came_before(tmp_path):
    good = jpeg_bytes(np.zeros((16, 16, 3), np.uint8))
    path = str(tmp_path / "t.tar")
    add_tar_members(path, [(f"k{i}.jpg", good) for i in range(5)])
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: 512 * 7 + 100])  # cut inside a later member
    items = list(iter_shard(path))
    samples = [i for i in items if isinstance(i, Sample)]
    rejects = [i for i in items if isinstance(i, Reject)]
    assert len(samples) >= 1 and len(rejects) == 1
    assert "unreadable tar" in rejects[0].reason


def test_empty_tar_file_is_a_reject(tmp_path):
    path = tmp_path / "empty.tar"
    path.write_bytes(b"")
    items = list(iter_shard(str(path)))
    assert len(items) == 1 and isinstance(items[0], Reject)


@pytest.mark.parametrize(
    "image,mode",
    [
        (np.full((20, 30, 4), 200, np.uint8), "RGBA"),
        (np.full((20, 30), 7, np.uint8), "L"),
        (np.full((20, 30), 40000, np.uint16), "I;16"),
    ],
)
def test_odd_modes_become_rgb(image, mode):
    out = decode_image(png(image, mode), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert abs(int(out[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1


def test_resize_and_centre_crop():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = 255  # the centre 20x20 is white
    out = decode_image(png(image), 10)
    assert out.shape == (10, 10, 3) and out.min() > 200


def test_tiny_image_rejected():
    with pytest.raises(ValueError, match="too small"):
        decode_image(png(np.zeros((4, 4, 3), np.uint8)), 32)


def test_expand_shards_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        expand_shards(str(tmp_path / "nope-{000..002}.tar"))
    with pytest.raises(CorpusError, match="matches no file"):
        expand_shards(str(tmp_path / "*.tar"))
    empty = tmp_path / "e.tar"
    empty.write_bytes(b"")
    with pytest.raises(CorpusError, match="empty"):
        expand_shards(str(empty))
    (tmp_path / "x-000.tar").write_bytes(b"x")
    (tmp_path / "x-001.tar").write_bytes(b"x")
    assert [os.path.basename(p) for p in expand_shards(str(tmp_path / "x-{000..001}.tar"))] == ["x-000.tar", "x-001.tar"]


@pytest.mark.parametrize(
    "image",
    [Image.fromarray(np.full((16, 16), 0.5, np.float32)), Image.fromarray(np.full((16, 16), 70000, np.int32))],
    ids=["F", "I"],
)
def test_modes_without_a_faithful_rgb_rendering_are_rejected_by_name(image):
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    with pytest.raises(ValueError, match=f"unsupported image mode {image.mode}:"):
        decode_image(buffer.getvalue(), 8)


# ---- hostile tars (issue 13): every image member is indexed or rejected with a reason ----

def rows(path, **kw):
    return [(i.key, "ok" if isinstance(i, Sample) else i.reason) for i in iter_shard(str(path), **kw)]


def distinct_jpegs(n):
    return [jpeg_bytes(np.full((16, 16, 3), 10 + 40 * i, np.uint8)) for i in range(n)]


def test_the_same_member_twice_keeps_both_images(tmp_path):
    a, b = distinct_jpegs(2)
    add_tar_members(str(tmp_path / "dup.tar"), [("dup.jpg", a), ("dup.jpg", b), ("dup.cls", b"1")])
    items = list(iter_shard(str(tmp_path / "dup.tar")))
    assert [(i.key, i.image) for i in items] == [("dup", a), ("dup.jpg#2", b)]
    assert items[0].extras == {"cls": b"1"} and items[1].extras == {}


def test_two_image_members_under_one_key_are_both_indexed(tmp_path):
    a, b, c = distinct_jpegs(3)
    add_tar_members(str(tmp_path / "pair.tar"), [("pair.jpg", a), ("pair.png", b), ("other.jpg", c)])
    items = list(iter_shard(str(tmp_path / "pair.tar")))
    assert [(i.key, i.ext, i.image) for i in items] == [("pair", "jpg", a), ("pair.png", "png", b), ("other", "jpg", c)]


def test_a_key_seen_again_later_in_the_tar_gets_its_member_name(tmp_path):
    a, b, c, d = distinct_jpegs(4)
    add_tar_members(str(tmp_path / "again.tar"), [("k.jpg", a), ("x.jpg", b), ("k.jpg", c), ("k.png", d)])
    items = list(iter_shard(str(tmp_path / "again.tar")))
    assert [(i.key, i.image) for i in items] == [("k", a), ("x", b), ("k.jpg#2", c), ("k.png", d)]
    assert len({i.key for i in items}) == 4  # keys unique in the tar


def test_link_members_are_rejected_with_a_reason(tmp_path):
    a, b = distinct_jpegs(2)
    path = str(tmp_path / "links.tar")
    with tarfile.open(path, "w") as tar:
        for name, data in (("real.jpg", a), ("other.jpg", b)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind in (("soft.jpg", tarfile.SYMTYPE), ("hard.jpg", tarfile.LNKTYPE), ("real.png", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "real.jpg"
            tar.addfile(info)
        info = tarfile.TarInfo("subdir")  # a directory entry: no sample, no row
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    assert rows(path) == [
        ("real", "ok"), ("other", "ok"),
        ("soft", "symbolic link member soft.jpg -> real.jpg: links are not followed (store the file itself)"),
        ("hard", "hard link member hard.jpg -> real.jpg: links are not followed (store the file itself)"),
        ("real.png", "symbolic link member real.png -> real.jpg: links are not followed (store the file itself)"),
    ]


def test_a_member_over_the_size_limit_is_rejected_unread(tmp_path):
    small, big = distinct_jpegs(1)[0], bytes(5000)
    add_tar_members(str(tmp_path / "big.tar"), [("a.jpg", small), ("b.png", big), ("b.cls", b"7"), ("c.jpg", small)])
    assert rows(tmp_path / "big.tar", max_member_bytes=4096) == [
        ("a", "ok"), ("b", "member b.png is 5000 bytes, over the 4096-byte limit (--max-member-bytes); not read"), ("c", "ok")]


def test_the_digest_is_the_tar_files_sha256(tmp_path):
    import gzip
    import hashlib

    add_tar_members(str(tmp_path / "a.tar"), [(f"k{i}.jpg", d) for i, d in enumerate(distinct_jpegs(3))])
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    (tmp_path / "cut.tar").write_bytes((tmp_path / "a.tar").read_bytes()[:1500])
    (tmp_path / "cut.tar.gz").write_bytes((tmp_path / "a.tar.gz").read_bytes()[:300])
    for name in ("a.tar", "a.tar.gz", "cut.tar", "cut.tar.gz"):
        digest = hashlib.sha256()
        items = list(iter_shard(str(tmp_path / name), digest=digest))
        assert digest.hexdigest() == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert [type(i) for i in items] == ([Sample] * 3 if "cut" not in name else [Reject])  # cut in its first member
        assert "cut" not in name or "unreadable tar after 0 samples" in items[0].reason


def write_gzip_bomb(path, member_size):
    """A .tar.gz whose one member is ``member_size`` zero bytes, written streaming (never in memory)."""
    import gzip

    info = tarfile.TarInfo("bomb.png")
    info.size = member_size
    chunk = bytes(16 << 20)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        left = member_size
        while left:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
        f.write(bytes(-member_size % 512) + bytes(1024))  # padding to a block, then the end-of-archive blocks


def test_a_gzip_bomb_member_is_rejected_in_bounded_memory(tmp_path):
    """2 GiB of zeros in a ~9 MB .tar.gz: rejected from its header size, and the read's peak RSS stays small
    (tarfile's own "r|gz" stream reads peaked at 4.4 GB on it)."""
    import subprocess
    import sys

    path = str(tmp_path / "bomb.tar.gz")
    write_gzip_bomb(path, 2 << 30)
    assert os.path.getsize(path) < 20 << 20
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child of a big
    # pytest process would report the parent's peak.
    script = ("import sys; from spellshield.indexing.corpus import iter_shard; "
              "items = list(iter_shard(sys.argv[1])); "
              "print(repr([(i.key, i.reason) for i in items])); "
              "print([int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])")
    proc = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    listing, peak_mib = proc.stdout.strip().splitlines()
    assert eval(listing) == [("bomb", f"member bomb.png is {2 << 30} bytes, over the {DEFAULT_MAX_MEMBER_BYTES}-byte limit "
                                      "(--max-member-bytes); not read")]
    assert int(peak_mib) < 400, f"peak RSS {peak_mib} MiB"
