"""Reading tars and decoding images: every problem is a Reject with a reason, never a crash."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from spellshield.indexing.corpus import CorpusError, Reject, Sample, decode_image, expand_shards, iter_shard
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
