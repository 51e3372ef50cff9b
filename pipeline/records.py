"""The audit record formats, declared once as dataclasses: one row per shield hit per step
(``audit/hits``), one row per sampling attempt (``audit/samples``).

Each column is a dataclass field whose metadata holds its Arrow type and description; the
Parquet schemas (``HIT_SCHEMA``, ``SAMPLE_SCHEMA``, versioned by ``SCHEMA_VERSION`` in every
file's metadata) and the column tables of docs/formats.md are generated from them
(``describe``). They are plain pyarrow schemas, readable by pandas, pyarrow and DuckDB.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import pyarrow as pa

SCHEMA_VERSION = "1"


def column(arrow_type: str, description: str, nullable: bool = True):
    """A dataclass field that is a Parquet column: ``arrow_type`` names a pyarrow type factory."""
    return field(metadata={"arrow_type": arrow_type, "description": description, "nullable": nullable})


@dataclass(frozen=True)
class RowIdentity:
    """Which attempt of which sample a row belongs to: the first columns of both tables."""

    run: str = column("string", "run name (the run directory's base name)", False)
    unit: int = column("int32", "work unit number", False)
    sample: str = column("string", "sample key, unique in the run (also the image's name in the unit tar)", False)
    prompt_index: int = column("int32", "line of the prompts file (0-based), or 0 for unconditional runs", False)
    prompt: str | None = column("string", "prompt text; null for unconditional models")
    seed: int = column("int64", "seed of this attempt's noise (attempt 1: the sample's own seed)", False)
    attempt: int = column("int32", "1 for the first sampling of this sample, 2.. for resamples after a breach", False)


@dataclass(frozen=True)
class HitRecord:
    """One shielded point inside its ball at one step (ShieldedScheduler's log): a row of audit/hits."""

    row: int  # position in the batch handed to step(); not a column (the identity replaces it)
    step: int = column("int32", "0-based count of scheduler.step calls (the denoising step; Heun: two calls per step)", False)
    timestep: float = column("float64", "scheduler timestep (or sigma) at this step", False)
    source: str = column("string", "shield source: index (protected corpus), batch (other samples), history", False)
    neighbour_id: int = column("int64", "global id in the index (index), batch row (batch) or history entry id (history)", False)
    neighbour_key: str | None = column("string", "corpus key (index), or sample key of the sibling (batch) or earlier output (history)")
    distance: float = column("float64", "norm(x0_hat - z) at this step, before this iteration's correction", False)
    radius: float = column("float64", "radius of this source's balls", False)
    weight: float = column("float64", "relu(r / distance - 1), the paper's sparse weight; 1 if degenerate, 0 if not used", False)
    degenerate: bool = column("bool_", "x0_hat coincided with z; the documented fallback direction was used", False)
    used: bool = column("bool_", "entered the correction (false: beyond --max-neighbours)", False)
    iteration: int = column("int32", "correction iteration, 0-based", False)
    correction_norm: float = column("float64", "norm(m' - m): change of the model output for this sample and step", False)
    model_output_norm: float = column("float64", "norm(m) of the (guided) model output for this sample and step", False)
    delta_norm: float = column("float64", "norm(x0_hat' - x0_hat): the correction in latent space, all iterations", False)


@dataclass(frozen=True)
class AttemptRecord:
    """How one attempt of one sample ended: the rest of a row of audit/samples."""

    nearest_id: int | None = column("int64", "exact nearest corpus latent of the finished image (null without index)")
    nearest_key: str | None = column("string", "its corpus key")
    nearest_distance: float | None = column("float64", "its L2 distance in the index's latent space")
    radius: float | None = column("float64", "shield radius of the run (null without index)")
    inside_shield: bool | None = column("bool_", "nearest_distance < radius: a near-duplicate of a protected image")
    active_steps: int = column("int32", "steps at which the shield corrected this sample", False)
    steps: int = column("int32", "denoising steps taken", False)
    max_correction_ratio: float = column("float64", "largest correction_norm / model_output_norm over the steps", False)
    action: str = column("string", "what happened to the attempt: kept, flagged, resampled, dropped", False)
    image: str | None = column("string", "image location inside the run directory: images/unit-NNNNN.tar#<sample>.png; "
                                         "null if not written")
    seconds: float = column("float64", "wall-clock seconds spent on this sample (its batch's time divided evenly)", False)
    # the final check's two other judges (pipeline.judges); null without index
    off_manifold: bool | None = column("bool_", "far beyond the corpus's 1-NN distances or rough as noise: a breach unless "
                                                "--allow-off-manifold")
    roughness: float | None = column("float64", "mean absolute difference of neighbouring pixel values / 255")
    perceptual_nearest_key: str | None = column("string", "corpus key of the closest protected image in the low-pass "
                                                         "(blurred) space")
    perceptual_distance: float | None = column("float64", "L2 distance of the blurred images to it, in [-1, 1] pixel units")
    perceptual_ssim: float | None = column("float64", "largest SSIM of the blurred image with a nearby protected one")
    perceptual_copy: bool | None = column("bool_", "the perceptual judge (or the index's descriptor judge, when it has one) "
                                                   "calls it a copy of a protected image (a breach)")
    # what the index search cost while this attempt was sampled (indexing.shield.SearchStats): its
    # batch's counts divided evenly over the batch, as ``seconds``; null without index or when the
    # index is served by index servers (their counts are shared by every worker)
    index_queries: float | None = column("float64", "index searches of this attempt's x0_hat (one per step and correction "
                                                    "iteration; its batch's count / batch size)")
    index_candidates: float | None = column("float64", "candidates the index's fast pass handed to the exact re-check "
                                                       "(its batch's count / batch size)")
    index_lists_probed: float | None = column("float64", "inverted-file lists probed (``ivf`` backend; 0 for the others; "
                                                         "its batch's count / batch size)")


def _columns(*classes) -> list:
    return [f for cls in classes for f in fields(cls) if "arrow_type" in f.metadata]


def _schema(name: str, *classes) -> pa.Schema:
    return pa.schema(
        [pa.field(f.name, getattr(pa, f.metadata["arrow_type"])(), nullable=f.metadata["nullable"],
                  metadata={"description": f.metadata["description"]}) for f in _columns(*classes)],
        metadata={"spellshield.schema": name, "spellshield.schema_version": SCHEMA_VERSION},
    )


HIT_SCHEMA = _schema("hits", RowIdentity, HitRecord)
SAMPLE_SCHEMA = _schema("samples", RowIdentity, AttemptRecord)


def hit_row(identity: RowIdentity, hit: HitRecord) -> dict:
    """A row of audit/hits: the attempt's identity and the hit's columns."""
    return {**asdict(identity), **{f.name: getattr(hit, f.name) for f in _columns(HitRecord)}}


def sample_row(identity: RowIdentity, outcome: AttemptRecord) -> dict:
    """A row of audit/samples."""
    return {**asdict(identity), **asdict(outcome)}


def describe(schema: pa.Schema) -> list[tuple[str, str, str]]:
    """(name, type, description) of every column, for docs/formats.md and --help."""
    return [(f.name, str(f.type), f.metadata[b"description"].decode()) for f in schema]
