"""generate: sample a diffusers pipeline on a pool of Ray actors, shielded by SPELL.

    spellshield generate --model MODEL_DIR --out RUN_DIR [--index INDEX_DIR] [--radius R]
                         [--num-images N | --prompts FILE.jsonl] [--batch-size B] [--steps K] [--seed S]

Everything is validated before anything is written: the model directory, the index and its fit
to the model (latent shape, encoder), the radius, the prompts file, the run directory. Then the
work units are planned, ``run.json`` is written, and the units are spread over the actors; each
unit writes its own files atomically (workers.unit_writer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace

from indexing.encoders import autoencoder_fingerprint
from indexing.manifest import manifest_hash, read_manifest, write_json_atomic
from indexing.search import BACKENDS
from jobs.runtime import UsageError, progress, ray_cluster
from jobs.unit_pool import UnitFailed, run_units
from pipeline.invoke import takes_prompt
from pipeline.loading import ModelDirError, describe_model, pipeline_class
from pipeline.scheduler import SpellConfig
from workers.breach import POLICIES
from workers.generation import ShieldUnavailable, WorkerSettings
from workers.unit_writer import unit_done
from workers.units import PromptRequest, PromptsError, plan_samples, plan_units, read_prompts

RUN_FILE = "run.json"
RUN_FORMAT = 1
DEFAULT_SPELL = SpellConfig()


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


@dataclass(frozen=True)
class GenerateConfig:
    model: str
    out: str
    index: str | None
    radius: float | None
    spell: SpellConfig
    requests: tuple[PromptRequest, ...]
    batch_size: int
    unit_size: int
    steps: int
    seed: int
    search_backend: str
    batch_radius: float | None = None
    history_radius: float | None = None
    history_size: int = 64
    on_breach: str = "resample"
    max_attempts: int = 4
    guidance_scale: float | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["requests"] = [asdict(r) for r in self.requests]
        return d

    def digest(self) -> str:
        payload = {k: v for k, v in self.to_json().items() if k != "out"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _positive(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")


ARG_NAMES = ("model", "out", "index", "radius", "overcompensation", "max_neighbours", "correction_iterations",
             "batch_radius", "history_radius", "history_size", "on_breach", "max_attempts", "guidance_scale",
             "num_images", "prompts", "batch_size", "unit_size", "steps", "seed", "search_backend")


def validate(args, check_out: bool = True) -> GenerateConfig:
    """Every check that can fail on bad input, before anything is written."""
    if not args.model or not args.out:
        raise UsageError("--model and --out are required (or --resume RUN_DIR)")
    try:
        model = describe_model(args.model)
        conditional = takes_prompt(pipeline_class(model))
    except ModelDirError as exc:
        raise UsageError(str(exc)) from None
    if args.num_images is not None and args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    for name in ("batch_size", "steps"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--unit-size", args.unit_size, allow_none=True)
    _positive("--workers", getattr(args, "workers", None), allow_none=True)
    for name in ("radius", "batch_radius", "history_radius"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    _positive("--history-size", getattr(args, "history_size", 64))
    _positive("--max-attempts", getattr(args, "max_attempts", 4))
    on_breach = getattr(args, "on_breach", "resample")
    if on_breach not in POLICIES:
        raise UsageError(f"--on-breach must be one of {', '.join(POLICIES)}, got {on_breach!r}")
    try:
        spell = SpellConfig(args.overcompensation, args.max_neighbours, args.correction_iterations)
    except ValueError as exc:
        message = str(exc)
        for name in ("overcompensation", "max_neighbours", "correction_iterations"):
            message = message.replace(name, "--" + name.replace("_", "-"))
        raise UsageError(message) from None
    radius = None
    if args.index is not None:
        manifest = read_manifest(args.index)
        if tuple(manifest.latent.shape) != tuple(model.latent_shape):
            raise UsageError(
                f"index latent shape {tuple(manifest.latent.shape)} differs from the model's {tuple(model.latent_shape)}"
            )
        model_encoder = autoencoder_fingerprint(model.vae_path) if model.vae_path else "pixels"
        if manifest.latent.fingerprint != model_encoder:
            raise UsageError(
                f"index encoder {manifest.latent.encoder!r} is not the model's "
                f"({'its VAE at ' + model.vae_path if model.vae_path else 'pixel space'})"
            )
        radius = args.radius if args.radius is not None else manifest.suggested_radius
        if radius is None:
            raise UsageError("the index has no suggested radius; pass --radius")
    elif args.radius is not None:
        raise UsageError("--radius needs --index")
    if args.prompts is not None:
        try:
            requests = tuple(read_prompts(args.prompts))
        except PromptsError as exc:
            raise UsageError(str(exc)) from None
        if not conditional:
            raise UsageError(f"{model.pipeline_class} is unconditional: use --num-images, not --prompts")
    else:
        requests = (PromptRequest(None, args.num_images if args.num_images is not None else 16),)
    guidance_scale = getattr(args, "guidance_scale", None)
    if guidance_scale is not None and not conditional:
        raise UsageError(f"{model.pipeline_class} is unconditional: it takes no --guidance-scale")
    if check_out:
        check_run_dir(args.out)
    return GenerateConfig(
        model=os.path.abspath(args.model),
        out=os.path.abspath(args.out),
        index=os.path.abspath(args.index) if args.index else None,
        radius=radius,
        spell=spell,
        requests=requests,
        batch_size=args.batch_size,
        unit_size=args.unit_size or 4 * args.batch_size,
        steps=args.steps,
        seed=args.seed,
        search_backend=args.search_backend,
        batch_radius=getattr(args, "batch_radius", None),
        history_radius=getattr(args, "history_radius", None),
        history_size=getattr(args, "history_size", 64),
        on_breach=on_breach,
        max_attempts=getattr(args, "max_attempts", 4),
        guidance_scale=guidance_scale,
    )


def check_run_dir(path: str) -> None:
    run_file = os.path.join(path, RUN_FILE)
    if os.path.isfile(run_file):
        try:
            with open(run_file) as f:
                status = json.load(f).get("status")
        except (OSError, json.JSONDecodeError):
            status = "unreadable"
        if status == "finished":
            raise UsageError(f"{path} already holds a finished run; choose another --out")
        raise UsageError(f"{path} holds an unfinished run (status {status}); finish it with --resume {path}")
    if os.path.isfile(path):
        raise UsageError(f"{path} is a file, not a directory")
    if os.path.isdir(path) and os.listdir(path):
        raise UsageError(f"{path} is not empty; choose a new or empty directory")


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("spellshield", "torch", "diffusers", "ray", "faiss-cpu", "pyarrow", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def write_run_json(config: GenerateConfig, status: str, progress_info: dict, args: dict, error: str | None = None) -> None:
    payload = {
        "format_version": RUN_FORMAT,
        "status": status,
        "config": config.to_json(),
        "config_sha256": config.digest(),
        "args": args,
        "index_manifest_sha256": manifest_hash(config.index) if config.index else None,
        "versions": package_versions(),
        "progress": progress_info,
    }
    if error is not None:
        payload["error"] = error
    write_json_atomic(os.path.join(config.out, RUN_FILE), payload)


def read_run_json(run_dir: str) -> dict:
    path = os.path.join(run_dir, RUN_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{run_dir} holds no run to resume (no {RUN_FILE})") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc.msg}") from None


def resume_config(args) -> tuple[GenerateConfig, dict]:
    """The config of the run in ``args.resume``; any options given must reproduce it exactly."""
    run_dir = args.resume
    run = read_run_json(run_dir)
    saved = run.get("args") or {}
    if args.model is None:
        if args.out not in (None, run_dir):
            raise UsageError(f"--out {args.out} differs from --resume {run_dir}")
        given = SimpleNamespace(**{**{k: None for k in ARG_NAMES}, **saved, "out": run_dir})
    else:
        given = SimpleNamespace(**{k: getattr(args, k, None) for k in ARG_NAMES})
        given.out = run_dir
    config = validate(given, check_out=False)
    if config.digest() != run.get("config_sha256"):
        raise UsageError(f"{run_dir} was made with a different config (config_sha256 differs); "
                         "resume it with its own options, or start a new run")
    if config.index and manifest_hash(config.index) != run.get("index_manifest_sha256"):
        raise UsageError(f"the index {config.index} changed since {run_dir} started (manifest sha256 differs)")
    return config, {k: getattr(given, k) for k in ARG_NAMES}


def remove_stale_temporaries(run_dir: str) -> int:
    """Temporary files of attempts that died (never renamed into place): safe to delete."""
    removed = 0
    for root, _, files in os.walk(run_dir):
        for name in files:
            if ".tmp-" in name:
                os.remove(os.path.join(root, name))
                removed += 1
    return removed


def worker_settings(config: GenerateConfig, torch_threads: int | None) -> WorkerSettings:
    return WorkerSettings(
        model_dir=config.model, run_dir=config.out, index_dir=config.index, radius=config.radius, spell=config.spell,
        steps=config.steps, batch_size=config.batch_size, search_backend=config.search_backend, torch_threads=torch_threads,
        batch_radius=config.batch_radius, history_radius=config.history_radius, history_size=config.history_size,
        on_breach=config.on_breach, max_attempts=config.max_attempts, guidance_scale=config.guidance_scale,
    )


class Progress:
    """Units done / total, images/s and hits/s: on the console (one updating line on a terminal,
    a line per unit otherwise) and in run.json as the job goes."""

    def __init__(self, config: GenerateConfig, args: dict, info: dict):
        self.config, self.args, self.info = config, args, info
        self.started = time.time()
        self.images = self.hits = 0
        self.tty = sys.stderr.isatty()

    def unit_done(self, unit, summary: dict) -> None:
        info = self.info
        self.images += summary["written"]
        self.hits += summary["hits"]
        info["units_done"] += 1
        info["samples_done"] = info.get("samples_done", 0) + summary["samples"]
        info["images_written"] = info.get("images_written", 0) + summary["written"]
        elapsed = max(time.time() - self.started, 1e-9)
        info.update(images_per_second=round(self.images / elapsed, 3), hits_per_second=round(self.hits / elapsed, 3),
                    elapsed_seconds=round(elapsed, 3))
        info.setdefault("units", {})[unit.name] = {
            k: summary[k] for k in ("node", "pid", "seconds", "samples", "written", "attempts", "hits", "sample_seconds",
                                    "check_seconds", "write_seconds")
        }
        t0 = time.time()
        write_run_json(self.config, "running", info, self.args)
        info["run_json_seconds"] = round(info.get("run_json_seconds", 0.0) + time.time() - t0, 4)
        done, total = info["units_done"], info["units_total"]
        line = (f"generate: {done}/{total} units, {info['images_per_second']:.2f} images/s, "
                f"{info['hits_per_second']:.1f} hits/s")
        if self.tty:
            width = 24
            bar = "#" * int(width * done / max(total, 1))
            print(f"\r[{bar:<{width}}] {line}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        else:
            progress(line)


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
    from workers.generation import verify_index_files
    from workers.index_client import start_index_servers

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

    from workers.generation import GenerationWorker

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
    from jobs.cli import run_single

    return run_single("generate", argv)


if __name__ == "__main__":
    raise SystemExit(main())
