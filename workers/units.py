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
        return f"unit-{self.index:05d}"


@dataclass(frozen=True)
class PromptRequest:
    prompt: str | None
    num_images: int
    seeds: tuple[int, ...] | None = None  # explicit seeds; else base seed + running counter


class PromptsError(ValueError):
    """A prompts file that cannot be read; the message names the line."""


def read_prompts(path: str) -> list[PromptRequest]:
    """JSONL: each line a JSON string, or an object with "prompt" and optional "num_images"/"seeds"."""
    requests = []
    try:
        if storage.is_remote(path):  # a small file: read whole from the object store
            f = io.StringIO(storage.read_bytes(path).decode("utf-8"))
        else:
            f = open(path, encoding="utf-8")
    except OSError as exc:
        raise PromptsError(f"cannot read prompts file {path}: {exc.strerror}") from None
    except (storage.StorageError, UnicodeDecodeError) as exc:
        raise PromptsError(f"cannot read prompts file: {exc}") from None
    with f:
        for number, line in enumerate(f, start=1):
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
            if seeds is not None and not (isinstance(seeds, list) and all(isinstance(s, int) for s in seeds)):
                raise PromptsError(f"{path} line {number}: \"seeds\" must be a list of integers")
            num = value.get("num_images", len(seeds) if seeds else 1)
            if not isinstance(num, int) or num < 1:
                raise PromptsError(f"{path} line {number}: \"num_images\" must be a positive integer")
            if seeds is not None and len(seeds) != num:
                raise PromptsError(f"{path} line {number}: {len(seeds)} seeds for num_images={num}")
            requests.append(PromptRequest(value["prompt"], num, tuple(seeds) if seeds else None))
    if not requests:
        raise PromptsError(f"prompts file {path} has no prompts")
    return requests


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
