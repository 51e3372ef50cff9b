"""The options of a generation run, validated before anything is written, and the run's identity.

``validate`` checks everything that can fail on bad input (the model directory, the index and
its fit to the model, radii, the prompts file, the policies, the run directory) and returns a
frozen ``GenerateConfig``; its sha256 (``digest``) is written to run.json, and ``resume_config``
refuses to continue a run whose options would give another one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from types import SimpleNamespace

from spellshield.indexing.encoders import autoencoder_fingerprint
from spellshield.indexing.manifest import manifest_hash, read_manifest
from spellshield.jobs.run_record import RUN_FILE, read_run_json
from spellshield.jobs.runtime import UsageError
from spellshield.pipeline.invoke import takes_prompt
from spellshield.pipeline.loading import ModelDirError, describe_model, pipeline_class
from spellshield.pipeline.scheduler import SpellConfig
from spellshield.workers.breach import POLICIES
from spellshield.workers.units import PromptRequest, PromptsError, read_prompts

DEFAULT_SPELL = SpellConfig()


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
    off_manifold_breach: bool = True  # issue 14: an off-manifold output is a breach (--allow-off-manifold: not)

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
             "allow_off_manifold", "num_images", "prompts", "batch_size", "unit_size", "steps", "seed", "search_backend")


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
        off_manifold_breach=not getattr(args, "allow_off_manifold", False),
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
