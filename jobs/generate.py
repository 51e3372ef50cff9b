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
import contextlib
import os
import sys
import time

# validate and GenerateConfig are part of this module's API (demo, tests, benchmarks)
from spellshield import storage
from spellshield.jobs.run_config import GenerateConfig, check_run_dir, config_from_args, resume_config, validate  # noqa: F401
from spellshield.jobs.run_record import (Progress, discard_unstarted, read_run_json, remove_stale_temporaries, run_lock,
                                         write_run_json)
from spellshield.jobs.runtime import progress, ray_cluster
from spellshield.jobs.checks import radius_line
from spellshield.pipeline import config as run_options
from spellshield.workers.units import plan_of

# Ray, torch, pyarrow and the workers are imported inside the functions that run a job: --help
# imports this module, and must stay under 2 s (benchmarks/cli_startup.py, tests/test_cli_help.py).


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--model", default=None, help="diffusers pipeline directory (from_pretrained); required for a new run")
    run.add_argument("--out", default=None, help="run directory to create; required for a new run")
    run.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="finish an interrupted run: skips finished units; other options, if given, must match the run's")
    run.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    run_options.add_arguments(parser)


def start_shield_servers(config: GenerateConfig):
    """Index-shard actors serving the run's index (fail closed: each checks its shards' sha256)."""
    from spellshield.workers.generation import verify_index_files
    from spellshield.workers.index_client import start_index_servers

    placement = config.placement
    verify_index_files(config.shield.index)
    options = {"num_cpus": 0.25, "max_restarts": -1}  # a lost server comes back; its callers' units are retried
    if placement.index_resources:
        options["resources"] = placement.index_resources
    # The config refuses "sharded" with index servers: the servers are the shards.
    return start_index_servers(config.shield.index, parts=placement.index_servers, backend=config.shield.search_backend,
                               device="cpu", actor_options=options)


def generate(config: GenerateConfig) -> dict:
    """Run the planned units of a validated config on Ray actors (Ray must be up); skips finished units.

    Raises UnitFailed when a unit fails ``config.placement.max_unit_attempts`` times (run.json
    then says "failed"), and ShieldUnavailable when index servers cannot start on a sound index.
    """
    import ray

    from spellshield.jobs.unit_pool import UnitFailed, run_units
    from spellshield.workers.generation import GenerationWorker, WorkerRuntime
    from spellshield.workers.unit_writer import unit_done, units_to_run

    placement = config.placement
    units = plan_of(config)
    lease = None
    if storage.is_remote(config.out):
        from spellshield.storage.commit import open_run

        lease = open_run(config.out)  # this driver's lease (a second driver is refused), roll-forward
        todo = [u for u in units if not unit_done(config.out, u.name)]  # committed units only
    else:
        os.makedirs(config.out, exist_ok=True)
        remove_stale_temporaries(config.out)
        todo = units_to_run(config.out, units)  # every unit verified on disk against the plan, whatever run.json says
    info = {"units_total": len(units), "units_done": len(units) - len(todo),
            "samples_total": sum(len(u.samples) for u in units), "resumed_units_skipped": len(units) - len(todo),
            "samples_done": sum(len(u.samples) for u in units) - sum(len(u.samples) for u in todo)}
    write_run_json(config, "running", info)
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
    if config.shield.index and placement.index_servers:
        servers = start_shield_servers(config)
        info["index_servers"] = [{"node": i["node"], "pid": i["pid"], "shards": i["shards"]} for i in servers.server_info()]
    runtime = WorkerRuntime(torch_threads=threads, remote_shield=servers)
    tracker = Progress(config, info)
    try:
        stats = run_units(todo, lambda: actor_cls.remote(config, runtime), count, tracker.unit_done,
                          max_attempts=placement.max_unit_attempts)
    except UnitFailed as exc:
        write_run_json(config, "failed", info, error=str(exc))
        raise
    finally:
        if servers is not None:
            servers.close()
        if lease is not None:
            lease.release()
    info.update(attempts=stats.attempts, retries=stats.retries, actors_replaced=stats.actors_replaced,
                seconds=round(time.time() - tracker.started, 3))
    write_run_json(config, "finished", info)
    return info


def run_job(config: GenerateConfig, address: str | None = None, resume: bool = False, announce: str | None = None) -> dict:
    """A validated run, start to end, as the CLI and ``spellshield.generate`` run it: hold the
    run directory's lock, start Ray, run the units. A failure before any unit is written leaves
    no run behind (the same command can simply be run again); a later one marks the run failed
    and keeps its finished units for ``--resume``."""
    from spellshield.jobs.unit_pool import UnitFailed
    from spellshield.workers.generation import ShieldUnavailable

    remote = storage.is_remote(config.out)
    created = remote or not os.path.exists(config.out)
    # One driver per run: a flock on a local run (released when its holder dies), a lease object
    # with an expiry on an object store (taken in generate()).
    with (contextlib.nullcontext() if remote else run_lock(config.out)):
        if not resume:
            check_run_dir(config.out)  # again, under the lock: another driver may have just started it
        if announce:
            progress(announce)
        try:
            with ray_cluster(address):
                return generate(config)
        except BaseException as exc:
            if not resume and not remote and discard_unstarted(config.out, created):
                if isinstance(exc, (UnitFailed, ShieldUnavailable, RuntimeError, TimeoutError, ConnectionError)):
                    raise FailedStart(f"{first_line(exc)} (nothing was written: run the same command again)") from exc
            raise


class FailedStart(RuntimeError):
    """The run failed before its first unit was written; its directory was cleaned up."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run(args) -> int:
    from spellshield.jobs.unit_pool import UnitFailed
    from spellshield.workers.generation import ShieldUnavailable

    if args.resume is not None:
        remote = storage.is_remote(args.resume)
        # reading a local run while another driver writes it is refused too (a remote one: its lease)
        with (contextlib.nullcontext() if remote else run_lock(args.resume)):
            config = resume_config(args)
            if read_run_json(args.resume).get("status") == "finished":
                from spellshield.workers.unit_writer import missing_units, unit_done

                units = plan_of(config)
                broken = ([(u, ["not committed"]) for u in units if not unit_done(config.out, u.name)] if remote
                          else missing_units(config.out, units))
                if not broken:
                    progress(f"generate: {args.resume} is already finished and every unit is whole on disk; nothing to do")
                    return 0
                progress(f"generate: {args.resume} is marked finished, but {len(broken)} unit(s) are not whole on disk "
                         f"({'; '.join(f'{u.name}: {problems[0]}' for u, problems in broken[:5])}): regenerating them")
    else:
        given = config_from_args(args)
        config = validate(given)
    announce = None if args.resume else radius_line(config.shield.radius, given.shield.radius, config.shield.index)
    try:
        run_job(config, args.address, resume=args.resume is not None, announce=announce)
    except (UnitFailed, ShieldUnavailable, FailedStart) as exc:
        kept = "" if isinstance(exc, FailedStart) else f" (finished units are kept; rerun with --resume {config.out})"
        print(f"spellshield generate: failed: {exc}{kept}", file=sys.stderr)
        return 1
    progress(f"generate: run written to {config.out}")
    return 0


def main(argv=None) -> int:
    from spellshield.jobs.cli import run_single

    return run_single("generate", argv)


if __name__ == "__main__":
    raise SystemExit(main())
