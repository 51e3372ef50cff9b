"""run.json: what a run is (config, its sha256, the options, the index manifest's sha256,
package versions) and how far it got (status, progress per unit), written atomically as the job
goes; and the clean-up of temporary files left by attempts that died."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING

from spellshield import storage
from spellshield.indexing.manifest import manifest_hash, write_json_atomic
from spellshield.jobs.runtime import UsageError, progress

if TYPE_CHECKING:
    from spellshield.jobs.run_config import GenerateConfig

RUN_FILE = "run.json"
RUN_FORMAT = 1


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("spellshield", "torch", "diffusers", "ray", "faiss-cpu", "pyarrow", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def write_run_json(config: GenerateConfig, status: str, progress_info: dict, args: dict, error: str | None = None) -> None:
    payload = {
        "format_version": RUN_FORMAT,
        "status": status,
        "config": config.to_json(),
        "config_sha256": config.digest(),
        "args": args,
        "index_manifest_sha256": manifest_hash(config.index) if config.index else None,
        "versions": package_versions(),
        "progress": progress_info,
    }
    if error is not None:
        payload["error"] = error
    if storage.is_remote(config.out):
        storage.write_json(storage.resolve(config.out).child(RUN_FILE), payload)  # one PUT: whole
    else:
        write_json_atomic(os.path.join(config.out, RUN_FILE), payload)


def read_run_json(run_dir: str) -> dict:
    if storage.is_remote(run_dir):
        try:
            if not storage.exists(storage.resolve(run_dir).child(RUN_FILE)):
                raise UsageError(f"{run_dir} holds no run to resume (no {RUN_FILE})")
            return storage.read_json(storage.resolve(run_dir).child(RUN_FILE))
        except storage.StorageError as exc:
            raise UsageError(str(exc)) from None
    path = os.path.join(run_dir, RUN_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{run_dir} holds no run to resume (no {RUN_FILE})") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc.msg}") from None


def remove_stale_temporaries(run_dir: str) -> int:
    """Temporary files of attempts that died (never renamed into place): safe to delete."""
    removed = 0
    if storage.is_remote(run_dir):
        return removed  # uncommitted attempts on an object store: storage.commit.roll_forward
    for root, _, files in os.walk(run_dir):
        for name in files:
            if ".tmp-" in name:
                os.remove(os.path.join(root, name))
                removed += 1
    return removed


class Progress:
    """Units done / total, images/s and hits/s: on the console (one updating line on a terminal,
    a line per unit otherwise) and in run.json as the job goes."""

    def __init__(self, config: GenerateConfig, args: dict, info: dict):
        self.config, self.args, self.info = config, args, info
        self.started = time.time()
        self.images = self.hits = 0
        self.tty = sys.stderr.isatty()

    def unit_done(self, unit, summary: dict) -> None:
        info = self.info
        self.images += summary["written"]
        self.hits += summary["hits"]
        info["units_done"] += 1
        info["samples_done"] = info.get("samples_done", 0) + summary["samples"]
        info["images_written"] = info.get("images_written", 0) + summary["written"]
        elapsed = max(time.time() - self.started, 1e-9)
        info.update(images_per_second=round(self.images / elapsed, 3), hits_per_second=round(self.hits / elapsed, 3),
                    elapsed_seconds=round(elapsed, 3))
        info.setdefault("units", {})[unit.name] = {
            k: summary[k] for k in ("node", "pid", "seconds", "samples", "written", "attempts", "hits", "sample_seconds",
                                    "check_seconds", "write_seconds")
        }
        t0 = time.time()
        write_run_json(self.config, "running", info, self.args)
        info["run_json_seconds"] = round(info.get("run_json_seconds", 0.0) + time.time() - t0, 4)
        done, total = info["units_done"], info["units_total"]
        line = (f"generate: {done}/{total} units, {info['images_per_second']:.2f} images/s, "
                f"{info['hits_per_second']:.1f} hits/s")
        if self.tty:
            width = 24
            bar = "#" * int(width * done / max(total, 1))
            print(f"\r[{bar:<{width}}] {line}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        else:
            progress(line)
