"""The Python API: one keyword entry point per job, named like the command-line options.

In the manner of edm2's ``generate_images(net, seeds=..., **sampler_kwargs)``::

    import spellshield

    spellshield.build_index(corpus="data/train-{000000..000009}.tar", out="index")
    spellshield.generate(model="model", out="run", index="index", num_images=64, steps=50,
                         spell=spellshield.SpellConfig(overcompensation=10.0))
    summary = spellshield.audit(run="run", index="index")

Each call validates everything first (``ValueError`` naming the option for a bad value,
``UsageError`` for bad files; nothing written), then runs on
the Ray cluster already initialised in this process, else on ``address`` / ``RAY_ADDRESS``, else
on a local cluster started for the call. Keyword names are those of the CLI options
(``--num-images`` -> ``num_images``); every default is the CLI's, declared once in the config
classes.
"""

from __future__ import annotations


def build_index(corpus: str, out: str, *, address: str | None = None, **options) -> dict:
    """Encode ``corpus`` (WebDataset shards: brace pattern, glob, directory or comma list) into a
    shield index at ``out``; resumes an interrupted build. ``options``: the fields of
    ``BuildConfig`` by name (``shard_size``, and ``EncodeConfig``'s ``encoder``, ``resolution``,
    ``batch_size``, ``num_encoders``, ``dtype``, ``max_member_bytes``) or ``encode=EncodeConfig(...)``.
    Returns the manifest."""
    from spellshield.jobs import build_index as job
    from spellshield.jobs.runtime import ray_cluster
    from spellshield.pipeline.config import BuildConfig

    config = BuildConfig.build(corpus, out, **options)
    plan = job.plan_build(config)  # bad input fails before Ray starts
    with ray_cluster(address):
        return job.build_index(config, plan=plan)


def memorizer(corpus: str, out: str, *, address: str | None = None, **encode_options) -> str:
    """Save a diffusers pipeline that memorizes ``corpus`` (the honest worst case for a shield) at
    ``out``; ``encode_options``: the fields of ``EncodeConfig``, as for ``build_index``. Returns ``out``."""
    from spellshield import storage
    from spellshield.jobs import memorizer as job
    from spellshield.jobs.runtime import ray_cluster
    from spellshield.pipeline.config import EncodeConfig

    options = EncodeConfig(**encode_options)
    corpus, out = storage.normalise(corpus), storage.normalise(out)  # file:// -> a local path, as every config's path field
    job.check_inputs(corpus, out, options)
    with ray_cluster(address):
        return job.build_memorizer(corpus, out, options)


def generate(model: str, out: str, *, address: str | None = None, **options) -> dict:
    """Sample ``model`` (a diffusers pipeline directory) into the run directory ``out`` with the
    SPELL shield. ``options``: the fields of ``GenerateConfig``'s parts by name (``index``,
    ``radius``, ``num_images``, ``prompts``, ``steps``, ``seed``, ``batch_size``, ``on_breach``...)
    or whole parts (``spell=SpellConfig(...)``). Returns the run's progress record."""
    from spellshield.jobs.generate import run_job
    from spellshield.jobs.run_config import validate
    from spellshield.pipeline.config import GenerateConfig

    return run_job(validate(GenerateConfig.build(model, out, **options)), address)


def audit(run: str, *, address: str | None = None, **options) -> dict:
    """Audit the run directory ``run`` (a path or an ``s3://`` / ``gs://`` URI; the report is written to its
    own ``audit/``): near-duplicate rates (recomputed from the images when ``index`` is given),
    per-step sparsity, a report. ``options``: the fields of ``AuditConfig`` by name (``index``,
    ``radius``, ``top``, and the gate's ``fail_above``, ``fail_on``) or ``gate=GateConfig(...)``.
    Returns the summary (its ``verdict`` says whether the gate passed)."""
    from spellshield.jobs.audit import audit as run_audit
    from spellshield.jobs.audit import check_inputs
    from spellshield.jobs.runtime import ray_cluster
    from spellshield.pipeline.config import AuditConfig

    config = AuditConfig.build(run, **options)
    if config.compare is not None:
        raise TypeError("compare= is for the command line; call audit on each run")
    check_inputs(config.run_dir, config.index)  # bad input (a URI too) fails before Ray starts
    with ray_cluster(address):
        return run_audit(config.run_dir, index=config.index, radius=config.radius, top=config.top,
                         gate=config.gate if config.gate.gated else None)
