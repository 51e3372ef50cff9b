"""The generation worker: one loaded pipeline + shield, turning work units into files.

A plain class (Ray wraps it as an actor in ``jobs.generate``; tests call it directly):

    worker = GenerationWorker(settings)        # loads the pipeline, the index and its encoder
    summary = worker.run_unit(unit)            # samples, checks, writes the unit atomically

Fail closed: if the index cannot be opened or searched, the constructor or ``run_unit`` raises
before anything of the unit is written.

Shield sources, each with its own radius and all optional: the protected index (``index_dir``,
``radius``), the batch siblings of the same prompt (``batch_radius``) and a bounded bank of this
worker's earlier outputs per prompt (``history_radius``, ``history_size``). Every finished
sample is checked exactly against the index and the breach policy (workers.breach) decides
whether it is written, dropped or drawn again with a derived seed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from spellshield.indexing.corpus import encode_png
from spellshield.indexing.encoders import Encoder
from spellshield.indexing.faiss_search import gpu_available as faiss_gpu_available
from spellshield.indexing.manifest import IndexFormatError, read_manifest
from spellshield.indexing.verify import verify_checksums
from spellshield.indexing.search import open_index
from spellshield.pipeline.invoke import sample_images, to_uint8
from spellshield.pipeline.loading import load_pipeline
from spellshield.pipeline.scheduler import ShieldedScheduler, SpellConfig, StepLog
from spellshield.pipeline.sources import BatchSource, HistorySource, IndexSource, SampleRow
from spellshield.workers.breach import RESAMPLED, WRITTEN_ACTIONS, decide, derive_seed, is_breach
from spellshield.workers.final_check import FinalCheck, check_images, prepare_judges
from spellshield.workers.unit_writer import IMAGES_DIR, write_unit
from spellshield.workers.units import SampleSpec, Unit
from spellshield.workers.placement import node_id


@dataclass(frozen=True)
class WorkerSettings:
    model_dir: str
    run_dir: str
    index_dir: str | None = None
    radius: float | None = None
    spell: SpellConfig = field(default_factory=SpellConfig)
    steps: int = 50
    batch_size: int = 8
    search_backend: str = "exact"
    device: str | None = None  # None: cuda when available, else cpu
    torch_threads: int | None = None
    batch_radius: float | None = None  # repel siblings of the same prompt within this radius
    history_radius: float | None = None  # repel earlier outputs of the same prompt within this radius
    history_size: int = 64  # earlier outputs kept per prompt
    on_breach: str = "resample"  # resample | drop | flag (workers.breach)
    off_manifold_breach: bool = True  # an off-manifold output (pipeline.judges) is a breach; False: --allow-off-manifold
    max_attempts: int = 4  # attempts per sample in all, with on_breach=resample
    guidance_scale: float | None = None  # passed to conditional pipelines; None: the pipeline's default
    remote_shield: object | None = None  # index served by shard actors (workers.index_client); None: load it here

    @property
    def run_name(self) -> str:
        return os.path.basename(os.path.normpath(self.run_dir))


def pick_device(requested: str | None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


class ShieldUnavailable(RuntimeError):
    """The shield index cannot be searched as it was built: fail closed, write nothing."""


def verify_index_files(index_dir: str) -> None:
    """Every shard file and id table present with the sha256 the manifest records."""
    try:
        verify_checksums(index_dir, read_manifest(index_dir))
    except IndexFormatError as exc:
        raise ShieldUnavailable(str(exc)) from None


@dataclass(frozen=True)
class Attempt:
    spec: SampleSpec
    attempt: int  # 1-based
    seed: int  # derive_seed(spec.seed, attempt)


@dataclass
class BatchResult:
    attempts: list[Attempt]
    pixels: np.ndarray  # uint8 (B, H, W, 3)
    log: StepLog
    check: FinalCheck | None
    seconds: float  # per sample
    sample_seconds: float  # the whole batch: sampling
    check_seconds: float  # the whole batch: the exact final check


class GenerationWorker:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.device = pick_device(settings.device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        # No "Loading pipeline components" bar from workers: Ray forwards worker output to the
        # driver late and out of order, so a replacement actor's bar could land after the job's
        # last line; the driver prints the job's own progress.
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        self.pipe = load_pipeline(settings.model_dir, device=self.device)
        self.shield = None
        self.encoder = None
        self.history = None
        self.judges = None
        sources = []
        if settings.index_dir is not None:
            if settings.radius is None or not settings.radius > 0:
                raise ValueError(f"a shielded run needs a radius > 0, got {settings.radius!r}")
            if settings.remote_shield is not None:
                self.shield = settings.remote_shield  # its servers checked their shards' sha256 when they started
            else:
                # Fail closed: a shield that is not the one the manifest describes is no shield.
                verify_index_files(settings.index_dir)
                backend_device = self.device
                if settings.search_backend == "faiss" and not faiss_gpu_available():
                    backend_device = "cpu"
                self.shield = open_index(settings.index_dir, backend=settings.search_backend, device=backend_device)
            self.encoder = Encoder(self.shield.manifest.latent.encoder, device=self.device).init()
            self.judges = prepare_judges(self.shield, self.encoder)
            sources.append(IndexSource(self.shield, settings.radius))
        if settings.batch_radius is not None:
            sources.append(BatchSource(settings.batch_radius))
        if settings.history_radius is not None:
            self.history = HistorySource(settings.history_radius, settings.history_size)
            sources.append(self.history)
        self.scheduler = ShieldedScheduler(self.pipe.scheduler, sources, settings.spell)
        self.pipe.scheduler = self.scheduler

    def sample_batch(self, attempts: list[Attempt]) -> BatchResult:
        """Sample one batch of attempts and check every finished image exactly."""
        settings = self.settings
        started = time.time()
        self.scheduler.bind_batch([SampleRow(a.spec.key, a.spec.prompt) for a in attempts])
        extra = {} if settings.guidance_scale is None else {"guidance_scale": settings.guidance_scale}
        images = sample_images(self.pipe, [a.spec.prompt for a in attempts], [a.seed for a in attempts], settings.steps, **extra)
        pixels = to_uint8(images)
        log = self.scheduler.reset_log()
        sampled = time.time()
        check = check_images(pixels, self.encoder, self.shield, settings.radius, self.judges) if self.shield is not None else None
        done = time.time()
        return BatchResult(attempts, pixels, log, check, (done - started) / len(attempts), sampled - started, done - sampled)

    def run_unit(self, unit: Unit) -> dict:
        settings = self.settings
        started = time.time()
        images, hits, samples = [], [], []
        timings = {"sample_seconds": 0.0, "check_seconds": 0.0, "write_seconds": 0.0}
        specs = list(unit.samples)
        for start in range(0, len(specs), settings.batch_size):
            queue = [Attempt(spec, 1, spec.seed) for spec in specs[start : start + settings.batch_size]]
            while queue:
                result = self.sample_batch(queue)
                timings["sample_seconds"] += result.sample_seconds
                timings["check_seconds"] += result.check_seconds
                queue = []
                for row, attempt in enumerate(result.attempts):
                    sample, row_hits = self._rows(unit, result, row)
                    hits += row_hits
                    samples.append(sample)
                    if sample["action"] == RESAMPLED:
                        queue.append(Attempt(attempt.spec, attempt.attempt + 1, derive_seed(attempt.spec.seed, attempt.attempt + 1)))
                    if sample["action"] in WRITTEN_ACTIONS:
                        meta = {k: sample[k] for k in ("sample", "prompt", "seed", "attempt", "unit", "nearest_key",
                                                       "nearest_distance", "inside_shield", "action")}
                        images.append((attempt.spec.key, encode_png(result.pixels[row]), meta))
                        if self.history is not None and result.log.final_sample is not None:
                            self.history.add(attempt.spec.prompt, attempt.spec.key, result.log.final_sample[row])
        t_write = time.time()
        write_unit(settings.run_dir, unit.name, images, hits, samples)
        timings["write_seconds"] = time.time() - t_write
        return {"unit": unit.index, "samples": len(specs), "written": len(images), "attempts": len(samples),
                "hits": len(hits), "seconds": round(time.time() - started, 4), "node": node_id(), "pid": os.getpid(),
                **{k: round(v, 4) for k, v in timings.items()}}

    def _rows(self, unit: Unit, result: BatchResult, row: int) -> tuple[dict, list[dict]]:
        """The sample row of one attempt (action decided here) and its hit rows."""
        settings = self.settings
        attempt = result.attempts[row]
        spec = attempt.spec
        ident = {"run": settings.run_name, "unit": unit.index, "sample": spec.key, "prompt_index": spec.prompt_index,
                 "prompt": spec.prompt, "seed": attempt.seed, "attempt": attempt.attempt}
        row_hits = [h for h in result.log.hits if h.row == row]
        hits = [
            {**ident, "step": h.step, "timestep": h.timestep, "source": h.source, "neighbour_id": h.neighbour_id,
             "neighbour_key": h.neighbour_key, "distance": h.distance, "radius": h.radius, "weight": h.weight,
             "degenerate": h.degenerate, "used": h.used, "iteration": h.iteration, "correction_norm": h.correction_norm,
             "model_output_norm": h.model_output_norm, "delta_norm": h.delta_norm}
            for h in row_hits
        ]
        ratios = [h.correction_norm / h.model_output_norm for h in row_hits if h.model_output_norm > 0]
        check = result.check
        inside = bool(check.inside[row]) if check is not None else None
        judged = judged_columns(check, row)
        breach = is_breach(inside, judged["perceptual_copy"], judged["off_manifold"], settings.off_manifold_breach)
        action = decide(settings.on_breach, breach, attempt.attempt, settings.max_attempts)
        sample = {
            **ident, "nearest_id": None, "nearest_key": None, "nearest_distance": None,
            "radius": settings.radius if self.shield is not None else None, "inside_shield": inside,
            "active_steps": len({h.step for h in row_hits if h.used}), "steps": result.log.steps,
            "max_correction_ratio": max(ratios, default=0.0), "action": action,
            "image": f"{IMAGES_DIR}/{unit.name}.tar#{spec.key}.png" if action in WRITTEN_ACTIONS else None,
            "seconds": result.seconds, **judged,
        }
        if check is not None:
            sample.update(nearest_id=int(check.ids[row]), nearest_key=check.keys[row],
                          nearest_distance=float(check.distances[row]))
        return sample, hits


def judged_columns(check: FinalCheck | None, row: int) -> dict:
    """The sample-row columns of the two extra judges (pipeline.judges) for one row; nulls when
    nothing was judged."""
    if check is None or check.perceptual_copy is None:
        return {"off_manifold": None, "roughness": None, "perceptual_nearest_key": None, "perceptual_distance": None,
                "perceptual_ssim": None, "perceptual_copy": None}
    return {"off_manifold": bool(check.off_manifold[row]), "roughness": float(check.roughness[row]),
            "perceptual_nearest_key": check.perceptual_keys[row], "perceptual_distance": float(check.perceptual_distances[row]),
            "perceptual_ssim": float(check.perceptual_ssim[row]), "perceptual_copy": bool(check.perceptual_copy[row])}
