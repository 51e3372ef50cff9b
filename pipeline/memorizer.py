"""The memorizer: the exact posterior-mean denoiser of a finite set of latents.

For training data ``y_1..y_N`` and the forward process ``x_t = a y + s eps`` (a = sqrt(abar),
s = sqrt(1 - abar)), the minimiser of the denoising loss is the posterior mean

    E[y | x_t] = sum_i softmax_i( -||x_t - a y_i||^2 / (2 s^2) ) y_i

and its epsilon prediction is ``(x_t - a E[y | x_t]) / s``. A diffusion model that reaches this
optimum reproduces its training set: sampled with DDIM it returns training points, so without a
shield most samples are copies. That makes it the honest worst case for testing a copyright
shield, and a model whose every output can be checked by hand.

``MemorizerUNet`` is a real diffusers model (ModelMixin + ConfigMixin, saved with
``save_pretrained`` and loaded with ``from_pretrained``) with the interface pipelines expect of a
UNet: ``config.in_channels``, ``config.sample_size`` and ``forward(sample, timestep).sample``.
``MemorizerPipeline`` samples it with any scheduler and decodes through an optional VAE.

Schedulers it works with (tested: it returns its training points under each):

- ``prediction_type="epsilon"`` (default): the variance-preserving forward process of its
  ``alphas_cumprod``. DDPM, DDIM, DPMSolverMultistep, Euler, EulerAncestral and Heun. The sigma
  schedulers (Euler, Heun, ...) scale the input by ``scale_model_input`` to ``a x0 + s eps`` and
  pass fractional timesteps; abar at a fractional t is read the way they build their sigmas:
  sigma = sqrt((1 - abar) / abar) linearly interpolated in t (their default
  ``interpolation_type="linear"``), so that the model and the scheduler agree on the noise
  level. (Karras sigmas are rounded to integer timesteps by the schedulers themselves: there the
  agreement is only approximate, as for any model.)
- ``prediction_type="flow"``: rectified flow ``x_t = (1 - sig) x0 + sig eps`` with
  ``sig = t / num_train_timesteps`` and the velocity output ``eps - x0`` (SD3/Flux convention),
  for FlowMatchEulerDiscrete.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.models.unets.unet_2d import UNet2DOutput


class MemorizerUNet(ModelMixin, ConfigMixin):
    """Epsilon prediction of the exact posterior mean over ``latents`` (N, C, H, W)."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        num_latents: int,
        in_channels: int,
        sample_size: int,
        num_train_timesteps: int = 1000,
        encoder: str = "pixels",
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        if prediction_type not in ("epsilon", "flow"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'flow', got {prediction_type!r}")
        self.register_buffer("latents", torch.zeros(num_latents, in_channels, sample_size, sample_size))
        # Cumulative alphas of the training schedule, so that timestep t means the same here as
        # in the scheduler (the pipeline saves both from one config).
        self.register_buffer("alphas_cumprod", torch.ones(num_train_timesteps))

    @classmethod
    def from_latents(cls, latents: torch.Tensor, alphas_cumprod: torch.Tensor, encoder: str = "pixels",
                     prediction_type: str = "epsilon"):
        if latents.ndim != 4 or latents.shape[2] != latents.shape[3]:
            raise ValueError(f"latents must be (N, C, S, S), got {tuple(latents.shape)}")
        n, c, s, _ = latents.shape
        model = cls(num_latents=n, in_channels=c, sample_size=s, num_train_timesteps=len(alphas_cumprod), encoder=encoder,
                    prediction_type=prediction_type)
        model.latents.copy_(latents)
        model.alphas_cumprod.copy_(alphas_cumprod)
        return model

    def alpha_bar(self, timestep, batch: int, device) -> torch.Tensor:
        """abar_t for each row, float64 (B,); ``timestep`` is a scalar or one per row.

        Integer t: ``alphas_cumprod[t]``. Fractional t: sigma interpolated linearly between the
        neighbouring integer timesteps, as the sigma schedulers do, and abar = 1 / (1 + sigma^2).
        """
        last = len(self.alphas_cumprod) - 1
        t = torch.as_tensor(timestep, device=device).reshape(-1).to(torch.float64).clamp(0, last)
        table = self.alphas_cumprod.to(device=device, dtype=torch.float64)
        low = t.floor().long()
        high = t.ceil().long()
        frac = t - low
        sigmas = ((1.0 - table) / table).sqrt()
        sigma = sigmas[low] * (1 - frac) + sigmas[high] * frac
        abar = torch.where(frac == 0, table[low], 1.0 / (1.0 + sigma * sigma))
        return abar.expand(batch) if abar.numel() == 1 else abar

    def signal_noise(self, timestep, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) per row with x_t = a y + s eps, float64 (B,)."""
        if self.config.prediction_type == "flow":
            sigma = torch.as_tensor(timestep, device=device).reshape(-1).to(torch.float64) / self.config.num_train_timesteps
            sigma = sigma.expand(batch) if sigma.numel() == 1 else sigma
            return 1.0 - sigma, sigma
        abar = self.alpha_bar(timestep, batch, device)
        return abar.sqrt(), (1.0 - abar).sqrt()

    def posterior_mean(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """E[y | x_t] for each row of ``sample`` (B, C, H, W), computed in float64."""
        batch = sample.shape[0]
        a, s = self.signal_noise(timestep, batch, sample.device)
        a = a.unsqueeze(1)
        s2 = (s * s).unsqueeze(1)
        x = sample.to(torch.float64).reshape(batch, -1)
        y = self.latents.to(torch.float64).reshape(self.latents.shape[0], -1)
        # ||x - a y||^2 = ||x||^2 - 2 a x.y + a^2 ||y||^2, in float64: at late steps s^2 is tiny
        # and these logits span thousands; the softmax then is a clean argmax.
        sq = (x * x).sum(1, keepdim=True) - 2 * a * (x @ y.T) + (a * a) * (y * y).sum(1).unsqueeze(0)
        weights = torch.softmax(-sq / (2 * s2), dim=1)
        return (weights @ y).reshape(sample.shape)

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True, **_unused):
        a, s = (v.reshape(-1, 1, 1, 1) for v in self.signal_noise(timestep, sample.shape[0], sample.device))
        mean = self.posterior_mean(sample, timestep)
        x = sample.to(torch.float64)
        if self.config.prediction_type == "flow":
            out = (x - mean) / s  # eps - y, with eps = (x - (1 - sig) y) / sig
        else:
            out = (x - a * mean) / s  # eps
        out = out.to(sample.dtype)
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)


class MemorizerPipeline(DiffusionPipeline):
    """Unconditional sampling of a MemorizerUNet, decoded through ``vae`` when there is one.

    Returns images in [0, 1] (``output_type="np"`` or ``"pt"``) or the final latents
    (``output_type="latent"``). ``generator`` may be a list with one generator per sample, so
    that each sample's noise depends only on its own seed.
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: MemorizerUNet, scheduler, vae=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator=None,
        num_inference_steps: int = 50,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        **scheduler_kwargs,
    ):
        config = self.unet.config
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for a batch of {batch_size}")
        latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        scale_input = getattr(self.scheduler, "scale_model_input", lambda x, t: x)  # flow matching has none
        # Per-sample generators reach the scheduler too (DDPM's variance noise), where it takes them.
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            scheduler_kwargs = {"generator": generator, **scheduler_kwargs}
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = scale_input(latents, t)
            eps = self.unet(model_input, t).sample
            latents = self.scheduler.step(eps, t, latents, **scheduler_kwargs).prev_sample
            if callback_on_step_end is not None:
                outputs = callback_on_step_end(self, i, t, {k: locals()[k] for k in callback_on_step_end_tensor_inputs})
                latents = outputs.pop("latents", latents)
        if output_type == "latent":
            images = latents
        else:
            if self.vae is not None:
                scaling = getattr(self.vae.config, "scaling_factor", 1.0) or 1.0
                shift = getattr(self.vae.config, "shift_factor", None) or 0.0
                decoded = self.vae.decode((latents / scaling + shift).to(self.vae.dtype)).sample
            else:
                decoded = latents
            images = (decoded.float() / 2 + 0.5).clamp(0, 1)
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
