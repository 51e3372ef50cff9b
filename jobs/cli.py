"""The ``spellshield`` command: one sub-command per job, each with its own ``--help``.

Bad input (a missing corpus, a radius <= 0, an index that does not fit the model, an output
directory that already holds a result...) ends with one line on stderr and exit code 2; nothing
is written. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "build-index": ("spellshield.jobs.build_index", "encode a WebDataset corpus into a sharded FAISS shield index"),
    "memorizer": ("spellshield.jobs.memorizer", "save a memorizing diffusion model of a corpus (the honest worst case)"),
    "generate": ("spellshield.jobs.generate", "sample a diffusers pipeline with the SPELL shield, writing images and audit logs"),
    "audit": ("spellshield.jobs.audit", "near-duplicate rates, per-step sparsity and a report for a generation run"),
    "index": ("spellshield.jobs.index", "look after a finished index: calibrate (radius from 1-NN distances), verify (checksums, ids)"),
    "project-index": ("spellshield.jobs.project_index", "fit the projected search backend's PCA filter on an index and write its files"),
    "demo": ("spellshield.jobs.demo", "offline end-to-end demo: corpus, index, memorizer, generate with and without shield, audit"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    if only is not None:
        module_name, help_text = COMMANDS[only]
        parser = argparse.ArgumentParser(prog=f"spellshield {only}", description=help_text)
        importlib.import_module(module_name).add_arguments(parser)
        return parser
    parser = argparse.ArgumentParser(prog="spellshield", description="Copyright shielding for diffusion models (SPELL).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(p)
    return parser


def _run(command: str, args) -> int:
    from spellshield.indexing.corpus import CorpusError
    from spellshield.indexing.manifest import IndexFormatError
    from spellshield.jobs.runtime import UsageError
    from spellshield.storage import StorageError

    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.run(args) or 0)
    except (UsageError, CorpusError, IndexFormatError, StorageError) as exc:
        print(f"spellshield {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spellshield {command}: interrupted", file=sys.stderr)
        return 130


def run_single(command: str, argv=None) -> int:
    """Entry point of ``python -m spellshield.jobs.<name>``: the same options as ``spellshield <command>``."""
    args = build_parser(command).parse_args(argv)
    return _run(command, args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return _run(args.command, args)


if __name__ == "__main__":
    raise SystemExit(main())
