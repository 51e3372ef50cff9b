"""What a worker process prints: quiet by default, everything with SPELLSHIELD_VERBOSE=1.

The driver decides (``jobs.runtime.console_options``, set by ``--verbose``) and the variable
reaches every worker; each worker class calls ``quiet_libraries()`` first thing in ``__init__``.
"""

from __future__ import annotations

import os

VERBOSE = "SPELLSHIELD_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE, "") not in ("", "0")


def quiet_libraries() -> None:
    """Library warnings a user cannot act on off, unless verbose: diffusers' "accelerate was not
    found" (and the like) on every model load, transformers' weight-loading notes. Loading bars
    are always off: Ray forwards worker output to the driver late and out of order, so a
    replacement actor's bar could land after the job's last line; the driver prints progress."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    if verbose():
        return
    diffusers_logging.set_verbosity_error()
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # only conditional pipelines need transformers
        return
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
