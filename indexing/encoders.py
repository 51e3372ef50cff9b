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
    ``taef2_decoder.pth``) loads as ``indexing.taef2.TAEF2``, strictly; a directory saved with
    ``save_pretrained`` names its class in ``config.json``: diffusers' own, or this package's.
    """
    from .taef2 import TAEF2, is_released_weights_dir

    if os.path.isdir(spec) and is_released_weights_dir(spec):
        return TAEF2.from_pth(spec)
    config = _read_config(spec)
    class_name = config.get("_class_name")
    cls = _autoencoder_class(class_name) if class_name else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"encoder {spec}: config names no diffusers autoencoder class (got {class_name!r})")
    return cls.from_pretrained(spec)


def _autoencoder_class(name: str):
    import diffusers

    from .taef2 import TAEF2

    ours = {"TAEF2": TAEF2}
    return ours.get(name) or getattr(diffusers, name, None)


def _read_config(spec: str) -> dict:
    path = os.path.join(spec, "config.json")
    if os.path.isdir(spec):
        if not os.path.isfile(path):
            raise ValueError(f"encoder directory {spec} has no config.json")
        with open(path) as f:
            return json.load(f)
    try:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(spec, "config.json")) as f:
            return json.load(f)
    except Exception as exc:  # network, missing repo: one clear message
        raise ValueError(f"encoder {spec!r} is neither a local directory nor a reachable hub id ({exc.__class__.__name__})") from None


def autoencoder_fingerprint(spec: str) -> str:
    """sha256 of an autoencoder's tensors (names, shapes, values as float32): equal iff same weights.

    Hashing tensors rather than files makes a VAE re-saved inside a pipeline directory match the
    directory the index was built from, whatever the file format (.pth, .safetensors, .bin) and
    whatever lossless dtype it was saved in: the released fp16 TAEF2 weights and the same model
    saved in float32 by ``save_pretrained`` have one fingerprint.
    """
    if spec == PIXELS:
        return PIXELS
    if not os.path.isdir(spec):
        return f"hub:{spec}"
    digest = hashlib.sha256()
    tensors = _autoencoder_tensors(spec)
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
    files = sorted(n for n in os.listdir(spec) if n.endswith(".safetensors"))
    if not files:
        files = sorted(n for n in os.listdir(spec) if n.endswith(".bin"))
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
