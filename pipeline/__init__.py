"""The math and the sampler seam: SPELL repellency, parametrisations, ShieldedScheduler,
shield sources, the memorizer model, the jobs' typed configs, the breach policy, prompts files
and the audit record schema. No Ray; no file I/O beyond reading a prompts file and diffusers'
own save/load.

Classes that a saved pipeline names in its ``model_index.json`` (module ``spellshield.pipeline...``) are
exported here so that diffusers can find them when it loads the directory. Names are imported on
first use (PEP 562), so that ``import spellshield.pipeline.records`` or the CLI's ``--help`` do not pay for
diffusers.
"""

from importlib import import_module

_EXPORTS = {
    "BatchSource": ".sources",
    "HistorySource": ".sources",
    "HitRecord": ".records",
    "IndexSource": ".sources",
    "MemorizerPipeline": ".memorizer",
    "MemorizerUNet": ".memorizer",
    "Neighbours": ".repellency",
    "Repulsion": ".repellency",
    "SampleRow": ".sources",
    "ShieldedScheduler": ".scheduler",
    "SpellConfig": ".config",
    "StaticSource": ".sources",
    "repel": ".repellency",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
