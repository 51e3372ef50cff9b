"""Loading a saved diffusers pipeline, and reading what it samples without loading weights.

``load_pipeline`` takes any pipeline directory saved with ``save_pretrained``: diffusers'
own classes through ``DiffusionPipeline.from_pretrained``, and this package's (the memorizer)
through their own class, which diffusers cannot look up by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

DENOISER_COMPONENTS = ("unet", "transformer")


class ModelDirError(ValueError):
    """A model directory that is missing or is not a saved diffusers pipeline."""


@dataclass(frozen=True)
class ModelSpec:
    """What a pipeline directory samples, read from its config files."""

    path: str
    pipeline_class: str
    latent_shape: tuple[int, int, int]  # C, H, W of what the scheduler steps on
    vae_path: str | None  # component directory of the autoencoder, None for pixel-space models


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelDirError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{path} is not valid JSON: {exc}") from None


def describe_model(model_dir: str) -> ModelSpec:
    if not os.path.isdir(model_dir):
        raise ModelDirError(f"model directory {model_dir} does not exist")
    index = _read_json(os.path.join(model_dir, "model_index.json"))
    check_components(model_dir, index)
    denoiser = next((c for c in DENOISER_COMPONENTS if isinstance(index.get(c), list) and index[c][0]), None)
    if denoiser is None:
        raise ModelDirError(f"{model_dir}: model_index.json names no unet or transformer")
    config = _read_json(os.path.join(model_dir, denoiser, "config.json"))
    size = config.get("sample_size")
    if isinstance(size, int):
        size = (size, size)
    channels = config.get("in_channels")
    if channels is None or size is None:
        raise ModelDirError(f"{model_dir}/{denoiser}/config.json has no in_channels/sample_size")
    vae = index.get("vae")
    vae_path = os.path.join(model_dir, "vae") if isinstance(vae, list) and vae[0] else None
    return ModelSpec(
        path=model_dir,
        pipeline_class=index.get("_class_name", ""),
        latent_shape=(int(channels), int(size[0]), int(size[1])),
        vae_path=vae_path,
    )


def pipeline_class(spec: ModelSpec):
    """The class that loads ``spec``: this package's own, or diffusers' by name; a DiffusionPipeline."""
    import diffusers

    from . import memorizer

    ours = {"MemorizerPipeline": memorizer.MemorizerPipeline}
    cls = ours.get(spec.pipeline_class) or getattr(diffusers, spec.pipeline_class, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelDirError(f"{spec.path}: unknown pipeline class {spec.pipeline_class!r}")
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ModelDirError(f"{spec.path}: model_index.json _class_name {spec.pipeline_class!r} is not a diffusers pipeline class")
    return cls


# Libraries a model_index.json component may come from. diffusers imports the module a component
# names before it looks the class up, so any other name would import arbitrary code on load.
COMPONENT_LIBRARIES = ("diffusers", "transformers")


def check_components(model_dir: str, index) -> None:
    """model_index.json's shape, before anything is imported from it: a string ``_class_name``,
    and each component ``[library, class]`` (or ``[null, null]``) with the library diffusers,
    transformers or this package, and the class found in it. Raises ModelDirError naming the entry."""
    import importlib

    where = f"{model_dir}/model_index.json"
    if not isinstance(index, dict):
        raise ModelDirError(f"{where} is not a JSON object")
    if not isinstance(index.get("_class_name"), str):
        raise ModelDirError(f"{where}: _class_name must be a string naming a pipeline class, got {index.get('_class_name')!r}")
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        if value == [None, None]:
            continue
        if len(value) != 2 or not all(isinstance(v, str) for v in value):
            raise ModelDirError(f"{where}: component {name!r} must be [library, class], got {value!r}")
        library, class_name = value
        root = library.split(".")[0]
        if root in (OWN_PACKAGE, *LEGACY_PACKAGES):
            module_name = library if root == OWN_PACKAGE else f"{OWN_PACKAGE}.{library}"
        elif library in COMPONENT_LIBRARIES:
            module_name = library
        else:
            raise ModelDirError(f"{where}: component {name!r} comes from library {library!r}; only "
                                f"{', '.join(COMPONENT_LIBRARIES)} and {OWN_PACKAGE} components are loaded")
        try:
            found = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            found = None
        if not isinstance(found, type):
            raise ModelDirError(f"{where}: component {name!r} names {library}.{class_name}, which is not a class of {library}")


def absent_components(model_dir: str) -> list[str]:
    """Components saved as ``[null, null]`` in model_index.json: the pipeline was saved without them.

    diffusers writes a component that was None this way but, unless the class lists it as
    optional, refuses to load the directory without being told again (e.g. SD3 without its T5
    text encoder, which StableDiffusion3Pipeline supports by feeding zeros).
    """
    index = _read_json(os.path.join(model_dir, "model_index.json"))
    return sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v == [None, None])


# Components of this project's own package that a saved pipeline may name in model_index.json
# (the memorizer's UNet, the TAEF2 autoencoder). diffusers loads a component only from a module
# already imported; we import these, and only these, by name. Models saved before the package
# moved under ``spellshield`` name ``pipeline.memorizer`` / ``indexing.taef2``: those old module
# names are aliased to the new modules, so such a directory still loads.
OWN_PACKAGE = "spellshield"
LEGACY_PACKAGES = ("pipeline", "indexing")


def import_own_components(model_dir: str) -> list[str]:
    """Import the modules of this project that ``model_index.json`` names; returns their names."""
    import importlib
    import sys

    index = _read_json(os.path.join(model_dir, "model_index.json"))
    modules = sorted({v[0] for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                      and isinstance(v[0], str) and v[0].split(".")[0] in (OWN_PACKAGE, *LEGACY_PACKAGES)})
    for name in modules:
        if name.split(".")[0] in LEGACY_PACKAGES:
            sys.modules.setdefault(name, importlib.import_module(f"{OWN_PACKAGE}.{name}"))
        else:
            importlib.import_module(name)
    return modules


def load_pipeline(model_dir: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load the pipeline saved at ``model_dir`` onto ``device``."""
    cls = pipeline_class(describe_model(model_dir))
    import_own_components(model_dir)
    kwargs = {name: None for name in absent_components(model_dir)}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = cls.from_pretrained(model_dir, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
