"""Calling any diffusers pipeline the same way: prompts (or none), one generator per seed.

Each sample gets its own ``torch.Generator`` seeded with its seed, on the CPU: diffusers'
``randn_tensor`` then draws that sample's noise from its own generator and moves it to the
device, so the noise depends only on the seed, not on the batch, the worker or the device.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch


def takes_prompt(pipe_or_class) -> bool:
    return "prompt" in inspect.signature(pipe_or_class.__call__).parameters


def sample_images(pipe, prompts: list[str | None], seeds: list[int], steps: int, **extra) -> np.ndarray:
    """Run ``pipe`` for one batch; returns float images in [0, 1], shape (B, H, W, 3)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
    kwargs = dict(generator=generators, num_inference_steps=steps, output_type="np", **extra)
    if takes_prompt(pipe):
        kwargs["prompt"] = [p or "" for p in prompts]
    else:
        if any(p for p in prompts):
            raise ValueError(f"{type(pipe).__name__} is unconditional: it takes no prompt")
        kwargs["batch_size"] = len(seeds)
    images = pipe(**kwargs).images
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
