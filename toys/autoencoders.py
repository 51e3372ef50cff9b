"""How well an autoencoder reconstructs images: PSNR of decode(encode(x)), as 8-bit pixels."""

from __future__ import annotations

import numpy as np
import torch


def reconstruction_psnr(model, images: np.ndarray) -> np.ndarray:
    """PSNR (dB) per image of ``model.decode(model.encode(x).latents).sample`` against ``x``,
    both rounded to 8 bits; ``images`` uint8 (N, H, W, 3), the model's images in [-1, 1]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        y = model.decode(model.encode(x).latents).sample.clamp(-1, 1)
    mse = (((y + 1) * 127.5).round() - (x + 1) * 127.5).pow(2).mean(dim=(1, 2, 3))
    return (10 * torch.log10(255.0**2 / mse)).numpy()
