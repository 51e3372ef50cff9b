"""generate: sample a diffusers pipeline on a pool of Ray actors, shielded by SPELL.

    spellshield generate --model MODEL_DIR --out RUN_DIR [--index INDEX_DIR] [--radius R]
                         [--num-images N | --prompts FILE.jsonl] [--batch-size B] [--steps K] [--seed S]

Everything is validated before anything is written: the model directory, the index and its fit
to the model (latent shape, encoder), the radius, the prompts file, the run directory. Then the
work units are planned, ``run.json`` is written, and the units are spread over the actors; each
unit writes its own files atomically (workers.unit_writer). The options and their validation
live in jobs.run_config, run.json and the progress in jobs.run_record, the retries in
jobs.unit_pool; this module places the actors and runs the units.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace

from spellshield.indexing.search import BACKENDS
# validate, GenerateConfig and DEFAULT_SPELL are part of this module's API (demo, tests, benchmarks)
from spellshield.jobs.run_config import ARG_NAMES, DEFAULT_SPELL, GenerateConfig, resume_config, validate  # noqa: F401
from spellshield.jobs.run_record import Progress, read_run_json, remove_stale_temporaries, write_run_json
from spellshield.jobs.runtime import UsageError, progress, ray_cluster
from spellshield.jobs.unit_pool import UnitFailed, run_units
from spellshield.workers.breach import POLICIES
from spellshield.workers.generation import ShieldUnavailable, WorkerSettings
from spellshield.workers.unit_writer import unit_done
from spellshield.workers.units import plan_samples, plan_units


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="diffusers pipeline directory (from_pretrained); required for a new run")
    parser.add_argument("--out", default=None, help="run directory to create; required for a new run")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="finish an interrupted run: skips finished units; other options, if given, must match the run's")
    parser.add_argument("--index", default=None, help="shield index directory; without it the run is unshielded")
    parser.add_argument("--radius", type=float, default=None, help="shield radius (default: the index's suggested radius)")
    parser.add_argument("--overcompensation", type=float, default=DEFAULT_SPELL.overcompensation,
                        help=f"lam in x0' = x0 + lam * delta (default {DEFAULT_SPELL.overcompensation}; see README)")
    parser.add_argument("--max-neighbours", type=int, default=None,
                        help="at most K hits per source and query enter the correction (SPELL-K; default all)")
    parser.add_argument("--correction-iterations", type=int, default=DEFAULT_SPELL.correction_iterations,
                        help=f"re-check x0' and correct again, up to M times per step (default {DEFAULT_SPELL.correction_iterations})")
    parser.add_argument("--batch-radius", type=float, default=None,
                        help="also repel the other samples of the same prompt in the batch within this radius (diversity)")
    parser.add_argument("--history-radius", type=float, default=None,
                        help="also repel this worker's earlier outputs of the same prompt within this radius")
    parser.add_argument("--history-size", type=int, default=64, help="earlier outputs kept per prompt (default 64)")
    parser.add_argument("--on-breach", default="resample", choices=list(POLICIES),
                        help="a finished sample inside the shield is drawn again with a derived seed (resample, "
                             "default), not written (drop), or written and flagged (flag)")
    parser.add_argument("--max-attempts", type=int, default=4,
                        help="attempts per sample in all with --on-breach resample; then it is dropped (default 4)")
    parser.add_argument("--allow-off-manifold", action="store_true",
                        help="write off-manifold outputs (far from the corpus or rough as noise) instead of treating "
                             "them as a breach (README: Judges)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance scale of conditional pipelines (default: the pipeline's)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num-images", type=int, default=None, help="unconditional: this many images (default 16)")
    group.add_argument("--prompts", default=None, help="JSONL: a string or {\"prompt\", \"num_images\", \"seeds\"} per line")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per pipeline call")
    parser.add_argument("--unit-size", type=int, default=None, help="samples per work unit (default 4 batches)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample i uses seed + i")
    parser.add_argument("--workers", type=int, default=None, help="generation actors (default: one per GPU, else 1)")
    parser.add_argument("--search-backend", default="exact", choices=list(BACKENDS),
                        help="index search backend (README: Search backends)")
    parser.add_argument("--worker-resources", default=None, metavar="JSON",
                        help="Ray custom resources each generation actor asks for, e.g. '{\"node_b\": 0.01}'")
    parser.add_argument("--index-servers", type=int, default=0,
                        help="serve the index from this many index-shard actors instead of loading it in every worker")
    parser.add_argument("--index-resources", default=None, metavar="JSON",
                        help="Ray custom resources each index-shard actor asks for (placement on a node)")
    parser.add_argument("--max-unit-attempts", type=int, default=3,
                        help="attempts per work unit before the job fails (a dead worker or an unsearchable shield)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")


def worker_settings(config: GenerateConfig, torch_threads: int | None) -> WorkerSettings:
    return WorkerSettings(
        model_dir=config.model, run_dir=config.out, index_dir=config.index, radius=config.radius, spell=config.spell,
        steps=config.steps, batch_size=config.batch_size, search_backend=config.search_backend, torch_threads=torch_threads,
        batch_radius=config.batch_radius, history_radius=config.history_radius, history_size=config.history_size,
        on_breach=config.on_breach, max_attempts=config.max_attempts, guidance_scale=config.guidance_scale,
        off_manifold_breach=config.off_manifold_breach,
    )


@dataclass(frozen=True)
class Placement:
    """Where the job's actors run and how hard it retries; none of it changes a sample."""

    workers: int | None = None  # generation actors (default: one per GPU, else 1)
    worker_resources: dict | None = None  # Ray custom resources each generation actor asks for
    index_servers: int = 0  # shield served by this many index-shard actors (0: each worker loads it)
    index_resources: dict | None = None  # Ray custom resources each index-shard actor asks for
    max_unit_attempts: int = 3


def parse_resources(flag: str, text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} is not JSON: {exc.msg}") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
        raise UsageError(f"{flag} must be a JSON object of positive amounts, e.g. '{{\"node_b\": 0.01}}'")
    return value


def start_shield_servers(config: GenerateConfig, placement: Placement, gpus: int):
    """Index-shard actors serving the run's index (fail closed: each checks its shards' sha256)."""
    from spellshield.workers.generation import verify_index_files
    from spellshield.workers.index_client import start_index_servers

    verify_index_files(config.index)
    options = {"num_cpus": 0.25, "max_restarts": -1}  # a lost server comes back; its callers' units are retried
    if placement.index_resources:
        options["resources"] = placement.index_resources
    backend = config.search_backend if config.search_backend in ("exact", "faiss", "projected") else "exact"
    return start_index_servers(config.index, parts=placement.index_servers, backend=backend, device="cpu",
                               actor_options=options)


def generate(config: GenerateConfig, placement: Placement | None = None, args: dict | None = None) -> dict:
    """Python API: run the planned units on Ray actors (Ray must be up); skips finished units.

    Raises UnitFailed when a unit fails ``placement.max_unit_attempts`` times (run.json then
    says "failed"), and ShieldUnavailable when index servers cannot start on a sound index.
    """
    import ray

    from spellshield.workers.generation import GenerationWorker

    placement = placement or Placement()
    args = args if args is not None else {}
    units = plan_units(plan_samples(list(config.requests), config.seed), config.unit_size)
    os.makedirs(config.out, exist_ok=True)
    remove_stale_temporaries(config.out)
    todo = [u for u in units if not unit_done(config.out, u.name)]
    info = {"units_total": len(units), "units_done": len(units) - len(todo),
            "samples_total": sum(len(u.samples) for u in units), "resumed_units_skipped": len(units) - len(todo)}
    write_run_json(config, "running", info, args)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    count = placement.workers or (gpus if gpus else 1)
    # A fraction of a CPU per actor: a whole one each starves Ray on small machines. SPREAD puts
    # the actors on different nodes when there are several.
    options = {"num_gpus": 1, "num_cpus": 0.25} if gpus else {"num_cpus": 0.5}
    if placement.worker_resources:
        options["resources"] = placement.worker_resources
    threads = None if gpus else max(1, cpus // max(count, 1))
    actor_cls = ray.remote(GenerationWorker).options(max_restarts=0, scheduling_strategy="SPREAD", **options)
    servers = None
    if config.index and placement.index_servers:
        servers = start_shield_servers(config, placement, gpus)
        info["index_servers"] = [{"node": i["node"], "pid": i["pid"], "shards": i["shards"]} for i in servers.server_info()]
    settings = replace(worker_settings(config, threads), remote_shield=servers)
    tracker = Progress(config, args, info)
    try:
        stats = run_units(todo, lambda: actor_cls.remote(settings), count, tracker.unit_done,
                          max_attempts=placement.max_unit_attempts)
    except UnitFailed as exc:
        write_run_json(config, "failed", info, args, error=str(exc))
        raise
    finally:
        if servers is not None:
            servers.close()
    info.update(attempts=stats.attempts, retries=stats.retries, actors_replaced=stats.actors_replaced,
                seconds=round(time.time() - tracker.started, 3))
    write_run_json(config, "finished", info, args)
    return info


def run(args) -> int:
    if args.max_unit_attempts < 1:
        raise UsageError(f"--max-unit-attempts must be >= 1, got {args.max_unit_attempts}")
    if args.index_servers < 0:
        raise UsageError(f"--index-servers must be >= 0, got {args.index_servers}")
    placement = Placement(workers=args.workers, worker_resources=parse_resources("--worker-resources", args.worker_resources),
                          index_servers=args.index_servers,
                          index_resources=parse_resources("--index-resources", args.index_resources),
                          max_unit_attempts=args.max_unit_attempts)
    if args.resume is not None:
        config, saved_args = resume_config(args)
        if read_run_json(args.resume).get("status") == "finished":
            progress(f"generate: {args.resume} is already finished; nothing to do")
            return 0
    else:
        config = validate(args)
        saved_args = {k: getattr(args, k) for k in ARG_NAMES}
        for key in ("model", "out", "index", "prompts"):  # so that --resume works from any directory
            if saved_args[key] is not None:
                saved_args[key] = os.path.abspath(saved_args[key])
    if placement.index_servers and not config.index:
        raise UsageError("--index-servers needs --index")
    with ray_cluster(args.address):
        try:
            generate(config, placement, saved_args)
        except (UnitFailed, ShieldUnavailable) as exc:
            print(f"spellshield generate: failed: {exc} (finished units are kept; "
                  f"rerun with --resume {config.out})", file=sys.stderr)
            return 1
    progress(f"generate: run written to {config.out}")
    return 0


def main(argv=None) -> int:
    from spellshield.jobs.cli import run_single

    return run_single("generate", argv)


if __name__ == "__main__":
    raise SystemExit(main())
