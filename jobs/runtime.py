"""Connecting to Ray, and the one way a job reports bad input.

Every job runs on the cluster named by ``--address`` or ``RAY_ADDRESS`` (that is how
``ray job submit`` hands a job its cluster), and otherwise on a local cluster started for it
with ``ray.init(address="local")``: a bare ``ray.init()`` could attach to a stale cluster left
by another process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

from spellshield.workers.console import VERBOSE, verbose


class UsageError(ValueError):
    """Bad input to a job: reported as one line on stderr with exit code 2, nothing written."""


@contextlib.contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None):
    """Use the running Ray session, or connect/start one for the duration of the block."""
    import ray  # here, not at the top: every job's --help imports this module
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    with console(remote=bool(address)) as kwargs:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, **kwargs)
        try:
            yield
        finally:
            ray.shutdown()


@contextlib.contextmanager
def console(remote: bool):
    """What reaches the console while a job's Ray session is up; yields the ``ray.init`` options.

    Quiet unless SPELLSHIELD_VERBOSE=1 (``--verbose``): Ray's own driver messages at ERROR only;
    no worker output forwarded (the driver prints the job's progress, and a worker's failure
    reaches it as an exception); and no "(raylet) A worker died ... / Task failed, N retries
    remaining" lines: the job restarts actors and retries units itself, and says so when it
    finally fails. Ray 2.x has no option for those lines (the driver's error listener prints
    them straight to stdout), so they are paused with the module flag Ray's own debugger uses
    (ray.util.rpdb) and restored afterwards. Verbose: all of it, and the variable travels to the
    workers of a remote cluster (a local cluster's workers inherit this environment), whose
    ``quiet_libraries`` then leaves the libraries' warnings on.
    """
    if verbose():
        options = dict(logging_level=logging.WARNING, log_to_driver=True)
        # ray.init refuses to set again a variable the job's own runtime env (ray job submit
        # --runtime-env-json) sets; then the workers have it already.
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        if remote and VERBOSE not in ((job.get("runtime_env") or {}).get("env_vars") or {}):
            options["runtime_env"] = {"env_vars": {VERBOSE: os.environ[VERBOSE]}}
        yield options
        return
    import ray

    printer = ray._private.worker
    printing = getattr(printer, "_worker_logs_enabled", True)
    printer._worker_logs_enabled = False
    try:
        yield dict(logging_level=logging.ERROR, log_to_driver=False)
    finally:
        printer._worker_logs_enabled = printing


QUIET_ENV, VERBOSE_ENV = "SPELLSHIELD_QUIET", "SPELLSHIELD_VERBOSE"


def set_loudness(quiet: bool = False, verbose: bool = False) -> None:
    """``--quiet`` / ``--verbose`` for this process and the Ray workers it starts (environment)."""
    for name, on in ((QUIET_ENV, quiet), (VERBOSE_ENV, verbose)):
        if on:
            os.environ[name] = "1"
        else:
            os.environ.pop(name, None)


def progress(message: str) -> None:
    """One line of progress on stderr (the console of a local run or of a Ray job); none with --quiet."""
    if os.environ.get(QUIET_ENV) != "1":
        print(message, file=sys.stderr, flush=True)
