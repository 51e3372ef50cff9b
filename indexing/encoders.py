"""Images -> latents in the space a diffusion model denoises.

Two kinds of encoder behind one interface:

- ``pixels``: the image itself, scaled from uint8 to [-1, 1], channels first. For pixel-space
  models (DDPM on CIFAR, the memorizer on small images).
- any diffusers autoencoder (AutoencoderKL, AutoencoderTiny, ...) loaded with
  ``from_pretrained`` from a local directory or a hub id, or the released TAEF2 weights
  (a directory with ``taef2_encoder.pth``/``taef2_decoder.pth``; see ``indexing.taef2``). Raw latents are what the VAE returns
  (the mean of its posterior for KL models); scaled latents, the ones a denoiser sees and the
  ones we index, are ``(raw - shift_factor) * scaling_factor`` as in diffusers' pipelines.

Following edm2's encoders, the network is loaded lazily in ``init(device)`` and dropped when the
object is pickled, so an encoder spec travels cheaply to Ray workers.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from spellshield import storage
from spellshield.storage.cache import local_dir

from .latent import PIXELS, LatentSpec  # noqa: F401  (re-exported: the spec is part of this API)


class Encoder:
    """Batches of uint8 RGB images (B, H, W, 3) -> scaled latents (B, C, H', W') float32."""

    def __init__(self, spec: str = PIXELS, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self._vae = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_vae"] = None  # reloaded on the worker by init()
        return state

    @property
    def is_pixels(self) -> bool:
        return self.spec == PIXELS

    def init(self, device: str | None = None) -> "Encoder":
        if device is not None:
            self.device = device
        if not self.is_pixels and self._vae is None:
            self._vae = load_autoencoder(self.spec).to(self.device, self.dtype).eval()
        return self

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        if self.is_pixels:
            return x
        self.init()
        vae = self._vae
        out = vae.encode(x.to(self.dtype))
        raw = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
        config = vae.config
        scaling = getattr(config, "scaling_factor", 1.0) or 1.0
        shift = getattr(config, "shift_factor", None) or 0.0
        return ((raw.float() - shift) * scaling).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents -> uint8 RGB images (B, H, W, 3); the inverse of encode up to the VAE."""
        latents = latents.to(self.device, torch.float32)
        if self.is_pixels:
            x = latents
        else:
            self.init()
            config = self._vae.config
            scaling = getattr(config, "scaling_factor", 1.0) or 1.0
            shift = getattr(config, "shift_factor", None) or 0.0
            x = self._vae.decode((latents / scaling + shift).to(self.dtype)).sample.float()
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()

    def latent_spec(self, resolution: int) -> LatentSpec:
        probe = self.init().encode(np.zeros((1, resolution, resolution, 3), dtype=np.uint8))
        shape = tuple(int(v) for v in probe.shape[1:])
        if self.is_pixels:
            return LatentSpec(PIXELS, "pixels", PIXELS, resolution, shape, 1.0, 0.0)
        config = self._vae.config
        return LatentSpec(
            encoder=self.spec,
            encoder_class=type(self._vae).__name__,
            fingerprint=autoencoder_fingerprint(self.spec),
            resolution=resolution,
            shape=shape,
            scaling_factor=float(getattr(config, "scaling_factor", 1.0) or 1.0),
            shift_factor=float(getattr(config, "shift_factor", None) or 0.0),
        )


def load_autoencoder(spec: str):
    """A diffusers autoencoder from a local directory or a hub id, class read from its config.

    A directory holding the released TAEF2 state dicts (``taef2_encoder.pth`` and
    ``taef2_decoder.pth``) loads as ``spellshield.indexing.taef2.TAEF2``, strictly; a directory saved with
    ``save_pretrained`` names its class in ``config.json``: diffusers' own, or this package's.
    A hub id is first resolved to its cached snapshot (``autoencoder_dir``).
    """
    from .taef2 import TAEF2, is_released_weights_dir

    directory = autoencoder_dir(spec)
    if is_released_weights_dir(directory):
        return TAEF2.from_pth(directory)
    config = _read_config(directory)
    class_name = config.get("_class_name")
    cls = _autoencoder_class(class_name) if class_name else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"encoder {spec}: config names no diffusers autoencoder class (got {class_name!r})")
    if not _weight_files(directory):
        raise ValueError(f"encoder directory {directory} holds no weights (.safetensors, .bin or TAEF2 .pth)")
    return cls.from_pretrained(directory)


def _autoencoder_class(name: str):
    import diffusers

    from .taef2 import TAEF2

    ours = {"TAEF2": TAEF2}
    return ours.get(name) or getattr(diffusers, name, None)


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"encoder directory {directory} has no config.json")
    with open(path) as f:
        return json.load(f)


# What a hub snapshot needs for loading and fingerprinting: the config and one copy of the
# weights. Repositories often hold several (.safetensors, .bin, fp16 variants); fetching all of
# them would multiply the download for nothing.
_HUB_WEIGHTS = (["*.safetensors", "*.safetensors.index.json"], ["*.bin", "*.bin.index.json"])


def autoencoder_dir(spec: str) -> str:
    """The local directory behind an encoder spec: the directory itself, or a hub id's snapshot.

    A hub id is ``owner/name``, or ``owner/name/subfolder`` for the autoencoder inside a pipeline
    repository (``.../vae``). Its config and weights are fetched into the Hugging Face cache once;
    with ``HF_HUB_OFFLINE=1`` the cache alone answers. Everything downstream (the class in
    config.json, ``from_pretrained``, the fingerprint) then reads local files, so an index built
    from a hub id and a pipeline directory holding the same VAE agree.
    """
    if storage.is_remote(spec):  # s3://, gs:// (issue 9): this node's cached copy
        return local_dir(spec, "models")
    if os.path.isdir(spec):
        return spec
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(parts) or any(p in (".", "..") for p in parts):
        raise ValueError(f"encoder {spec!r} is neither a local directory nor a hub id (owner/name or owner/name/subfolder)")
    repo, prefix = "/".join(parts[:2]), "".join(f"{p}/" for p in parts[2:])
    try:
        from huggingface_hub import snapshot_download

        for weights in _HUB_WEIGHTS:
            root = snapshot_download(repo, allow_patterns=[prefix + "config.json"] + [prefix + w for w in weights],
                                     ignore_patterns=["*.fp16.*"])
            directory = os.path.join(root, *parts[2:])
            if _weight_files(directory):
                break
    except Exception as exc:  # no network, unknown repo, not in the offline cache: one clear line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"encoder {spec!r} is neither a local directory nor a reachable hub id "
                         f"({exc.__class__.__name__}{': ' + reason[:160] if reason else ''})") from None
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(f"encoder {spec!r}: the hub repository has no {prefix}config.json")
    if not _weight_files(directory):
        raise ValueError(f"encoder {spec!r}: the hub repository has no {prefix}*.safetensors or *.bin weights")
    return directory


def _weight_files(directory: str) -> list[str]:
    """The weight files ``from_pretrained`` loads from a directory: .safetensors, else .bin.

    Variants (``diffusion_pytorch_model.fp16.safetensors``) are left out: without ``variant=``
    diffusers loads the plain files, so the fingerprint must hash those alone.
    """
    if not os.path.isdir(directory):
        return []
    names = sorted(os.listdir(directory))

    def plain(ext):
        return [n for n in names if n.endswith(ext) and "." not in n[: -len(ext)]]

    return plain(".safetensors") or plain(".bin")


def autoencoder_fingerprint(spec: str) -> str:
    """sha256 of an autoencoder's tensors (names, shapes, values as float32): equal iff same weights.

    Hashing tensors rather than files makes a VAE re-saved inside a pipeline directory match the
    directory the index was built from, whatever the file format (.pth, .safetensors, .bin) and
    whatever lossless dtype it was saved in: the released fp16 TAEF2 weights and the same model
    saved in float32 by ``save_pretrained`` have one fingerprint.
    """
    if spec == PIXELS:
        return PIXELS
    digest = hashlib.sha256()
    tensors = _autoencoder_tensors(autoencoder_dir(spec))
    for key in sorted(tensors):
        t = tensors[key]
        if t.is_floating_point():
            t = t.to(torch.float32)  # exact for fp16/bf16 weights: one dtype, one hash
        t = t.contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _autoencoder_tensors(spec: str) -> dict:
    """Every tensor of the autoencoder in ``spec``, under the model's parameter names."""
    from safetensors import safe_open

    from .taef2 import is_released_weights_dir, released_state_dict

    if is_released_weights_dir(spec):
        return released_state_dict(spec)
    files = _weight_files(spec)
    if not files:
        raise ValueError(f"encoder directory {spec} holds no weights (.safetensors, .bin or TAEF2 .pth)")
    tensors = {}
    for name in files:
        path = os.path.join(spec, name)
        if name.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        else:
            tensors.update(torch.load(path, map_location="cpu", weights_only=True))
    return tensors
