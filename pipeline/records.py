"""The audit record schema: one row per shield hit per step, one row per sample.

Schemas are versioned (``SCHEMA_VERSION`` in the Parquet metadata) and every column carries a
description in its field metadata, which the README reproduces. They are plain pyarrow
schemas, readable by pandas, pyarrow and DuckDB.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"


def _field(name: str, type_: pa.DataType, description: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": description})


HIT_FIELDS = [
    _field("run", pa.string(), "run name (the run directory's base name)", False),
    _field("unit", pa.int32(), "work unit number", False),
    _field("sample", pa.string(), "sample key, unique in the run (also the image's name in the unit tar)", False),
    _field("prompt_index", pa.int32(), "line of the prompts file (0-based), or 0 for unconditional runs", False),
    _field("prompt", pa.string(), "prompt text; null for unconditional models"),
    _field("seed", pa.int64(), "seed of the sample's noise", False),
    _field("attempt", pa.int32(), "1 for the first sampling of this sample, 2.. for resamples", False),
    _field("step", pa.int32(), "0-based count of scheduler.step calls (the denoising step; Heun: two calls per step)", False),
    _field("timestep", pa.float64(), "scheduler timestep (or sigma) at this step", False),
    _field("source", pa.string(), "shield source: index (protected corpus), batch (other samples), history", False),
    _field("neighbour_id", pa.int64(), "global id in the index (index), batch row (batch) or history entry id (history)", False),
    _field("neighbour_key", pa.string(), "corpus key (index), or sample key of the sibling (batch) or earlier output (history)"),
    _field("distance", pa.float64(), "norm(x0_hat - z) at this step, before this iteration's correction", False),
    _field("radius", pa.float64(), "radius of this source's balls", False),
    _field("weight", pa.float64(), "relu(r / distance - 1), the paper's sparse weight; 1 if degenerate, 0 if not used", False),
    _field("degenerate", pa.bool_(), "x0_hat coincided with z; the documented fallback direction was used", False),
    _field("used", pa.bool_(), "entered the correction (false: beyond --max-neighbours)", False),
    _field("iteration", pa.int32(), "correction iteration, 0-based", False),
    _field("correction_norm", pa.float64(), "norm(m' - m): change of the model output for this sample and step", False),
    _field("model_output_norm", pa.float64(), "norm(m) of the (guided) model output for this sample and step", False),
    _field("delta_norm", pa.float64(), "norm(x0_hat' - x0_hat): the correction in latent space, all iterations", False),
]

SAMPLE_FIELDS = [
    _field("run", pa.string(), "run name", False),
    _field("unit", pa.int32(), "work unit number", False),
    _field("sample", pa.string(), "sample key, unique in the run", False),
    _field("prompt_index", pa.int32(), "line of the prompts file (0-based), or 0", False),
    _field("prompt", pa.string(), "prompt text; null for unconditional models"),
    _field("seed", pa.int64(), "seed of the sample's noise (the seed actually used by this attempt)", False),
    _field("attempt", pa.int32(), "1 for the first sampling, 2.. for resamples after a breach", False),
    _field("nearest_id", pa.int64(), "exact nearest corpus latent of the written image (null without index)"),
    _field("nearest_key", pa.string(), "its corpus key"),
    _field("nearest_distance", pa.float64(), "its L2 distance in the index's latent space"),
    _field("radius", pa.float64(), "shield radius of the run (null without index)"),
    _field("inside_shield", pa.bool_(), "nearest_distance < radius: a near-duplicate of a protected image"),
    _field("active_steps", pa.int32(), "steps at which the shield corrected this sample", False),
    _field("steps", pa.int32(), "denoising steps taken", False),
    _field("max_correction_ratio", pa.float64(), "largest correction_norm / model_output_norm over the steps", False),
    _field("action", pa.string(), "what happened to the sample: kept, flagged, resampled, dropped", False),
    _field("image", pa.string(), "image location inside the run directory: images/unit-NNNNN.tar#<sample>.png; null if not written"),
    _field("seconds", pa.float64(), "wall-clock seconds spent on this sample (its batch's time divided evenly)", False),
    # the final check's two other judges (pipeline.judges); null without index
    _field("off_manifold", pa.bool_(), "far beyond the corpus's 1-NN distances or rough as noise: a breach unless --allow-off-manifold"),
    _field("roughness", pa.float64(), "mean absolute difference of neighbouring pixel values / 255"),
    _field("perceptual_nearest_key", pa.string(), "corpus key of the closest protected image in the low-pass (blurred) space"),
    _field("perceptual_distance", pa.float64(), "L2 distance of the blurred images to it, in [-1, 1] pixel units"),
    _field("perceptual_ssim", pa.float64(), "largest SSIM of the blurred image with a nearby protected one"),
    _field("perceptual_copy", pa.bool_(), "the perceptual judge calls it a copy of a protected image (a breach)"),
]

HIT_SCHEMA = pa.schema(HIT_FIELDS, metadata={"spellshield.schema": "hits", "spellshield.schema_version": SCHEMA_VERSION})
SAMPLE_SCHEMA = pa.schema(SAMPLE_FIELDS, metadata={"spellshield.schema": "samples", "spellshield.schema_version": SCHEMA_VERSION})


def describe(schema: pa.Schema) -> list[tuple[str, str, str]]:
    """(name, type, description) of every column, for the README and --help."""
    return [(f.name, str(f.type), f.metadata[b"description"].decode()) for f in schema]
