"""What one indexed vector is: the latent spec written to the manifest and compared against a
model. Kept apart from the encoders so that reading a manifest needs neither torch nor diffusers."""

from __future__ import annotations

from dataclasses import dataclass

PIXELS = "pixels"


@dataclass(frozen=True)
class LatentSpec:
    """What one indexed vector is: written to the manifest, compared against the model."""

    encoder: str  # "pixels" or the autoencoder's path / hub id as given
    encoder_class: str
    fingerprint: str  # sha256 of the autoencoder's weights (autoencoder_fingerprint); "pixels" for pixels
    resolution: int
    shape: tuple[int, int, int]  # C, H, W
    scaling_factor: float
    shift_factor: float

    @property
    def dim(self) -> int:
        c, h, w = self.shape
        return c * h * w

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["shape"] = list(self.shape)
        return d

    @staticmethod
    def from_json(d: dict) -> "LatentSpec":
        return LatentSpec(**{**d, "shape": tuple(d["shape"])})
