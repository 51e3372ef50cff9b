"""Small real things that the tests and the benchmarks both build, installed as ``spellshield.toys``
(in the manner of ``ray.cluster_utils`` or diffusers' testing utils), so that benchmarks never
import from ``tests/``:

- ``pipelines``: tiny real diffusers pipelines (DDPM, DDIM, Stable Diffusion, SD3) saved to disk.
- ``schedulers``: every supported scheduler family, advanced to a given step call, and a shield
  source that records what it was asked.
- ``indexes``: CIFAR-10 vectors from ../shared (pixels or any encoder's latents) and float16
  index shards.
- ``processes``: a process's descendants, read from /proc.
- ``autoencoders``: reconstruction PSNR of an autoencoder on images.

Nothing here is a mock; nothing in pipeline/, indexing/, workers/ or jobs/ imports it.
"""
