"""Work units: fixed lists of (prompt, seed), decided before any sampling starts.

A unit's composition depends only on the request (prompts, image counts, base seed, unit
size), never on the number of workers or on retries, so a retried or resumed unit produces the
same samples (edm2 splits seeds over ranks the same way). Sample keys are made from the
sample's position in the plan, never from prompt text, so they are always safe file names.
"""

from __future__ import annotations

from dataclasses import dataclass

from spellshield.pipeline.config import GenerateConfig, PromptRequest
from spellshield.workers.run_layout import unit_name


@dataclass(frozen=True)
class SampleSpec:
    key: str  # s000000 ...: unique in the run, safe as a file name
    prompt_index: int
    prompt: str | None
    seed: int


@dataclass(frozen=True)
class Unit:
    index: int
    samples: tuple[SampleSpec, ...]

    @property
    def name(self) -> str:
        return unit_name(self.index)


def plan_samples(requests: list[PromptRequest], base_seed: int) -> list[SampleSpec]:
    samples = []
    counter = 0
    for prompt_index, request in enumerate(requests):
        for i in range(request.num_images):
            seed = request.seeds[i] if request.seeds else base_seed + counter
            samples.append(SampleSpec(key=f"s{len(samples):06d}", prompt_index=prompt_index, prompt=request.prompt, seed=seed))
            counter += 1
    return samples


def plan_units(samples: list[SampleSpec], unit_size: int) -> list[Unit]:
    if unit_size < 1:
        raise ValueError(f"unit size must be >= 1, got {unit_size}")
    return [Unit(index=i, samples=tuple(samples[start : start + unit_size]))
            for i, start in enumerate(range(0, len(samples), unit_size))]


def plan_of(config: GenerateConfig) -> list[Unit]:
    """The units of a resolved run config: what generate runs, resume checks and the audit expects."""
    sampling = config.sampling
    return plan_units(plan_samples(list(sampling.requests), sampling.seed), sampling.samples_per_unit)


def plan_from_record(config: dict) -> list[Unit]:
    """The unit plan of a run from its run.json ``config``: the same units ``generate`` planned,
    so the audit can check what is on disk against them."""
    try:
        resolved = GenerateConfig.from_json(config)
        if resolved.sampling.requests is None:
            raise ValueError("no requests")
        return plan_of(resolved)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"run.json's config does not describe a unit plan ({type(exc).__name__}: {exc})") from None
