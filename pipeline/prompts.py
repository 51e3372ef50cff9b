"""Prompts files: JSONL, one request per line, read into ``PromptRequest``s.

Each line is a JSON string (one image of that prompt) or an object with ``"prompt"`` and
optional ``"num_images"`` and ``"seeds"``. A bad line is refused with its number: this module
checks what only the file can say (UTF-8, JSON, the shape of a line, the running total of
images); the values of a request (an image count, seeds in 0..MAX_SEED) are checked once, by
``PromptRequest`` itself, and its error gets the line number added here.

Plain Python (no Ray, no torch); reads local files and object-store URIs (``spellshield.storage``).
"""

from __future__ import annotations

import io
import json

from spellshield import storage
from spellshield.pipeline.config import MAX_IMAGES, ConfigError, PromptRequest


class PromptsError(ValueError):
    """A prompts file that cannot be read; the message names the file and the line."""


def read_prompts(path: str, max_images: int = MAX_IMAGES) -> list[PromptRequest]:
    """The requests of the prompts file at ``path`` (a local path or a URI), in order.

    The running total of images is checked as the lines are read: a huge ``"num_images"`` is
    refused before anything is planned.
    """
    requests = []
    total = 0
    try:
        if storage.is_remote(path):  # a small file: read whole from the object store
            f = io.BytesIO(storage.read_bytes(path))
        else:
            f = open(path, "rb")
    except OSError as exc:
        raise PromptsError(f"cannot read prompts file {path}: {exc.strerror}") from None
    except storage.StorageError as exc:
        raise PromptsError(f"cannot read prompts file: {exc}") from None
    with f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PromptsError(f"{where} is not valid UTF-8 (byte {exc.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptsError(f"{where} is not JSON: {exc.msg}") from None
            if isinstance(value, str):
                value = {"prompt": value}
            if not isinstance(value, dict) or not isinstance(value.get("prompt"), str):
                raise PromptsError(f"{where}: expected a string or an object with a \"prompt\" string")
            seeds = value.get("seeds") or None  # [] is no seeds
            num = value.get("num_images", len(seeds) if isinstance(seeds, list) else 1)
            if type(num) is int:  # a count that is no integer is the request's to refuse
                total += num
                if total > max_images:
                    raise PromptsError(f"{where}: {total} images in all so far, over the limit of {max_images} "
                                       f"per run; split the prompts into several runs")
            try:
                requests.append(PromptRequest(value["prompt"], num, tuple(seeds) if isinstance(seeds, list) else seeds))
            except ConfigError as exc:  # the request's own checks, with the line added
                raise PromptsError(f"{where}: \"{exc.name}\" {exc.message}") from None
    if not requests:
        raise PromptsError(f"prompts file {path} has no prompts")
    return requests
