"""The math and the sampler seam: SPELL repellency, parametrisations, ShieldedScheduler,
shield sources, the memorizer model and the audit record schema. No Ray, no file I/O beyond
diffusers' own save/load.

Classes that a saved pipeline names in its ``model_index.json`` (library ``pipeline``) are
exported here so that diffusers can find them when it loads the directory.
"""

from .memorizer import MemorizerPipeline, MemorizerUNet
from .repellency import Neighbours, Repulsion, repel
from .scheduler import HitRecord, ShieldedScheduler, SpellConfig
from .sources import BatchSource, HistorySource, IndexSource, SampleRow, StaticSource

__all__ = [
    "BatchSource",
    "HistorySource",
    "HitRecord",
    "IndexSource",
    "MemorizerPipeline",
    "MemorizerUNet",
    "Neighbours",
    "Repulsion",
    "SampleRow",
    "ShieldedScheduler",
    "SpellConfig",
    "StaticSource",
    "repel",
]
