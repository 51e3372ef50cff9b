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
import time
from dataclasses import asdict, dataclass

from indexing.encoders import autoencoder_fingerprint
from indexing.manifest import manifest_hash, read_manifest, write_json_atomic
from jobs.runtime import UsageError, progress, ray_cluster
from pipeline.invoke import takes_prompt
from pipeline.loading import ModelDirError, describe_model, pipeline_class
from pipeline.scheduler import SpellConfig
from workers.breach import POLICIES
from workers.generation import WorkerSettings
from workers.unit_writer import unit_done
from workers.units import PromptRequest, PromptsError, plan_samples, plan_units, read_prompts

RUN_FILE = "run.json"
RUN_FORMAT = 1
DEFAULT_SPELL = SpellConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers pipeline directory (from_pretrained)")
    parser.add_argument("--out", required=True, help="run directory to create")
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
    parser.add_argument("--search-backend", default="exact", choices=["exact", "faiss"], help="index search backend")
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


def validate(args) -> GenerateConfig:
    """Every check that can fail on bad input, before anything is written."""
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
    _positive("--workers", args.workers, allow_none=True)
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
        raise UsageError(f"{path} holds an unfinished run (status {status}); choose another --out")
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


def write_run_json(config: GenerateConfig, status: str, progress_info: dict) -> None:
    payload = {
        "format_version": RUN_FORMAT,
        "status": status,
        "config": config.to_json(),
        "config_sha256": config.digest(),
        "index_manifest_sha256": manifest_hash(config.index) if config.index else None,
        "versions": package_versions(),
        "progress": progress_info,
    }
    write_json_atomic(os.path.join(config.out, RUN_FILE), payload)


def worker_settings(config: GenerateConfig, torch_threads: int | None) -> WorkerSettings:
    return WorkerSettings(
        model_dir=config.model, run_dir=config.out, index_dir=config.index, radius=config.radius, spell=config.spell,
        steps=config.steps, batch_size=config.batch_size, search_backend=config.search_backend, torch_threads=torch_threads,
        batch_radius=config.batch_radius, history_radius=config.history_radius, history_size=config.history_size,
        on_breach=config.on_breach, max_attempts=config.max_attempts, guidance_scale=config.guidance_scale,
    )


def generate(config: GenerateConfig, workers: int | None = None) -> dict:
    """Python API: run the planned units on Ray actors (Ray must be up). Returns the progress."""
    import ray

    from workers.generation import GenerationWorker

    units = plan_units(plan_samples(list(config.requests), config.seed), config.unit_size)
    os.makedirs(config.out, exist_ok=True)
    todo = [u for u in units if not unit_done(config.out, u.name)]
    info = {"units_total": len(units), "units_done": len(units) - len(todo), "samples_total": sum(len(u.samples) for u in units)}
    write_run_json(config, "running", info)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    count = workers or (gpus if gpus else 1)
    count = max(1, min(count, len(todo))) if todo else 0
    # A fraction of a CPU per actor: a whole one each starves Ray on small machines.
    options = {"num_gpus": 1, "num_cpus": 0.25} if gpus else {"num_cpus": 0.5}
    threads = None if gpus else max(1, cpus // max(count, 1))
    actor_cls = ray.remote(GenerationWorker).options(max_restarts=2, max_task_retries=2, **options)
    actors = [actor_cls.remote(worker_settings(config, threads)) for _ in range(count)]
    started = time.time()
    images = hits = 0
    pending = {}
    queue = list(todo)
    for actor in actors:
        if queue:
            pending[actor.run_unit.remote(queue.pop(0))] = actor
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        ref = done[0]
        actor = pending.pop(ref)
        summary = ray.get(ref)
        images += summary["written"]
        hits += summary["hits"]
        info["units_done"] += 1
        elapsed = max(time.time() - started, 1e-9)
        info.update(images_per_second=round(images / elapsed, 3), hits_per_second=round(hits / elapsed, 3))
        progress(f"generate: {info['units_done']}/{info['units_total']} units, "
                 f"{info['images_per_second']:.2f} images/s, {info['hits_per_second']:.1f} hits/s")
        write_run_json(config, "running", info)
        if queue:
            pending[actor.run_unit.remote(queue.pop(0))] = actor
    for actor in actors:
        ray.kill(actor)
    info["seconds"] = round(time.time() - started, 3)
    write_run_json(config, "finished", info)
    return info


def run(args) -> int:
    config = validate(args)
    with ray_cluster(args.address):
        generate(config, args.workers)
    progress(f"generate: run written to {config.out}")
    return 0


def main(argv=None) -> int:
    from jobs.cli import run_single

    return run_single("generate", argv)


if __name__ == "__main__":
    raise SystemExit(main())
