"""Reading a corpus of WebDataset tar shards, one sample at a time, without ever crashing on one.

We read tars ourselves rather than through ``ray.data.read_webdataset`` because that reader
fails a whole read task on one corrupt tar and hides undecodable members; here every problem
becomes a ``Reject`` with the sample's key, its shard and a reason, and the caller records it.

Grouping follows the WebDataset convention: a member's key is its path up to the first dot of
its base name, its extension the rest (``cat_12.jpg`` -> key ``cat_12``, ext ``jpg``), and
consecutive members with the same key form one sample. A key with a dot in it therefore splits
the name early (``cat.12.jpg`` -> key ``cat``, ext ``12.jpg``): such a sample has no image
extension and is rejected with a reason that says so.

No image member is ever dropped without a row (a protected image that is silently not indexed
is a hole in the shield). What WebDataset readers do silently, and what happens here instead:

- Several images under one key in a tar (``pair.jpg`` and ``pair.png``; ``dup.jpg`` twice; the
  key again later in the tar): every one is indexed. The first keeps the key (``pair``); each
  later one is keyed by its member name (``pair.png``), with ``#n`` for the n-th member of that
  name in the tar (``dup.jpg#2``), so that keys are unique within a tar and each names its member.
- Symbolic and hard link members: rejected ("links are not followed"); a streamed tar cannot go
  back for a hard link's data, and a symlink may point outside the tar. Other non-regular
  members (devices, FIFOs) are rejected too; directories are not samples and are passed over.
- A member larger than ``max_member_bytes`` (its size from the tar header, checked before any
  byte of it is read): rejected, so a gzip bomb costs decompression time, never memory. The
  default, ``DEFAULT_MAX_MEMBER_BYTES``, is far above any real image file and is what
  ``build-index --max-member-bytes`` defaults to.
"""

from __future__ import annotations

import glob
import hashlib
import io
import lzma
import os
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import braceexpand
import numpy as np
from PIL import Image, UnidentifiedImageError

from spellshield import storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
DEFAULT_MIN_SIZE = 8  # pixels on the shorter side; smaller images are rejected as "too small"
# Largest member read into memory (header size); larger members become rejects unread. 256 MiB is
# above any real image file (PIL refuses images above ~179 Mpx as decompression bombs anyway).
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20


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


class _HashingReader:
    """A read-only file that feeds every byte read through it to ``digest`` (tarfile streams it)."""

    def __init__(self, f, digest):
        self.f, self.digest = f, digest
        self.name = getattr(f, "name", None)

    def read(self, size=-1) -> bytes:
        data = self.f.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def iter_shard(path: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, digest=None) -> Iterator[Sample | Reject]:
    """Every sample of one tar, as a Sample (an image member) or a Reject (see the module doc).

    A tar that cannot be opened or ends early yields a Reject for the samples it could not
    read (key ``*`` when nothing identifies them) and stops; the samples before it stand.
    ``digest`` (a hashlib object), if given, is fed every byte of the tar file, read or skipped,
    once the generator is exhausted: the content checksum of the tar, at no extra read.
    """
    shard = os.path.basename(path)
    keys = _KeyRegister()
    current_key: str | None = None
    group: list[tuple] = []  # (member name, ext, data or None, reject reason or None, occurrence of the name)
    count = 0
    f = None
    try:
        f = storage.open_input_file(path)  # a local file, or a seekable reader of an s3:// / gs:// object
        source = _HashingReader(f, digest) if digest is not None else f
        with tarfile.open(fileobj=_decompressed(f, source), mode="r|") as tar:
            for info in tar:
                if info.isdir():
                    continue  # a directory entry is no sample and holds no data
                key, ext = split_member_name(info.name)
                if key != current_key:
                    if current_key is not None:
                        for item in _group_items(current_key, shard, group, keys):
                            yield item
                            count += 1
                    current_key, group = key, []
                occurrence = keys.member_seen(info.name)
                reason = _member_problem(info, max_member_bytes)
                if reason is not None:
                    group.append((info.name, ext, None, reason, occurrence))
                    continue
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} truncated")
                group.append((info.name, ext, data, None, occurrence))
        if digest is not None:
            source.drain()  # tarfile stops at the end-of-archive blocks; the checksum covers the file
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        # The member being read when the tar broke is incomplete: reject it with the tail.
        yield Reject(key=current_key or "*", shard=shard, reason=f"unreadable tar after {count} samples: {exc}")
        if digest is not None and f is not None and not f.closed:
            _drain_quietly(source)
        return
    finally:
        if f is not None:
            f.close()
    if current_key is not None:
        for item in _group_items(current_key, shard, group, keys):
            yield item
            count += 1
    if count == 0:
        yield Reject(key="*", shard=shard, reason="tar holds no samples")


# Compressed tars are decompressed by the standard library's file readers, not by tarfile's own
# stream mode ("r|gz"): that one joins and re-slices its whole decompressed buffer on every
# 10 KiB read, so a highly compressible member (a gzip bomb) costs gigabytes and quadratic time
# even when it is skipped. The readers below hand out bounded reads.
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "lzma"))


def _decompressed(f, source):
    """``source`` (reading ``f``) as a plain tar stream: gzip, bzip2 and xz recognised by magic."""
    head = f.read(6)
    f.seek(0)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            if kind == "gzip":
                import gzip

                return gzip.GzipFile(fileobj=source, mode="rb")
            if kind == "bz2":
                import bz2

                return bz2.BZ2File(source, mode="rb")
            import lzma

            return lzma.LZMAFile(source, mode="rb")
    return source


def _drain_quietly(source) -> None:
    try:
        source.drain()
    except OSError:
        pass


def _member_problem(info: tarfile.TarInfo, max_member_bytes: int) -> str | None:
    """Why a member is rejected without reading its data, or None when it is read."""
    if info.issym():
        return f"symbolic link member {info.name} -> {info.linkname}: links are not followed (store the file itself)"
    if info.islnk():
        return f"hard link member {info.name} -> {info.linkname}: links are not followed (store the file itself)"
    if not info.isfile():
        return f"member {info.name} is not a regular file (tar type {info.type!r})"
    if info.size > max_member_bytes:
        return f"member {info.name} is {info.size} bytes, over the {max_member_bytes}-byte limit (--max-member-bytes); not read"
    return None


class _KeyRegister:
    """Keys handed out in one tar, and how often each member name occurred: keeps keys unique."""

    def __init__(self):
        self.used: set[str] = set()
        self.names: Counter = Counter()

    def member_seen(self, name: str) -> int:
        self.names[name] += 1
        return self.names[name]

    def assign(self, key: str, name: str, occurrence: int) -> str:
        """``key`` the first time; then the member name, ``#n`` for its n-th occurrence."""
        candidate = key if key not in self.used else (name if occurrence == 1 else f"{name}#{occurrence}")
        n = occurrence
        while candidate in self.used:  # only when member names themselves collide with keys
            n += 1
            candidate = f"{name}#{n}"
        self.used.add(candidate)
        return candidate


def _group_items(key: str, shard: str, group: list[tuple], keys: _KeyRegister) -> list[Sample | Reject]:
    """The rows of one group of consecutive members sharing ``key``: one per image or rejected member."""
    extras: dict[str, bytes] = {}
    for _, ext, data, reason, _ in group:
        if data is not None and ext not in IMAGE_EXTENSIONS:
            extras.setdefault(ext, data)
    items: list[Sample | Reject] = []
    for name, ext, data, reason, occurrence in group:
        if reason is not None:
            items.append(Reject(key=keys.assign(key, name, occurrence), shard=shard, reason=reason))
        elif ext in IMAGE_EXTENSIONS:
            first = not any(isinstance(i, Sample) for i in items)
            items.append(Sample(key=keys.assign(key, name, occurrence), shard=shard, image=data, ext=ext,
                                sha256=hashlib.sha256(data).hexdigest(), extras=extras if first else {}))
    if items:
        return items
    found = ", ".join(sorted({ext for _, ext, _, _, _ in group})) or "none"
    dotted = any("." in ext for _, ext, _, _, _ in group)
    hint = " (a dot in the key splits the name early)" if dotted else ""
    name, occurrence = group[0][0], group[0][4]
    return [Reject(key=keys.assign(key, name, occurrence), shard=shard, reason=f"no image member (extensions: {found}){hint}")]


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
