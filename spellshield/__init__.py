"""spellshield: dataset-scale copyright shielding for diffusion models (SPELL, arXiv 2410.06025).

The installed package maps the repository's folders: ``spellshield.pipeline`` (the math and the
sampler seam), ``spellshield.indexing`` (corpus, encoders, index, search), ``spellshield.workers``
(what Ray runs) and ``spellshield.jobs`` (the Ray jobs and the CLI). Names are imported on first
use (PEP 562), so ``import spellshield`` costs nothing until one is used.
"""

from importlib import import_module

_EXPORTS = {
    # the jobs, as keyword functions (spellshield.api)
    "build_index": "spellshield.api",
    "memorizer": "spellshield.api",
    "generate": "spellshield.api",
    "audit": "spellshield.api",
    # one typed config of a generation run (spellshield.pipeline.config)
    "GenerateConfig": "spellshield.pipeline.config",
    "ShieldConfig": "spellshield.pipeline.config",
    "SamplingConfig": "spellshield.pipeline.config",
    "BreachConfig": "spellshield.pipeline.config",
    "PlacementConfig": "spellshield.pipeline.config",
    "PromptRequest": "spellshield.pipeline.config",
    # ... and of build-index and audit
    "BuildConfig": "spellshield.pipeline.config",
    "EncodeConfig": "spellshield.pipeline.config",
    "AuditConfig": "spellshield.pipeline.config",
    "GateConfig": "spellshield.pipeline.config",
    "ConfigError": "spellshield.pipeline.config",
    "UsageError": "spellshield.jobs.runtime",
    # the shield's pieces
    "ShieldedScheduler": "spellshield.pipeline.scheduler",
    "SpellConfig": "spellshield.pipeline.config",
    "open_index": "spellshield.indexing.search",
    # the memorizer's and TAEF2's classes: a saved pipeline may name them
    "MemorizerUNet": "spellshield.pipeline.memorizer",
    "MemorizerPipeline": "spellshield.pipeline.memorizer",
    "TAEF2": "spellshield.indexing.taef2",
}

try:
    from importlib.metadata import version as _version

    __version__ = _version("spellshield")
except Exception:  # not installed (running from a source tree)
    __version__ = "0+unknown"

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
