"""One typed configuration per job, from the command line to the worker: ``GenerateConfig``,
``BuildConfig`` (build-index) and ``AuditConfig`` (audit).

``GenerateConfig`` is made of frozen parts, each validating itself in ``__post_init__``:

- ``ShieldConfig``: which index protects the run, with which radius and search backend, and the
  optional batch and history sources (SPELL's other shields).
- ``SpellConfig``: how hard and how often to push (lam, SPELL-K, correction iterations).
- ``SamplingConfig``: what to sample (images or prompts, seeds, steps, batches, units).
- ``BreachConfig``: what to do with a finished sample the exact final check finds inside.
- ``PlacementConfig``: where the actors run and how hard the job retries; none of it changes a
  sample, so it is not part of the run's identity (``GenerateConfig.digest``).

Every default and every option's help text is declared once, here, in the fields' metadata;
``add_arguments`` derives the argparse options (grouped, defaults shown) and ``from_args`` reads
them back, so the command line, the Python API (``spellshield.generate(**kwargs)``, whose
keyword names are the fields' names) and ``run.json`` (``to_json`` / ``from_json``) are one shape.
The library raises ``ValueError`` naming the field; the command-line edge turns the field's name
into its flag (``ConfigError.flag``).

``BuildConfig`` (corpus, out, shard size and an ``EncodeConfig``: encoder, resolution, batches,
dtype) and ``AuditConfig`` (run, index, radius, report and a ``GateConfig``) are built the same
way (``add_options`` / ``option_values`` / ``split_parts``). Path options stay plain strings:
local paths or URIs (s3://, gs://), checked for existence by the jobs.

No Ray, no file I/O: checks that read the model or the index live in ``jobs.run_config``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields

from spellshield import storage
from spellshield.indexing.corpus import DEFAULT_MAX_MEMBER_BYTES
from spellshield.indexing.search import BACKENDS
from spellshield.indexing.store import DTYPES as STORE_DTYPES

# Seeds are int64 Parquet columns and torch.Generator seeds: keep them in 0..2^63 - 1.
SEED_BITS = 63
MAX_SEED = (1 << SEED_BITS) - 1
# A run's samples are planned up front and listed in its units (so that retries and resumes
# reproduce them): their number is bounded, refused at once rather than planned for minutes.
# Split bigger jobs into several runs.
MAX_IMAGES = 1_000_000
DEFAULT_NUM_IMAGES = 16  # unconditional runs without --num-images
POLICIES = ("resample", "drop", "flag")  # pipeline.breach implements them


class ConfigError(ValueError):
    """A bad value for one field; ``name`` is the field, for the edge to name its flag."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name} {message}")
        self.name, self.message = name, message

    @property
    def flag(self) -> str:
        return f"--{self.name.replace('_', '-')} {self.message}"


def option(default, help: str, **argparse_kwargs):
    """A config field with its command-line help (and argparse extras: type, choices, metavar)."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, **argparse_kwargs})


# -- value checks: one line each, naming the field and the value -----------------------------------

def _int(name: str, value, low: int | None = None, high: int | None = None, none: bool = False) -> None:
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(name, f"must be >= {low}, got {value}")
    if high is not None and value >= high:
        raise ConfigError(name, f"must be < {high}, got {value}")


def _positive_finite(name: str, value, none: bool = False) -> None:
    """inf and nan parse as floats; as a radius or a push they would disable or break the shield."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if not value > 0:
        raise ConfigError(name, f"must be > 0, got {value!r}")


def check_seed(seed, count: int | None) -> None:
    """Sample i of a run uses seed + i: every one must be a seed (0..MAX_SEED)."""
    _int("seed", seed)
    count = max(count or 1, 1)
    if not 0 <= seed <= MAX_SEED - count + 1:
        raise ConfigError("seed", f"must be in 0..{MAX_SEED - count + 1} for {count} image(s) "
                                  f"(sample i uses seed + i, at most {MAX_SEED}), got {seed}")


def _image_count(name: str, value) -> None:
    _int(name, value, low=1)
    if value > MAX_IMAGES:
        raise ConfigError(name, f"{value} is over the limit of {MAX_IMAGES} per run; split it into several runs")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}, got {value!r}")


def _resources(name: str, value) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for k, v in value.items()):
        raise ConfigError(name, "must be a JSON object of positive amounts, e.g. '{\"node_b\": 0.01}'")


# -- the parts ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShieldConfig:
    """The protected index and SPELL's other shield sources, each with its own radius."""

    index: str | None = option(None, "shield index directory; without it the run is unshielded", metavar="INDEX_DIR")
    radius: float | None = option(None, "shield radius (default: the index's suggested radius)", type=float)
    index_sha256: str | None = option(None, "refuse the index unless its manifest.json has this sha256 (pins shards, ids "
                                            "and calibration; `spellshield index verify` prints it)", metavar="HEX")
    search_backend: str = option("exact", "index search backend (docs/commands.md: search backends)", choices=BACKENDS)
    batch_radius: float | None = option(
        None, "also repel the other samples of the same prompt in the batch within this radius (diversity)", type=float)
    history_radius: float | None = option(
        None, "also repel this worker's earlier outputs of the same prompt within this radius", type=float)
    history_size: int = option(64, "earlier outputs kept per prompt", type=int)

    def __post_init__(self):
        _path(self, "index", none=True)
        for name in ("radius", "batch_radius", "history_radius"):
            _positive_finite(name, getattr(self, name), none=True)
        _choice("search_backend", self.search_backend, BACKENDS)
        _int("history_size", self.history_size, low=1)
        if self.index_sha256 is not None and not (isinstance(self.index_sha256, str)
                                                  and re.fullmatch(r"[0-9a-fA-F]{64}", self.index_sha256)):
            raise ConfigError("index_sha256", f"must be 64 hex digits, got {self.index_sha256!r}")
        for name in ("radius", "index_sha256"):
            if getattr(self, name) is not None and self.index is None:
                raise ConfigError(name, "needs --index")


@dataclass(frozen=True)
class SpellConfig:
    """How hard and how often to push (SPELL, arXiv 2410.06025, eq. 5-6)."""

    # lam in x0_hat' = x0_hat + lam * delta. The paper uses 1.6 for models that generalise; on a
    # memorizing model (benchmarks/RESULTS.md, "Memorization") lam = 10 with 5 iterations is what
    # keeps samples out of protected balls *and* lets them land on other, unprotected images.
    overcompensation: float = option(10.0, "lam in x0' = x0 + lam * delta (README: defaults)", type=float)
    max_neighbours: int | None = option(None, "at most K hits per source and query enter the correction (SPELL-K; default all)",
                                        type=int)
    correction_iterations: int = option(5, "re-check x0' and correct again, up to M times per step", type=int)
    # Correct only at steps the sampler can still absorb: while the noise left in x_t, in x0 units
    # (sigma_t / alpha_t * sqrt(D)), is at least this many of the source's radii. Below it the
    # trajectory is committed to its image within less than a radius: the paper's push (its
    # Eq. 7 with x0_hat' = x0_hat + lam * delta) can no longer carry it to another image and goes
    # almost unchanged into the output. Against a point x0_hat = z it is lam * r of pure noise:
    # a protected image under noise (lam 1.6: 1.6 r, "not a copy" in L2) or saturated noise
    # (lam 10; benchmarks/RESULTS.md, "Noise"). Left alone, such a sample ends as the copy it is
    # and the exact final check refuses it. 0: correct at every step (the paper's schedule).
    min_noise_radii: float = option(1.0, "correct only while the noise left in x_t is at least this many radii "
                                         "(0: every step, the paper's schedule)", type=float)

    def __post_init__(self):
        _positive_finite("overcompensation", self.overcompensation)
        if isinstance(self.min_noise_radii, bool) or not isinstance(self.min_noise_radii, (int, float)) \
                or not math.isfinite(self.min_noise_radii) or self.min_noise_radii < 0:
            raise ConfigError("min_noise_radii", f"must be a finite number >= 0, got {self.min_noise_radii!r}")
        _int("max_neighbours", self.max_neighbours, low=1, none=True)
        _int("correction_iterations", self.correction_iterations, low=1)


@dataclass(frozen=True)
class PromptRequest:
    """One line of a prompts file: ``num_images`` samples of ``prompt`` (None: unconditional)."""

    prompt: str | None
    num_images: int
    seeds: tuple[int, ...] | None = None  # explicit seeds; else base seed + running counter

    def __post_init__(self):
        # The one check of a request, wherever it comes from (a prompts file adds the line number:
        # pipeline.prompts). bool is an int in Python, but true is neither a count nor a seed.
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise ConfigError("prompt", f"must be a string, got {self.prompt!r}")
        if type(self.num_images) is not int or self.num_images < 1:
            raise ConfigError("num_images", f"must be a positive integer, got {self.num_images!r}")
        _image_count("num_images", self.num_images)
        if self.seeds is not None:
            if not isinstance(self.seeds, tuple) or not all(type(s) is int and 0 <= s <= MAX_SEED for s in self.seeds):
                raise ConfigError("seeds", f"must be a list of integers in 0..{MAX_SEED}, got {self.seeds!r}")
            if len(self.seeds) != self.num_images:
                raise ConfigError("seeds", f"holds {len(self.seeds)} seeds for num_images={self.num_images}")


@dataclass(frozen=True)
class SamplingConfig:
    """What to sample: images (or prompts), their seeds, and how they are batched into units."""

    num_images: int | None = option(None, "unconditional: this many images (default 16)", type=int)
    prompts: str | None = option(None, 'JSONL: a string or {"prompt", "num_images", "seeds"} per line', metavar="FILE")
    batch_size: int = option(8, "samples per pipeline call", type=int)
    unit_size: int | None = option(None, "samples per work unit (default 4 batches)", type=int)
    steps: int = option(50, "denoising steps", type=int)
    seed: int = option(0, "seed of the first sample; sample i uses seed + i", type=int)
    guidance_scale: float | None = option(None, "classifier-free guidance scale of conditional pipelines (default: the pipeline's)",
                                          type=float)
    # Filled by jobs.run_config.resolve from --num-images or the prompts file: what is sampled.
    requests: tuple[PromptRequest, ...] | None = None

    def __post_init__(self):
        _path(self, "prompts", none=True)
        if self.num_images is not None:
            _image_count("num_images", self.num_images)
        if self.num_images is not None and self.prompts is not None:
            raise ConfigError("num_images", "and --prompts exclude each other")
        _int("batch_size", self.batch_size, low=1)
        _int("unit_size", self.unit_size, low=1, none=True)
        _int("steps", self.steps, low=1)
        _positive_finite("guidance_scale", self.guidance_scale, none=True)
        if self.requests is not None:
            total = sum(r.num_images for r in self.requests)
            if total > MAX_IMAGES:
                raise ConfigError("num_images", f"{total} in all is over the limit of {MAX_IMAGES} per run; "
                                                f"split it into several runs")
            check_seed(self.seed, sum(r.num_images for r in self.requests if r.seeds is None))
        else:
            check_seed(self.seed, None if self.prompts else (self.num_images or DEFAULT_NUM_IMAGES))

    @property
    def samples_per_unit(self) -> int:
        return self.unit_size or 4 * self.batch_size


@dataclass(frozen=True)
class BreachConfig:
    """What happens to a finished sample that the exact final check finds inside the shield."""

    on_breach: str = option("resample", "a finished sample inside the shield is drawn again with a derived seed "
                                        "(resample), not written (drop), or written and flagged (flag)", choices=POLICIES)
    max_attempts: int = option(4, "attempts per sample in all with --on-breach resample; then it is dropped", type=int)
    allow_off_manifold: bool = option(False, "do not count an output far from everything the corpus holds (or rough as "
                                             "noise) as a breach (docs/design.md: judges)", action="store_true")

    def __post_init__(self):
        _choice("on_breach", self.on_breach, POLICIES)
        _int("max_attempts", self.max_attempts, low=1)


@dataclass(frozen=True)
class PlacementConfig:
    """Where the job's actors run and how hard it retries; none of it changes a sample."""

    workers: int | None = option(None, "generation actors (default: one per GPU, else 1)", type=int)
    worker_resources: dict | None = option(None, "Ray custom resources each generation actor asks for, "
                                                 "e.g. '{\"node_b\": 0.01}'", metavar="JSON", json=True)
    index_servers: int = option(0, "serve the index from this many index-shard actors instead of loading it in "
                                   "every worker", type=int)
    index_resources: dict | None = option(None, "Ray custom resources each index-shard actor asks for (placement on a node)",
                                          metavar="JSON", json=True)
    max_unit_attempts: int = option(3, "attempts per work unit before the job fails (a dead worker or an unsearchable shield)",
                                    type=int)

    def __post_init__(self):
        _int("workers", self.workers, low=1, none=True)
        _int("index_servers", self.index_servers, low=0)
        _int("max_unit_attempts", self.max_unit_attempts, low=1)
        _resources("worker_resources", self.worker_resources)
        _resources("index_resources", self.index_resources)


PARTS = {"shield": ShieldConfig, "spell": SpellConfig, "sampling": SamplingConfig, "breach": BreachConfig,
         "placement": PlacementConfig}
# The option groups of ``spellshield generate --help``, in order.
GROUP_TITLES = {"shield": "shield", "spell": "SPELL correction", "sampling": "sampling", "breach": "breach policy",
                "placement": "placement (does not change a sample)"}


@dataclass(frozen=True)
class GenerateConfig:
    """A whole generation run: the model, the run directory and the parts above."""

    model: str
    out: str
    shield: ShieldConfig = field(default_factory=ShieldConfig)
    spell: SpellConfig = field(default_factory=SpellConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    breach: BreachConfig = field(default_factory=BreachConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    def __post_init__(self):
        for name in ("model", "out"):
            _path(self, name)
        for name, cls in PARTS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if self.placement.index_servers and self.shield.index is None:
            raise ConfigError("index_servers", "needs --index")
        if self.placement.index_servers and self.shield.search_backend == "sharded":
            # Index-shard actors are themselves the sharding; each runs one in-process backend.
            raise ConfigError("search_backend", "sharded runs the shards in each worker; with --index-servers choose "
                                                "the backend each server runs: exact, faiss or projected")

    # -- building ------------------------------------------------------------------------------------

    @classmethod
    def build(cls, model: str, out: str, **kwargs) -> GenerateConfig:
        """From flat keyword arguments named like the options (``steps=25, radius=4.0``) and/or
        whole parts (``spell=SpellConfig(...)``); unknown names raise ``TypeError``."""
        return cls(model=model, out=out, **split_parts(kwargs, PARTS, "generate"))

    @classmethod
    def from_args(cls, args) -> GenerateConfig:
        """From an argparse namespace made by ``add_arguments`` (the command-line edge)."""
        return cls.build(model=args.model, out=args.out, **option_values(args, *PARTS.values()))

    @staticmethod
    def option_names() -> list[str]:
        return ["model", "out"] + [f.name for part in PARTS.values() for f in fields(part) if f.metadata]

    # -- run.json and the run's identity ---------------------------------------------------------------

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> GenerateConfig:
        parts = {}
        for name, part_cls in PARTS.items():
            values = dict(data.get(name) or {})
            if name == "sampling" and values.get("requests") is not None:
                values["requests"] = tuple(
                    PromptRequest(r["prompt"], r["num_images"], tuple(r["seeds"]) if r.get("seeds") is not None else None)
                    for r in values["requests"])
            parts[name] = part_cls(**values)
        return cls(model=data["model"], out=data["out"], **parts)

    def digest(self) -> str:
        """sha256 of what decides the samples: everything but the run directory, where the prompts
        file lies (its content is in ``sampling.requests``) and the placement."""
        payload = self.to_json()
        for key in ("out", "placement"):
            payload.pop(key)
        payload["sampling"].pop("prompts")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def add_arguments(parser, groups=None) -> None:
    """The options of every part, one argparse group per part, every default shown."""
    for name, part_cls in PARTS.items():
        group = parser.add_argument_group(GROUP_TITLES[name])
        exclusive = group.add_mutually_exclusive_group() if name == "sampling" else None
        add_options(group, part_cls, route={"num_images": exclusive, "prompts": exclusive})


# -- the command-line edge, shared by every config ------------------------------------------------------

def add_options(group, cls, only=None, route=None) -> None:
    """One argparse option per field of ``cls`` that has help metadata (``only``: these fields),
    its default and help declared once, in the field; ``route`` puts a field's option elsewhere
    (a mutually exclusive group). A field with ``positional`` metadata is a positional argument."""
    for f in fields(cls):
        if not f.metadata or (only is not None and f.name not in only):
            continue
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        meta.pop("json", None)  # parsed by option_values, so that bad JSON is one line naming the flag
        positional = meta.pop("positional", False)
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and "(default" not in help_text and meta.get("action") != "store_true":
            help_text += f" (default {default})"
        target = (route or {}).get(f.name) or group
        if positional:
            target.add_argument(f.name, help=help_text, **meta)
        elif meta.get("required"):
            target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=help_text, **meta)
        else:
            target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default, help=help_text, **meta)


def option_values(args, *classes) -> dict:
    """The values of ``classes``' option fields in an argparse namespace (JSON options decoded)."""
    values = {}
    for cls in classes:
        for f in fields(cls):
            if not f.metadata or not hasattr(args, f.name):
                continue
            value = getattr(args, f.name)
            if f.metadata.get("json") and isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f.name, f"is not JSON: {exc.msg}") from None
            values[f.name] = value
    return values


def split_parts(kwargs: dict, parts: dict, what: str) -> dict:
    """Flat keyword arguments named like the options (``steps=25``) and/or whole parts
    (``spell=SpellConfig(...)``) -> one instance per part; leftovers raise ``TypeError``."""
    built = {}
    for name, part_cls in parts.items():
        given = kwargs.pop(name, None)
        own = {f.name: kwargs.pop(f.name) for f in fields(part_cls) if f.name in kwargs}
        if given is not None and own:
            raise TypeError(f"pass {name}= or its fields ({', '.join(own)}), not both")
        built[name] = given if given is not None else part_cls(**own)
    if kwargs:
        raise TypeError(f"unknown {what} option(s): {', '.join(sorted(kwargs))}")
    return built


def _path(config, name: str, none: bool = False) -> None:
    """``config.name`` is a path: a plain string (a local path or a URI: s3://, gs://), checked
    for existence later; a ``file://`` URI is replaced by the local path it names
    (``storage.normalise``: the Python API's edge, as ``jobs.paths`` is the command line's)."""
    value = getattr(config, name)
    if value is None and none:
        return
    if not isinstance(value, str) or not value:
        raise ConfigError(name, f"must be a path, got {value!r}")
    try:
        plain = storage.normalise(value)
    except storage.StorageError as exc:
        raise ConfigError(name, str(exc)) from None
    object.__setattr__(config, name, plain)  # frozen: set once, while it is being built


def required(help: str, **argparse_kwargs):
    """A field without a default: a required option (or, with ``positional=True``, an argument)."""
    if not argparse_kwargs.get("positional"):
        argparse_kwargs["required"] = True
    return field(metadata={"help": help, **argparse_kwargs})


# -- build-index -----------------------------------------------------------------------------------------

DEFAULT_SHARD_SIZE = 100_000  # vectors per FAISS shard; assembly holds one shard in memory
ENCODER_OPTIONS = ("encoder", "resolution", "batch_size", "num_encoders")  # what memorizer takes too


@dataclass(frozen=True)
class EncodeConfig:
    """How corpus images become latents: the encoder, the image size, the batches, the storage."""

    encoder: str = option("pixels", "'pixels', a diffusers autoencoder directory / hub id, or the TAEF2 weights "
                                    "directory (*.pth)")
    resolution: int = option(32, "images are resized and centre-cropped to N x N", type=int)
    batch_size: int = option(256, "images per encoder batch (and per chunk of a tar)", type=int)
    num_encoders: int = option(0, "encoder actors (default: one per GPU, or one on a cluster without GPUs)", type=int)
    dtype: str = option("float32", "storage of the latents: float32 (IndexFlatL2) or float16 (IndexScalarQuantizer "
                                   "QT_fp16)", choices=tuple(STORE_DTYPES))
    max_member_bytes: int = option(DEFAULT_MAX_MEMBER_BYTES, "tar members larger than this (tar header size) are "
                                   "rejected unread, with a row in rejects.parquet (default "
                                   f"{DEFAULT_MAX_MEMBER_BYTES}, {DEFAULT_MAX_MEMBER_BYTES >> 20} MiB)", type=int)
    min_size: int = 8  # images smaller than this on a side are rejected (not an option)

    def __post_init__(self):
        _path(self, "encoder")
        _int("resolution", self.resolution, low=1)
        _int("batch_size", self.batch_size, low=1)
        _int("num_encoders", self.num_encoders, low=0)
        _int("max_member_bytes", self.max_member_bytes, low=1)
        _int("min_size", self.min_size, low=1)
        _choice("dtype", self.dtype, tuple(STORE_DTYPES))


@dataclass(frozen=True)
class BuildConfig:
    """A whole build-index job: the corpus, the index directory, the encoding, the sharding."""

    corpus: str = required("WebDataset shards: brace pattern, glob, directory or comma list")
    out: str = required("index directory to create (an interrupted build resumes from OUT.partial)")
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    shard_size: int = option(DEFAULT_SHARD_SIZE, "vectors per FAISS shard; assembly holds one shard in memory", type=int)

    def __post_init__(self):
        _path(self, "corpus")
        _path(self, "out")
        if not isinstance(self.encode, EncodeConfig):
            raise TypeError(f"encode must be an EncodeConfig, got {type(self.encode).__name__}")
        _int("shard_size", self.shard_size, low=1)

    @classmethod
    def build(cls, corpus: str, out: str, **kwargs) -> BuildConfig:
        """From keyword arguments named like the options (``resolution=8, shard_size=500``) and/or
        ``encode=EncodeConfig(...)``; unknown names raise ``TypeError``."""
        own = {name: kwargs.pop(name) for name in ("shard_size",) if name in kwargs}
        return cls(corpus=corpus, out=out, **own, **split_parts(kwargs, {"encode": EncodeConfig}, "build-index"))

    @classmethod
    def from_args(cls, args) -> BuildConfig:
        return cls.build(**option_values(args, cls, EncodeConfig))

    @staticmethod
    def add_arguments(parser) -> None:
        add_options(parser, BuildConfig, only=("corpus", "out"))
        add_options(parser.add_argument_group("encoding"), EncodeConfig)
        add_options(parser.add_argument_group("index"), BuildConfig, only=("shard_size",))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# -- audit -----------------------------------------------------------------------------------------------

FAIL_ON = ("upper", "rate")  # what the gate compares: the 95% interval's upper bound, or the rate


@dataclass(frozen=True)
class GateConfig:
    """The audit's gate (auditing.summary.verdict); without ``fail_above`` the audit is not gated."""

    fail_above: float | None = option(None, "gate: exit 1 when the rate (see --fail-on) is above RATE (0..1) or the "
                                            "run is incomplete", type=float, metavar="RATE")
    fail_on: str = option("upper", "what --fail-above compares: the upper bound of the 95%% interval (upper) or the "
                                   "rate", choices=FAIL_ON)

    def __post_init__(self):
        if self.fail_above is not None:
            if isinstance(self.fail_above, bool) or not isinstance(self.fail_above, (int, float)) \
                    or not 0.0 <= self.fail_above <= 1.0:  # nan fails the comparison too
                raise ConfigError("fail_above", f"must be a rate in [0, 1], got {self.fail_above!r}")
        _choice("fail_on", self.fail_on, FAIL_ON)

    @property
    def gated(self) -> bool:
        return self.fail_above is not None


@dataclass(frozen=True)
class AuditConfig:
    """A whole audit: the run, the index and radius it is measured against, the report, the gate."""

    run_dir: str = required("run directory written by generate", positional=True, metavar="RUN_DIR")
    index: str | None = option(None, "recompute every image's nearest neighbour in this index (default: the run's)",
                               metavar="INDEX_DIR")
    radius: float | None = option(None, "near-duplicate radius (default: the run's, else the index's)", type=float)
    top: int = option(12, "offending corpus images shown in the report", type=int)
    compare: str | None = option(None, "a second run to put side by side", metavar="RUN_B")
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self):
        _path(self, "run_dir")
        _path(self, "index", none=True)
        _path(self, "compare", none=True)
        _positive_finite("radius", self.radius, none=True)
        _int("top", self.top, low=0)
        if not isinstance(self.gate, GateConfig):
            raise TypeError(f"gate must be a GateConfig, got {type(self.gate).__name__}")

    @classmethod
    def build(cls, run_dir: str, **kwargs) -> AuditConfig:
        """From keyword arguments named like the options (``radius=4.0, fail_above=0.01``) and/or
        ``gate=GateConfig(...)``; unknown names raise ``TypeError``."""
        own = {name: kwargs.pop(name) for name in ("index", "radius", "top", "compare") if name in kwargs}
        return cls(run_dir=run_dir, **own, **split_parts(kwargs, {"gate": GateConfig}, "audit"))

    @classmethod
    def from_args(cls, args) -> AuditConfig:
        return cls.build(**option_values(args, cls, GateConfig))

    @staticmethod
    def add_arguments(parser) -> None:
        add_options(parser, AuditConfig)
        add_options(parser.add_argument_group("gate"), GateConfig)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
