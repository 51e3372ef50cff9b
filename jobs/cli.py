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


class Parser(argparse.ArgumentParser):
    """argparse's own errors (a bad number, an unknown choice, a missing option) as one line that
    points to --help, like every other bad input, instead of the whole usage block; exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("spellshield")
    except PackageNotFoundError:
        return "unknown (not installed)"


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("console")
    loudness = group.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", action="store_true", help="no progress lines; errors only")
    loudness.add_argument("--verbose", action="store_true",
                          help="also the libraries' warnings and Ray's worker logs (hidden by default: nothing to act on)")


def build_parser(only: str | None = None, options_of=None) -> argparse.ArgumentParser:
    """The parser of one command (``only``), or of all: with ``options_of`` (command names), only
    those commands get their options, so that only their modules are imported (each pulls in
    torch, Ray...): ``spellshield --help`` imports none."""
    if only is not None:
        module_name, help_text = COMMANDS[only]
        parser = Parser(prog=f"spellshield {only}", description=help_text)
        importlib.import_module(module_name).add_arguments(parser)
        add_output_arguments(parser)
        return parser
    parser = Parser(prog="spellshield", description="Copyright shielding for diffusion models (SPELL).")
    parser.add_argument("--version", action="version", version=f"spellshield {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if options_of is None or name in options_of:
            importlib.import_module(module_name).add_arguments(p)
            add_output_arguments(p)
    return parser


def every_command() -> list[tuple[str, ...]]:
    """Every command line that has its own ``--help``: each command, and each action of a command
    with actions (``index calibrate``). Imports every job module (tests and benchmarks use it)."""
    found = []
    for name in COMMANDS:
        found.append((name,))
        for action in build_parser(name)._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += [(name, sub) for sub in action.choices]
    return found


def _run(command: str, args) -> int:
    from spellshield.indexing.corpus import CorpusError
    from spellshield.indexing.manifest import IndexFormatError
    from spellshield.jobs.paths import check_job_paths, normalise_paths
    from spellshield.jobs.runtime import UsageError, set_loudness
    from spellshield.storage import StorageError

    module = importlib.import_module(COMMANDS[command][0])
    set_loudness(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    try:
        normalise_paths(args)  # file:///abs -> /abs: no job sees a file:// string
        check_job_paths(args)  # a relative path in a Ray job points into Ray's copy of the working dir
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
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level has no other options
    args = build_parser(options_of=[command]).parse_args(argv)
    return _run(args.command, args)


if __name__ == "__main__":
    raise SystemExit(main())
