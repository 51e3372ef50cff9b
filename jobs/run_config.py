"""The checks of a generation run that read the model, the index or the run directory.

``pipeline.config.GenerateConfig`` validates every value on its own; here, before anything is
written, ``validate`` checks what needs the files: the model directory, the index and its fit to
the model (latent shape, encoder), the prompts file, the run directory. It returns the config
*resolved*: absolute paths, the radius (``--radius`` or the index's suggested one) and the
samples requested (``sampling.requests``). That object goes unchanged to the workers and into
run.json; its sha256 (``GenerateConfig.digest``) is the run's identity, and ``resume_config``
refuses to continue a run whose options would give another one.
"""

from __future__ import annotations

import dataclasses
import json
import os

from spellshield import storage
from spellshield.indexing.manifest import Manifest, manifest_hash, read_manifest
from spellshield.jobs.run_record import RUN_FILE, RUN_FORMAT as RUN_FORMAT_CURRENT, read_run_json
from spellshield.jobs.checks import check_index_pin, check_out_path, from_args, weight_load_errors
from spellshield.jobs.runtime import UsageError
from spellshield.workers.run_layout import LOCK_FILE
from spellshield.pipeline.config import DEFAULT_NUM_IMAGES, ConfigError, GenerateConfig, PromptRequest
from spellshield.pipeline.prompts import PromptsError, read_prompts

def config_from_args(args) -> GenerateConfig:
    """The command-line edge: options -> config; a bad value is one line naming its flag."""
    if not args.model or not args.out:
        raise UsageError("--model and --out are required (or --resume RUN_DIR)")
    return from_args(GenerateConfig.from_args, args)


def check_model_fits_index(model, index_dir: str) -> Manifest:
    """The index was built in the model's latent space (``model``: a ``pipeline.loading.ModelSpec``):
    same shape, same encoder weights."""
    from spellshield.indexing.encoders import autoencoder_fingerprint

    manifest = read_manifest(index_dir)
    if tuple(manifest.latent.shape) != tuple(model.latent_shape):
        raise UsageError(
            f"index latent shape {tuple(manifest.latent.shape)} differs from the model's {tuple(model.latent_shape)}"
        )
    try:
        model_encoder = autoencoder_fingerprint(model.vae_path) if model.vae_path else "pixels"
    except weight_load_errors() as exc:
        raise UsageError(f"--model: its VAE at {model.vae_path} cannot be loaded ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    if manifest.latent.fingerprint != model_encoder:
        raise UsageError(
            f"index encoder {manifest.latent.encoder!r} is not the model's "
            f"({'its VAE at ' + model.vae_path if model.vae_path else 'pixel space'})"
        )
    return manifest


def validate(config: GenerateConfig, check_out: bool = True) -> GenerateConfig:
    """Every check that reads a file, before anything is written; returns the resolved config."""
    # torch and diffusers only here, not at import: --help imports this module
    from spellshield.pipeline.invoke import takes_prompt
    from spellshield.pipeline.loading import ModelDirError, describe_model, pipeline_class

    from spellshield.storage.cache import local_dir

    try:
        model = describe_model(local_dir(config.model))  # s3://, gs://: this node's cached copy
        conditional = takes_prompt(pipeline_class(model))
    except (ModelDirError, storage.StorageError) as exc:
        raise UsageError(str(exc)) from None
    shield, sampling = config.shield, config.sampling
    radius = shield.radius
    if shield.index is not None:
        manifest = check_model_fits_index(model, shield.index)
        check_index_pin(shield.index, shield.index_sha256)
        if shield.search_backend == "ivf" and not storage.is_remote(shield.index):  # its structure is built once, by project-index: say so before Ray starts
            from spellshield.indexing.ivf import IvfShield

            IvfShield.locate(shield.index)
        if radius is None:
            radius = manifest.suggested_radius
            if radius is None:
                raise UsageError("the index has no suggested radius; pass --radius")
    if sampling.prompts is not None:
        try:
            requests = tuple(read_prompts(sampling.prompts))
        except PromptsError as exc:
            raise UsageError(str(exc)) from None
        if not conditional:
            raise UsageError(f"{model.pipeline_class} is unconditional: use --num-images, not --prompts")
    elif sampling.requests is not None:  # the Python API may hand requests over directly
        requests = sampling.requests
    else:
        sampling = dataclasses.replace(sampling, num_images=sampling.num_images or DEFAULT_NUM_IMAGES)
        requests = (PromptRequest(None, sampling.num_images),)
    if sampling.guidance_scale is not None and not conditional:
        raise UsageError(f"{model.pipeline_class} is unconditional: it takes no --guidance-scale")
    if check_out:
        if not storage.is_remote(config.out):
            check_out_path(config.out)
        check_run_dir(config.out)
    try:
        return dataclasses.replace(
            config,
            # absolute paths, or the canonical URIs: --resume works from any directory or machine
            model=canonical(config.model),
            out=canonical(config.out),
            shield=dataclasses.replace(shield, index=canonical(shield.index), radius=radius),
            sampling=dataclasses.replace(sampling, prompts=canonical(sampling.prompts),
                                         unit_size=sampling.samples_per_unit, requests=requests),
        )
    except ConfigError as exc:  # e.g. the suggested radius of a tampered manifest, or too many samples in all
        raise UsageError(exc.flag) from None


def canonical(path: str | None) -> str | None:
    return storage.resolve(path).uri if path else None


def check_run_dir(path: str) -> None:
    """A new run needs a new or empty directory (a driver's lock file alone counts as empty)."""
    if storage.is_remote(path):
        return _check_remote_run_dir(path)
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
    if os.path.isdir(path) and set(os.listdir(path)) - {LOCK_FILE}:
        raise UsageError(f"{path} is not empty; choose a new or empty directory")


def _check_remote_run_dir(uri: str) -> None:
    """``check_run_dir`` on an object store: reachable, writable, no run, nothing else there."""
    def finished(run) -> str:
        status = storage.read_json(run.child(RUN_FILE)).get("status")
        if status == "finished":
            return f"{run.uri} already holds a finished run; choose another --out"
        return f"{run.uri} holds an unfinished run (status {status}); finish it with --resume {run.uri}"

    from spellshield.storage.commit import check_conditional_writes

    try:
        check_conditional_writes(uri)  # the store's SDK for create-only writes is there, before anything is read or written
        storage.check_new_output(uri, RUN_FILE, finished)
    except storage.StorageError as exc:
        raise UsageError(str(exc)) from None


def resume_config(args) -> GenerateConfig:
    """The config of the run in ``args.resume``; any options given must reproduce it exactly."""
    run_dir = args.resume
    if storage.is_remote(run_dir):
        from spellshield.storage.commit import LEASE, check_conditional_writes, check_lease_free

        try:  # a driver still holds this run (or was killed less than a lease TTL ago): refuse before Ray
            check_conditional_writes(run_dir)
            storage.probe(run_dir)  # a missing bucket is named as such (a GCS download's 404 does not say which)
            check_lease_free(storage.resolve(run_dir).child(LEASE))
        except storage.StorageError as exc:
            raise UsageError(str(exc)) from None
    run = read_run_json(run_dir)
    if run.get("format_version") != RUN_FORMAT_CURRENT:
        raise UsageError(f"{run_dir} was written by another spellshield version (run.json format "
                         f"{run.get('format_version')}, this one reads {RUN_FORMAT_CURRENT}); start a new run")
    saved = GenerateConfig.from_json(run["config"])
    if args.model is None:
        if args.out not in (None, run_dir):
            raise UsageError(f"--out {args.out} differs from --resume {run_dir}")
        given = dataclasses.replace(saved, out=run_dir)
    else:
        args.out = run_dir
        given = config_from_args(args)
    config = validate(given, check_out=False)
    if config.digest() != run.get("config_sha256"):
        raise UsageError(f"{run_dir} was made with a different config (config_sha256 differs); "
                         "resume it with its own options, or start a new run")
    if config.shield.index and manifest_hash(config.shield.index) != run.get("index_manifest_sha256"):
        raise UsageError(f"the index {config.shield.index} changed since {run_dir} started (manifest sha256 differs)")
    return config
