"""ShieldedScheduler: SPELL as a wrapper around any diffusers scheduler.

A diffusers pipeline hands its (guided) model output to ``scheduler.step(m, t, x_t)``. The
wrapper computes the ``x0_hat`` that this output implies, asks every shield source which
shielded points lie inside their balls, adds ``lam * delta`` (pipeline.repellency) and rewrites
the output so that it implies the corrected ``x0_hat'`` for the same ``x_t`` (DESIGN.md's
table, pipeline.parametrisation). Then the wrapped scheduler steps as usual, so the correction
costs no network call and works under classifier-free guidance, because the pipeline has
already combined the conditional and unconditional outputs.

Rows with no hit are passed through untouched: the step is bit-for-bit the wrapped
scheduler's. Every hit is recorded (``records``) for the audit log; the wrapper never writes
files.

Step counting: a hit's ``step`` is the 0-based number of the ``step`` call since
``set_timesteps``, i.e. the pipeline's loop index over ``scheduler.timesteps`` (what
``callback_on_step_end`` receives as ``i``). For one-call-per-step schedulers that is the
denoising step. Heun calls the model twice per denoising step (its ``timesteps`` interleave a
predictor and a corrector call); each call is a ``step`` call and is corrected on its own
``x0_hat``, so a K-step Heun run has 2K - 1 step indices and the ``timestep`` column tells the
two calls of one denoising step apart.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .config import SpellConfig  # noqa: F401  (declared with the other parts of a run's config)
from .parametrisation import affine_for
from .records import HitRecord
from .repellency import repel
from .sources import SampleRow, ShieldSource


@dataclass
class StepLog:
    """What the wrapper saw during one sampling call (from set_timesteps to the last step)."""

    hits: list[HitRecord] = field(default_factory=list)
    steps: int = 0
    final_sample: torch.Tensor | None = None  # prev_sample of the last step call: the finished latents


class ShieldedScheduler:
    """Wrap ``scheduler`` so that every ``step`` applies the SPELL correction.

    Everything but ``step`` and ``set_timesteps`` is forwarded to the wrapped scheduler, so a
    pipeline can use it wherever it uses a scheduler: ``pipe.scheduler = ShieldedScheduler(
    pipe.scheduler, sources)``. ``bind_batch(rows)`` before a sampling call tells the sources
    that need it (batch, history) which sample and prompt each batch row is.
    """

    _own = ("inner", "sources", "spell", "log", "rows", "_step_index")

    def __init__(self, scheduler, sources: list[ShieldSource], spell: SpellConfig | None = None):
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"shield source names must be unique, got {names}")
        object.__setattr__(self, "inner", scheduler)
        object.__setattr__(self, "sources", list(sources))
        object.__setattr__(self, "spell", spell or SpellConfig())
        object.__setattr__(self, "log", StepLog())
        object.__setattr__(self, "rows", None)
        object.__setattr__(self, "_step_index", 0)
        # Keep the wrapped signatures visible: pipelines inspect them (retrieve_timesteps looks
        # for "sigmas" in set_timesteps; prepare_extra_step_kwargs passes "generator" and "eta"
        # to step only where its signature names them).
        def set_timesteps(*args, **kwargs):
            return self._set_timesteps(*args, **kwargs)

        def step(*args, **kwargs):
            return self._step(*args, **kwargs)

        functools.update_wrapper(set_timesteps, scheduler.set_timesteps)
        functools.update_wrapper(step, scheduler.step)
        object.__setattr__(self, "set_timesteps", set_timesteps)
        object.__setattr__(self, "step", step)

    # -- forwarding -------------------------------------------------------------------------
    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "inner"), name)

    def __setattr__(self, name, value):
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def __len__(self):
        return len(self.inner)

    def _set_timesteps(self, *args, **kwargs):
        self._step_index = 0
        self.log = StepLog()
        return self.inner.set_timesteps(*args, **kwargs)

    def reset_log(self) -> StepLog:
        """Return the log of the finished sampling call and start an empty one."""
        log, self.log = self.log, StepLog()
        return log

    def bind_batch(self, rows: list[SampleRow] | None) -> None:
        """Who the rows of the next sampling call are (None: anonymous rows, one group)."""
        self.rows = list(rows) if rows is not None else None
        for source in self.sources:
            if hasattr(source, "bind"):
                source.bind(self.rows)

    # -- the correction ---------------------------------------------------------------------
    def _step(self, model_output, timestep, sample, *args, **kwargs):
        step_index = self._step_index
        self._step_index += 1
        self.log.steps = self._step_index
        if self.sources:
            model_output = self.correct(model_output, timestep, sample, step_index, kwargs)
        result = self.inner.step(model_output, timestep, sample, *args, **kwargs)
        self.log.final_sample = result.prev_sample if hasattr(result, "prev_sample") else result[0]
        return result

    def correct(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, step_index: int,
                step_kwargs: dict | None = None):
        """The output that implies x0_hat + lam * delta, rows without a hit unchanged.

        Iteration i searches every source around the current x0_hat, adds lam * delta and, if
        anything was inside, searches again (overlapping balls can cancel each other's push:
        the paper's stated limitation), up to ``correction_iterations`` times.
        """
        affine = affine_for(self.inner, timestep, sample, model_output, step_kwargs)
        batch = model_output.shape[0]
        sources = self.absorbing_sources(affine, model_output[0].numel())
        if not sources:
            return model_output
        m = model_output.to(torch.float32).reshape(batch, -1)
        x_t = sample.to(torch.float32).reshape(batch, -1)
        x0 = affine.x0_from_output(m, x_t).to(torch.float64)
        x0_start = x0.clone()
        # x_t - x0_hat: a per-sample direction for the degenerate case x0_hat == z (see repel()).
        noise_direction = x_t.to(torch.float64) - x0
        pending: list[dict] = []
        corrected = torch.zeros(batch, dtype=torch.bool, device=x0.device)
        lam = self.spell.overcompensation
        limit = self.spell.max_neighbours
        t_value = float(timestep.item() if torch.is_tensor(timestep) else timestep)
        for iteration in range(self.spell.correction_iterations):
            delta = torch.zeros_like(x0)
            any_hit = False
            queries = x0.to(torch.float32)
            for source in sources:
                for row, found in enumerate(source.find(queries)):
                    k = found.ids.numel()
                    if k == 0:
                        continue
                    any_hit = True
                    used = k if limit is None else min(k, limit)
                    rep = repel(x0[row], found.vectors[:used], source.radius, noise_direction[row])
                    delta[row] += rep.delta
                    corrected[row] = True
                    for j in range(k):
                        inside = j < used
                        pending.append(dict(
                            row=row, source=source, neighbour_id=int(found.ids[j]),
                            distance=float(rep.distances[j]) if inside else float(found.distances[j]),
                            radius=source.radius,
                            weight=float(rep.weights[j]) if inside else 0.0,
                            degenerate=bool(rep.degenerate[j]) if inside else False,
                            used=inside, iteration=iteration,
                        ))
            if not any_hit:
                break
            x0 = x0 + lam * delta
        if not bool(corrected.any()):
            return model_output
        new_m = torch.where(corrected.unsqueeze(1), affine.output_from_x0(x0.to(torch.float32), x_t), m)
        correction_norm = torch.linalg.vector_norm(new_m - m, dim=1)
        output_norm = torch.linalg.vector_norm(m, dim=1)
        delta_norm = torch.linalg.vector_norm(x0 - x0_start, dim=1)
        keys = self._neighbour_keys(pending)
        for hit in pending:
            r, source = hit["row"], hit.pop("source")
            self.log.hits.append(HitRecord(
                step=step_index, timestep=t_value, source=source.name,
                neighbour_key=keys[(source.name, hit["neighbour_id"])],
                correction_norm=float(correction_norm[r]), model_output_norm=float(output_norm[r]),
                delta_norm=float(delta_norm[r]), **hit,
            ))
        # Only corrected rows change; the others keep the exact original tensor values.
        out = model_output.clone()
        out[corrected] = new_m[corrected].reshape(-1, *model_output.shape[1:]).to(model_output.dtype)
        return out

    def absorbing_sources(self, affine, dim: int) -> list[ShieldSource]:
        """The sources whose balls a push at this step can still carry a sample out of: those
        with radius <= noise left in x_t / min_noise_radii (SpellConfig.min_noise_radii)."""
        floor = self.spell.min_noise_radii
        if floor == 0 or affine.noise_scale is None:
            return self.sources
        noise = affine.noise_scale * math.sqrt(dim)
        return [s for s in self.sources if noise >= floor * s.radius]

    @staticmethod
    def _neighbour_keys(pending: list[dict]) -> dict:
        by_source: dict[str, tuple] = {}
        for hit in pending:
            source = hit["source"]
            by_source.setdefault(source.name, (source, set()))[1].add(hit["neighbour_id"])
        keys = {}
        for name, (source, ids) in by_source.items():
            ordered = sorted(ids)
            names = source.keys(ordered) if hasattr(source, "keys") else [None] * len(ordered)
            keys.update({(name, i): k for i, k in zip(ordered, names)})
        return keys
