"""Path options as they enter a job: ``file://`` URIs made plain paths, and, in a job submitted
with ``ray job submit``, relative paths refused.

``normalise_paths`` turns every ``file:///abs`` (or each part of a comma list) into ``/abs``
(``storage.normalise``), so that no job ever holds a ``file://`` string: they tell local from
remote by ``storage.is_remote`` and hand local paths to ``os`` and ``glob``.

A Ray job's driver runs in a temporary copy of the uploaded ``--working-dir``
(``/tmp/ray/session_*/runtime_resources/working_dir_files/...``), not in the directory it was
submitted from, and the submitter's directory is not sent along: a relative ``--out index``
would write the index into that copy, where nobody looks and Ray deletes it later, and a
relative ``--corpus`` reads the copy. So inside a Ray job every relative path option is refused
with one line saying why; outside one, a relative path is relative to the current directory,
which is the submitter's. URIs (``scheme://...``) pass untouched.

``jobs.cli`` applies both to every command's options before the job starts.
"""

from __future__ import annotations

import os

from spellshield import storage
from spellshield.jobs.runtime import UsageError

# Options that name files or directories, by argparse dest; values may be comma lists.
PATH_OPTIONS = ("corpus", "out", "model", "index", "prompts", "resume", "run_dir", "compare", "holdout", "index_dir",
                "descriptor")
# ... and those that may also name something else ('pixels', a hub id): not checked for relative paths.
NAME_OR_PATH_OPTIONS = ("encoder",)
POSITIONAL = ("run_dir", "index_dir")  # arguments, named by their metavar in messages


def in_ray_job() -> bool:
    """True in the driver of a job submitted with ``ray job submit`` (Ray's job supervisor hands
    the driver its job config in this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _relative(value: str) -> bool:
    return bool(value) and "://" not in value and not os.path.isabs(os.path.expanduser(value))


def _flag(dest: str) -> str:
    return dest.upper() if dest in POSITIONAL else "--" + dest.replace("_", "-")


def normalise_paths(args) -> None:
    """Every path option of ``args`` (an argparse namespace) as ``storage.normalise`` gives it, in place."""
    for dest in PATH_OPTIONS + NAME_OR_PATH_OPTIONS:
        value = getattr(args, dest, None)
        if isinstance(value, str):
            try:
                setattr(args, dest, storage.normalise(value))
            except storage.StorageError as exc:
                raise UsageError(f"{_flag(dest)} {exc}") from None


def check_job_paths(args, options=PATH_OPTIONS) -> None:
    """Refuse relative path options when running as a Ray job (see the module doc)."""
    if not in_ray_job():
        return
    for dest in options:
        value = getattr(args, dest, None)
        if not isinstance(value, str):
            continue
        relative = [part for part in value.split(",") if _relative(part.strip())]
        if relative:
            raise UsageError(
                f"{_flag(dest)} {relative[0]} is a relative path, and this runs as a Ray job, whose working directory is a "
                f"temporary copy of the uploaded --working-dir ({os.getcwd()}): give an absolute path, e.g. \"$PWD/{relative[0]}\"")
