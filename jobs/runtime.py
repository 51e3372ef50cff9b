"""Connecting to Ray, and the one way a job reports bad input.

Every job runs on the cluster named by ``--address`` or ``RAY_ADDRESS`` (that is how
``ray job submit`` hands a job its cluster), and otherwise on a local cluster started for it
with ``ray.init(address="local")``: a bare ``ray.init()`` could attach to a stale cluster left
by another process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import ray


class UsageError(ValueError):
    """Bad input to a job: reported as one line on stderr with exit code 2, nothing written."""


@contextlib.contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None):
    """Use the running Ray session, or connect/start one for the duration of the block."""
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


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
