"""Work units: fixed lists of (prompt, seed), decided before any sampling starts.

A unit's composition depends only on the request (prompts, image counts, base seed, unit
size), never on the number of workers or on retries, so a retried or resumed unit produces the
same samples (edm2 splits seeds over ranks the same way). Sample keys are made from the
sample's position in the plan, never from prompt text, so they are always safe file names.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from spellshield.pipeline.config import MAX_IMAGES, MAX_SEED, GenerateConfig, PromptRequest
from spellshield.workers.run_layout import unit_name
from spellshield import storage


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


class PromptsError(ValueError):
    """A prompts file that cannot be read; the message names the line."""


def read_prompts(path: str, max_images: int = MAX_IMAGES) -> list[PromptRequest]:
    """JSONL: each line a JSON string, or an object with "prompt" and optional "num_images"/"seeds".

    Refused with the line named: invalid UTF-8, not JSON, seeds that are not integers in
    0..MAX_SEED (JSON ``true`` is not a seed), and a running total of images above ``max_images``
    (checked as the lines are read: a huge "num_images" is refused before anything is planned).
    """
    requests = []
    total = 0
    try:
        if storage.is_remote(path):  # a small file: read whole from the object store
            f = io.BytesIO(storage.read_bytes(path))
        else:
            f = open(path, "rb")
    except OSError as exc:
        raise PromptsError(f"cannot read prompts file {path}: {exc.strerror}") from None
    except storage.StorageError as exc:
        raise PromptsError(f"cannot read prompts file: {exc}") from None
    with f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PromptsError(f"{path} line {number} is not valid UTF-8 (byte {exc.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptsError(f"{path} line {number} is not JSON: {exc.msg}") from None
            if isinstance(value, str):
                value = {"prompt": value}
            if not isinstance(value, dict) or not isinstance(value.get("prompt"), str):
                raise PromptsError(f"{path} line {number}: expected a string or an object with a \"prompt\" string")
            seeds = value.get("seeds")
            if seeds is not None and not (isinstance(seeds, list) and all(is_seed(s) for s in seeds)):
                raise PromptsError(f"{path} line {number}: \"seeds\" must be a list of integers in 0..{MAX_SEED}")
            num = value.get("num_images", len(seeds) if seeds else 1)
            if type(num) is not int or num < 1:
                raise PromptsError(f"{path} line {number}: \"num_images\" must be a positive integer")
            if seeds is not None and len(seeds) != num:
                raise PromptsError(f"{path} line {number}: {len(seeds)} seeds for num_images={num}")
            total += num
            if total > max_images:
                raise PromptsError(f"{path} line {number}: {total} images in all so far, over the limit of {max_images} "
                                   f"per run; split the prompts into several runs")
            try:
                requests.append(PromptRequest(value["prompt"], num, tuple(seeds) if seeds else None))
            except ValueError as exc:  # the request's own checks
                raise PromptsError(f"{path} line {number}: {exc}") from None
    if not requests:
        raise PromptsError(f"prompts file {path} has no prompts")
    return requests


def is_seed(value) -> bool:
    """An integer seed in 0..MAX_SEED (bool is an int in Python, but true is not a seed)."""
    return type(value) is int and 0 <= value <= MAX_SEED


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
