"""The generation worker: one loaded pipeline + shield, turning work units into files.

A plain class (Ray wraps it as an actor in ``jobs.generate``; tests call it directly):

    worker = GenerationWorker(config, runtime) # config: a validated GenerateConfig; loads the pipeline, the index
    summary = worker.run_unit(unit)            # samples, checks, writes the unit atomically

Fail closed: if the index cannot be opened or searched, the constructor or ``run_unit`` raises
before anything of the unit is written.

Shield sources, each with its own radius and all optional: the protected index (``index_dir``,
``radius``), the batch siblings of the same prompt (``batch_radius``) and a bounded bank of this
worker's earlier outputs per prompt (``history_radius``, ``history_size``). Every finished
sample is checked exactly against the index and the breach policy (pipeline.breach) decides
whether it is written, dropped or drawn again with a derived seed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from spellshield.indexing.corpus import encode_png
from spellshield.indexing.encoders import Encoder
from spellshield.indexing.faiss_search import gpu_available as faiss_gpu_available
from spellshield.indexing.manifest import IndexFormatError, read_manifest
from spellshield.indexing.verify import verify_checksums
from spellshield.indexing.index_cache import local_index_dir
from spellshield.indexing.search import open_index
from spellshield.pipeline.invoke import sample_images, to_uint8
from spellshield.pipeline.loading import load_pipeline
from spellshield.pipeline.config import GenerateConfig
from spellshield.pipeline.records import AttemptRecord, RowIdentity, hit_row, sample_row
from spellshield.pipeline.scheduler import ShieldedScheduler, StepLog
from spellshield.pipeline.sources import BatchSource, HistorySource, IndexSource, SampleRow
from spellshield.workers.console import quiet_libraries
from spellshield.pipeline.breach import RESAMPLED, WRITTEN_ACTIONS, decide, derive_seed, is_breach
from spellshield.workers.final_check import FinalCheck, check_images, prepare_judges
from spellshield.workers.run_layout import image_ref
from spellshield.workers.unit_writer import write_unit
from spellshield.workers.units import SampleSpec, Unit
from spellshield.workers.placement import node_id
from spellshield.storage.cache import local_dir


@dataclass(frozen=True)
class WorkerRuntime:
    """How this worker runs (not what it samples: that is the run's GenerateConfig)."""

    device: str | None = None  # None: cuda when available, else cpu
    torch_threads: int | None = None
    remote_shield: object | None = None  # index served by shard actors (workers.index_client); None: load it here


def pick_device(requested: str | None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


class ShieldUnavailable(RuntimeError):
    """The shield index cannot be searched as it was built: fail closed, write nothing."""


def verify_index_files(index_dir: str) -> None:
    """Every shard file and id table present with the sha256 the manifest records."""
    try:
        index_dir = local_index_dir(index_dir)  # s3://, gs://: this node's verified cached copy
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
    search: tuple[float, float, float] | None  # the whole batch's (queries, candidates, lists probed): search_totals
    check_seconds: float  # the whole batch: the exact final check


class GenerationWorker:
    def __init__(self, config: GenerateConfig, runtime: WorkerRuntime | None = None):
        runtime = runtime or WorkerRuntime()
        self.config = config
        self.run_name = os.path.basename(os.path.normpath(config.out))
        self.device = pick_device(runtime.device)
        if runtime.torch_threads:
            torch.set_num_threads(runtime.torch_threads)
        quiet_libraries()  # no loading bars, no library warnings unless SPELLSHIELD_VERBOSE=1
        self.pipe = load_pipeline(local_dir(config.model), device=self.device)  # a URI: this node's cache
        shield = config.shield
        self.shield = None
        self.encoder = None
        self.judges = None
        self.history = None
        sources = []
        if shield.index is not None:
            if shield.radius is None:
                raise ValueError("a shielded run needs its radius resolved (jobs.run_config.validate)")
            if runtime.remote_shield is not None:
                self.shield = runtime.remote_shield  # its servers checked their shards' sha256 when they started
            else:
                # Fail closed: a shield that is not the one the manifest describes is no shield.
                verify_index_files(shield.index)
                backend_device = self.device
                if shield.search_backend == "faiss" and not faiss_gpu_available():
                    backend_device = "cpu"
                self.shield = open_index(shield.index, backend=shield.search_backend, device=backend_device)
            self.encoder = Encoder(self.shield.manifest.latent.encoder, device=self.device).init()
            self.judges = prepare_judges(self.shield, self.encoder)
            sources.append(IndexSource(self.shield, shield.radius))
        if shield.batch_radius is not None:
            sources.append(BatchSource(shield.batch_radius))
        if shield.history_radius is not None:
            self.history = HistorySource(shield.history_radius, shield.history_size)
            sources.append(self.history)
        self.scheduler = ShieldedScheduler(self.pipe.scheduler, sources, config.spell)
        self.pipe.scheduler = self.scheduler

    def sample_batch(self, attempts: list[Attempt]) -> BatchResult:
        """Sample one batch of attempts and check every finished image exactly."""
        sampling = self.config.sampling
        started = time.time()
        self.scheduler.bind_batch([SampleRow(a.spec.key, a.spec.prompt) for a in attempts])
        before = search_totals(self.shield)
        extra = {} if sampling.guidance_scale is None else {"guidance_scale": sampling.guidance_scale}
        images = sample_images(self.pipe, [a.spec.prompt for a in attempts], [a.seed for a in attempts], sampling.steps, **extra)
        pixels = to_uint8(images)
        after = search_totals(self.shield)  # before the final check, whose searches are not the shield's
        search = None if before is None or after is None else tuple(b - a for a, b in zip(before, after))
        log = self.scheduler.reset_log()
        sampled = time.time()
        check = (check_images(pixels, self.encoder, self.shield, self.config.shield.radius, self.judges)
                 if self.shield is not None else None)
        done = time.time()
        return BatchResult(attempts, pixels, log, check, (done - started) / len(attempts), sampled - started, search,
                           done - sampled)

    def run_unit(self, unit: Unit) -> dict:
        batch_size = self.config.sampling.batch_size
        started = time.time()
        images, hits, samples = [], [], []
        timings = {"sample_seconds": 0.0, "check_seconds": 0.0, "write_seconds": 0.0}
        specs = list(unit.samples)
        for start in range(0, len(specs), batch_size):
            queue = [Attempt(spec, 1, spec.seed) for spec in specs[start : start + batch_size]]
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
        write_unit(self.config.out, unit.name, images, hits, samples)
        timings["write_seconds"] = time.time() - t_write
        return {"unit": unit.index, "samples": len(specs), "written": len(images), "attempts": len(samples),
                "hits": len(hits), "seconds": round(time.time() - started, 4), "node": node_id(), "pid": os.getpid(),
                **{k: round(v, 4) for k, v in timings.items()}}

    def _rows(self, unit: Unit, result: BatchResult, row: int) -> tuple[dict, list[dict]]:
        """The sample row of one attempt (action decided here) and its hit rows."""
        breach = self.config.breach
        attempt = result.attempts[row]
        spec = attempt.spec
        identity = RowIdentity(run=self.run_name, unit=unit.index, sample=spec.key, prompt_index=spec.prompt_index,
                               prompt=spec.prompt, seed=attempt.seed, attempt=attempt.attempt)
        row_hits = [h for h in result.log.hits if h.row == row]
        hits = [hit_row(identity, h) for h in row_hits]
        ratios = [h.correction_norm / h.model_output_norm for h in row_hits if h.model_output_norm > 0]
        check = result.check
        inside = bool(check.inside[row]) if check is not None else None
        judged = judged_columns(check, row)
        breached = is_breach(inside, judged["perceptual_copy"], judged["off_manifold"], not breach.allow_off_manifold)
        action = decide(breach.on_breach, breached, attempt.attempt, breach.max_attempts)
        sample = sample_row(identity, AttemptRecord(
            nearest_id=int(check.ids[row]) if check is not None else None,
            nearest_key=check.keys[row] if check is not None else None,
            nearest_distance=float(check.distances[row]) if check is not None else None,
            radius=self.config.shield.radius if self.shield is not None else None, inside_shield=inside,
            active_steps=len({h.step for h in row_hits if h.used}), steps=result.log.steps,
            max_correction_ratio=max(ratios, default=0.0), action=action,
            image=image_ref(unit.name, spec.key) if action in WRITTEN_ACTIONS else None,
            seconds=result.seconds, **judged, **search_columns(result.search, len(result.attempts)),
        ))
        return sample, hits


def search_totals(shield) -> tuple[float, float, float] | None:
    """(queries, candidates, lists probed) a local shield has counted so far (a sharded one: its
    parts' candidates and lists for queries of its own); None without a shield, and for index
    servers (their counts are shared by every worker)."""
    if shield is None or shield.backend == "sharded-ray":
        return None
    parts = shield.part_stats() if hasattr(shield, "part_stats") else [shield.stats.to_json()]
    return (float(shield.stats.queries), float(sum(p["candidates"] for p in parts)),
            float(sum(p.get("lists_probed", 0) for p in parts)))


def search_columns(search: tuple[float, float, float] | None, batch: int) -> dict:
    names = ("index_queries", "index_candidates", "index_lists_probed")
    return {n: (None if search is None else v / batch) for n, v in zip(names, search or (None,) * 3)}


def judged_columns(check: FinalCheck | None, row: int) -> dict:
    """The sample-row columns of the two extra judges (pipeline.judges) for one row; nulls when
    nothing was judged."""
    if check is None or check.perceptual_copy is None:
        return {"off_manifold": None, "roughness": None, "perceptual_nearest_key": None, "perceptual_distance": None,
                "perceptual_ssim": None, "perceptual_copy": None}
    return {"off_manifold": bool(check.off_manifold[row]), "roughness": float(check.roughness[row]),
            "perceptual_nearest_key": check.perceptual_keys[row], "perceptual_distance": float(check.perceptual_distances[row]),
            "perceptual_ssim": float(check.perceptual_ssim[row]), "perceptual_copy": bool(check.copy_judged[row])}
