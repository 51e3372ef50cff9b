"""Reading a corpus of WebDataset tar shards, one sample at a time, without ever crashing on one.

We read tars ourselves rather than through ``ray.data.read_webdataset`` because that reader
fails a whole read task on one corrupt tar and hides undecodable members; here every problem
becomes a ``Reject`` with the sample's key, its shard and a reason, and the caller records it.

Grouping follows the WebDataset convention: a member's key is its path up to the first dot of
its base name, its extension the rest (``cat_12.jpg`` -> key ``cat_12``, ext ``jpg``), and
consecutive members with the same key form one sample. A key with a dot in it therefore splits
the name early (``cat.12.jpg`` -> key ``cat``, ext ``12.jpg``): such a sample has no image
extension and is rejected with a reason that says so.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import braceexpand
import numpy as np
from PIL import Image, UnidentifiedImageError

from spellshield import storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
DEFAULT_MIN_SIZE = 8  # pixels on the shorter side; smaller images are rejected as "too small"


class CorpusError(ValueError):
    """The corpus as a whole is unusable (missing, empty): nothing to index."""


@dataclass(frozen=True)
class Sample:
    key: str
    shard: str  # base name of the source tar
    image: bytes
    ext: str
    sha256: str  # of the image bytes
    extras: dict = field(default_factory=dict)  # other members by extension (cls, json, ...)


@dataclass(frozen=True)
class Reject:
    key: str
    shard: str
    reason: str


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a brace pattern, a glob, a directory or a comma-separated list.

    Raises CorpusError when nothing matches or a listed shard does not exist: a missing corpus
    is bad input, not an empty index.
    """
    if not spec or not spec.strip():
        raise CorpusError("no corpus given")
    paths: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if storage.is_remote(part):
            paths.extend(_expand_uri(part))
            continue
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise CorpusError(f"corpus directory {part} holds no .tar shards")
            paths.extend(found)
            continue
        for expanded in braceexpand.braceexpand(part):
            if any(ch in expanded for ch in "*?["):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise CorpusError(f"corpus pattern {expanded} matches no file")
                paths.extend(matches)
            elif not os.path.isfile(expanded):
                raise CorpusError(f"corpus shard {expanded} does not exist")
            else:
                paths.append(expanded)
    if not paths:
        raise CorpusError(f"corpus {spec!r} names no shards")
    empty = [p for p in paths if _shard_size(p) == 0]
    if len(empty) == len(paths):
        raise CorpusError(f"corpus {spec!r} is empty: every shard has 0 bytes")
    return paths


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: key up to the first dot of the base name."""
    directory, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(directory, stem) if directory else stem), ext.lower()


def iter_shard(path: str) -> Iterator[Sample | Reject]:
    """Every sample of one tar, as a Sample (has an image member) or a Reject.

    A tar that cannot be opened or ends early yields a Reject for the samples it could not
    read (key ``*`` when nothing identifies them) and stops; the samples before it stand.
    """
    shard = os.path.basename(path)
    current_key: str | None = None
    members: dict[str, bytes] = {}
    count = 0
    try:
        with storage.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if key != current_key:
                    if current_key is not None:
                        yield _to_sample(current_key, shard, members)
                        count += 1
                    current_key, members = key, {}
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} truncated")
                members[ext] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        # The member being read when the tar broke is incomplete: reject it with the tail.
        yield Reject(key=current_key or "*", shard=shard, reason=f"unreadable tar after {count} samples: {exc}")
        return
    if current_key is not None:
        yield _to_sample(current_key, shard, members)
        count += 1
    if count == 0:
        yield Reject(key="*", shard=shard, reason="tar holds no samples")


def _to_sample(key: str, shard: str, members: dict[str, bytes]) -> Sample | Reject:
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            data = members[ext]
            extras = {k: v for k, v in members.items() if k != ext}
            return Sample(key=key, shard=shard, image=data, ext=ext, sha256=hashlib.sha256(data).hexdigest(), extras=extras)
    found = ", ".join(sorted(members)) or "none"
    dotted = any("." in ext for ext in members)
    hint = " (a dot in the key splits the name early)" if dotted else ""
    return Reject(key=key, shard=shard, reason=f"no image member (extensions: {found}){hint}")


def decode_image(data: bytes, resolution: int, min_size: int = DEFAULT_MIN_SIZE) -> np.ndarray:
    """Image bytes -> uint8 RGB array (resolution, resolution, 3): shorter side resized, centre crop.

    Raises ValueError with the reason when the bytes are not a decodable image, its mode has no
    faithful RGB rendering, or it is smaller than ``min_size`` on its shorter side. Odd modes
    that have one are converted: 16-bit greyscale scaled to 8 bits, CMYK and palette converted,
    transparency (RGBA, LA, PA, palette with a transparent index) composited on white.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image = _to_rgb(image)
    except UnsupportedImageMode:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"undecodable image: {exc}") from None
    width, height = image.size
    if min(width, height) < min_size:
        raise ValueError(f"image too small: {width}x{height} < {min_size} px")
    scale = resolution / min(width, height)
    if (width, height) != (resolution, resolution):
        new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        if new_size != (width, height):
            image = image.resize(new_size, Image.BICUBIC, reducing_gap=3.0)
        left = (image.size[0] - resolution) // 2
        top = (image.size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, dtype=np.uint8).copy()


class UnsupportedImageMode(ValueError):
    """A decodable image whose mode has no faithful 8-bit RGB rendering: rejected, with the mode."""


# Modes with one faithful 8-bit RGB rendering. Others (32-bit integer "I", float "F", LAB, HSV...)
# have no defined display range or need a colour profile: rejected with the mode in the reason
# rather than indexed as a guess that a copy of the image would not match.
_DIRECT_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr", "RGBX")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit greyscale: PIL's convert("RGB") clips instead of scaling; scale to 8 bits.
        grey = np.clip(np.asarray(image, dtype=np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        # Composite on white so that transparent pixels do not become arbitrary colours.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _DIRECT_MODES:
        return image.convert("RGB")
    raise UnsupportedImageMode(f"unsupported image mode {mode}: no faithful 8-bit RGB rendering")


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes (lossless: what is written is what was checked)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# --- Corpora on object storage (issue 9): s3:// and gs:// URIs, with the local rules above ------


def _expand_uri(part: str) -> list[str]:
    """An object-store corpus spec: a prefix holding .tar objects, a brace pattern, a glob."""
    try:
        storage.probe(part)  # unreachable store, refused credentials, missing bucket: say so first
        if not any(ch in part for ch in "{*?[") and not part.endswith(".tar") and storage.is_dir(part):
            found = [loc.uri for loc in storage.list_dir(part) if loc.uri.endswith(".tar")]
            if not found:
                raise CorpusError(f"corpus prefix {part} holds no .tar shards")
            return found
        paths = []
        for expanded in braceexpand.braceexpand(part):
            matches = storage.expand(expanded)
            if any(ch in expanded for ch in "*?[") and not matches:
                raise CorpusError(f"corpus pattern {expanded} matches no file")
            for uri in matches:
                if not storage.is_file(uri):
                    raise CorpusError(f"corpus shard {uri} does not exist")
            paths.extend(matches)
        return paths
    except storage.StorageError as exc:
        raise CorpusError(str(exc)) from None


def _shard_size(path: str) -> int:
    return storage.size(path) if storage.is_remote(path) else os.path.getsize(path)
