"""Small pure checks of option values, shared by the jobs' validation (bad input: one line, exit 2).

Each raises UsageError naming the option and the value, and writes nothing; they run before Ray
starts. ``run_config.validate`` and ``build_index.plan_build`` call them. Checks of a value alone
(finite, in range, a seed, an image count) belong to the config classes (``pipeline.config``).
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile

from spellshield.indexing.manifest import manifest_hash, read_manifest
from spellshield.jobs.runtime import UsageError
from spellshield.pipeline.config import ConfigError


def from_args(make, args):
    """The command-line edge of a config: ``make(args)`` (e.g. ``BuildConfig.from_args``), a bad
    value one line naming its flag (``--resolution must be >= 1, got 0``)."""
    try:
        return make(args)
    except ConfigError as exc:
        raise UsageError(exc.flag) from None


def check_out_path(path: str, option: str = "--out", allow_symlink: bool = True) -> None:
    """``path`` can be created (or is a directory) and written: not inside a regular file, not a
    dangling symlink, somewhere this process may write. The probe directory it makes in the
    nearest existing ancestor is removed at once."""
    if os.path.islink(path):
        if not os.path.exists(path):
            raise UsageError(f"{option} {path} is a dangling symbolic link (to {os.readlink(path)})")
        if not allow_symlink:
            raise UsageError(f"{option} {path} is a symbolic link (to {os.readlink(path)}); give the directory itself, "
                             f"{os.path.realpath(path)}")
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    if not os.path.isdir(ancestor):
        raise UsageError(f"{option} {path}: {ancestor} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".spellshield-probe-", dir=ancestor))
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write in {ancestor} ({exc.strerror})") from None


SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_index_pin(index_dir: str, pinned: str | None) -> str:
    """The sha256 of the index's manifest.json; with ``pinned`` (``--index-sha256``), it must be that.

    Pinning the manifest pins everything the shield trusts: the manifest holds the sha256 of
    every shard file and id table, and the calibration that gives the default radius."""
    actual = manifest_hash(index_dir)
    if pinned is None:
        return actual
    if not SHA256_HEX.fullmatch(pinned.lower()):
        raise UsageError(f"--index-sha256 must be 64 hex digits, got {pinned!r}")
    if actual != pinned.lower():
        raise UsageError(f"{index_dir}/manifest.json has sha256 {actual}, not the pinned --index-sha256 {pinned.lower()} "
                         f"(the index was changed or is another one)")
    return actual


def radius_line(radius: float | None, given: float | None, index_dir: str | None) -> str:
    """The one line generate prints at start: the radius in use, where it came from, and the
    manifest's sha256 (what ``--index-sha256`` pins)."""
    if index_dir is None:
        return "generate: no --index: the run is NOT shielded"
    if given is not None:
        source = "--radius"
    else:
        rule = read_manifest(index_dir).calibration.get("rule")
        source = "the index manifest's calibration" + (f" ({rule})" if rule else "")
    return f"generate: shield radius {radius:.6g} from {source}; index {index_dir}, manifest sha256 {manifest_hash(index_dir)}"


# What loading undecodable weights raises: torch.load (pickle, zip), safetensors, diffusers.
def weight_load_errors() -> tuple:
    errors = [ValueError, OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)
