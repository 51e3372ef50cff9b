"""The generation worker: one loaded pipeline + shield, turning work units into files.

A plain class (Ray wraps it as an actor in ``jobs.generate``; tests call it directly):

    worker = GenerationWorker(settings)        # loads the pipeline, the index and its encoder
    summary = worker.run_unit(unit)            # samples, checks, writes the unit atomically

Fail closed: if the index cannot be opened or searched, the constructor or ``run_unit`` raises
before anything of the unit is written.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from indexing.corpus import encode_png
from indexing.encoders import Encoder
from indexing.manifest import file_sha256, read_manifest
from indexing.faiss_search import gpu_available as faiss_gpu_available
from indexing.search import open_index
from pipeline.invoke import sample_images, to_uint8
from pipeline.loading import load_pipeline
from pipeline.scheduler import ShieldedScheduler, SpellConfig
from pipeline.sources import IndexSource
from workers.final_check import check_images
from workers.unit_writer import IMAGES_DIR, write_unit
from workers.units import Unit


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
    manifest = read_manifest(index_dir)
    for shard in manifest.shards:
        for name, expected in ((shard.file, shard.sha256), (shard.ids_file, shard.ids_sha256)):
            path = os.path.join(index_dir, name)
            if not os.path.isfile(path):
                raise ShieldUnavailable(f"index file {path} is missing")
            if file_sha256(path) != expected:
                raise ShieldUnavailable(f"index file {path} does not match its sha256 in the manifest")


class GenerationWorker:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.device = pick_device(settings.device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.pipe = load_pipeline(settings.model_dir, device=self.device)
        self.shield = None
        self.encoder = None
        sources = []
        if settings.index_dir is not None:
            if settings.radius is None or not settings.radius > 0:
                raise ValueError(f"a shielded run needs a radius > 0, got {settings.radius!r}")
            # Fail closed: a shield that is not the one the manifest describes is no shield.
            verify_index_files(settings.index_dir)
            backend_device = self.device
            if settings.search_backend == "faiss" and not faiss_gpu_available():
                backend_device = "cpu"
            self.shield = open_index(settings.index_dir, backend=settings.search_backend, device=backend_device)
            self.encoder = Encoder(self.shield.manifest.latent.encoder, device=self.device).init()
            sources.append(IndexSource(self.shield, settings.radius))
        self.scheduler = ShieldedScheduler(self.pipe.scheduler, sources, settings.spell)
        self.pipe.scheduler = self.scheduler

    def run_unit(self, unit: Unit) -> dict:
        settings = self.settings
        started = time.time()
        images, hits, samples = [], [], []
        timings = {"sample_seconds": 0.0, "check_seconds": 0.0, "write_seconds": 0.0}
        specs = list(unit.samples)
        for start in range(0, len(specs), settings.batch_size):
            batch = specs[start : start + settings.batch_size]
            t0 = time.time()
            pixels = to_uint8(sample_images(self.pipe, [s.prompt for s in batch], [s.seed for s in batch], settings.steps))
            t1 = time.time()
            timings["sample_seconds"] += t1 - t0
            log = self.scheduler.reset_log()
            check = None
            if self.shield is not None:
                check = check_images(pixels, self.encoder, self.shield, settings.radius)
            timings["check_seconds"] += time.time() - t1
            seconds = (time.time() - t0) / len(batch)
            neighbour_keys = self._neighbour_keys(log.hits, batch)
            for row, spec in enumerate(batch):
                row_hits = [h for h in log.hits if h.row == row]
                for h in row_hits:
                    hits.append(
                        {
                            "run": settings.run_name, "unit": unit.index, "sample": spec.key,
                            "prompt_index": spec.prompt_index, "prompt": spec.prompt, "seed": spec.seed, "attempt": 1,
                            "step": h.step, "timestep": h.timestep, "source": h.source,
                            "neighbour_id": h.neighbour_id, "neighbour_key": neighbour_keys[(h.source, h.neighbour_id)],
                            "distance": h.distance, "radius": h.radius, "weight": h.weight, "degenerate": h.degenerate,
                            "used": h.used, "iteration": h.iteration, "correction_norm": h.correction_norm,
                            "model_output_norm": h.model_output_norm, "delta_norm": h.delta_norm,
                        }
                    )
                ratios = [h.correction_norm / h.model_output_norm for h in row_hits if h.model_output_norm > 0]
                image_ref = f"{IMAGES_DIR}/{unit.name}.tar#{spec.key}.png"
                sample = {
                    "run": settings.run_name, "unit": unit.index, "sample": spec.key,
                    "prompt_index": spec.prompt_index, "prompt": spec.prompt, "seed": spec.seed, "attempt": 1,
                    "nearest_id": None, "nearest_key": None, "nearest_distance": None,
                    "radius": settings.radius if self.shield is not None else None, "inside_shield": None,
                    "active_steps": len({h.step for h in row_hits}), "steps": log.steps,
                    "max_correction_ratio": max(ratios, default=0.0), "action": "kept",
                    "image": image_ref, "seconds": seconds,
                }
                if check is not None:
                    sample.update(nearest_id=int(check.ids[row]), nearest_key=check.keys[row],
                                  nearest_distance=float(check.distances[row]), inside_shield=bool(check.inside[row]))
                samples.append(sample)
                meta = {k: sample[k] for k in ("sample", "prompt", "seed", "unit", "nearest_key", "nearest_distance", "inside_shield")}
                images.append((spec.key, encode_png(pixels[row]), meta))
        t_write = time.time()
        write_unit(settings.run_dir, unit.name, images, hits, samples)
        timings["write_seconds"] = time.time() - t_write
        return {"unit": unit.index, "samples": len(samples), "hits": len(hits), "seconds": round(time.time() - started, 4),
                "node": _node_id(), "pid": os.getpid(), **{k: round(v, 4) for k, v in timings.items()}}

    def _neighbour_keys(self, hits, batch) -> dict:
        keys = {}
        index_ids = sorted({h.neighbour_id for h in hits if h.source == "index"})
        if index_ids:
            keys.update({("index", i): k for i, k in zip(index_ids, self.shield.keys(index_ids))})
        for h in hits:
            if h.source == "batch":
                keys[("batch", h.neighbour_id)] = batch[h.neighbour_id].key
        return keys


def _node_id() -> str | None:
    """The Ray node this worker runs on (None outside Ray): recorded per unit in run.json."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None
