"""run.json: what a run is (config, its sha256, the options, the index manifest's sha256,
package versions) and how far it got (status, progress per unit), written atomically as the job
goes; and the clean-up of temporary files left by attempts that died."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from typing import TYPE_CHECKING

from spellshield import storage
from spellshield.indexing.manifest import manifest_hash, write_json_atomic
from spellshield.jobs.runtime import QUIET_ENV, UsageError, progress

if TYPE_CHECKING:
    from spellshield.jobs.run_config import GenerateConfig

from spellshield.workers.run_layout import LOCK_FILE, RUN_FILE, SAMPLES_DIR  # noqa: E402
RUN_FORMAT = 2  # 2: the config nested by part (pipeline.config), no separate "args"


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("spellshield", "torch", "diffusers", "ray", "faiss-cpu", "pyarrow", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def write_run_json(config: GenerateConfig, status: str, progress_info: dict, error: str | None = None) -> None:
    payload = {
        "format_version": RUN_FORMAT,
        "status": status,
        "config": config.to_json(),
        "config_sha256": config.digest(),
        "index_manifest_sha256": manifest_hash(config.shield.index) if config.shield.index else None,
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


@contextlib.contextmanager
def run_lock(run_dir: str):
    """Hold ``RUN/.lock`` for the block: one driver per run directory.

    An exclusive ``flock``: the kernel releases it when the holder exits, however it exits, so a
    crashed or killed driver never leaves the run locked. A second driver is refused with one
    line naming the holder (pid, host, start time, written into the lock file).
    """
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UsageError(f"{run_dir} is being written by another generate driver ({holder}); "
                         "wait for it to end, or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    try:
        yield
    finally:
        os.close(fd)


def units_written(run_dir: str) -> int:
    samples = os.path.join(run_dir, SAMPLES_DIR)
    return sum(name.endswith(".parquet") for name in os.listdir(samples)) if os.path.isdir(samples) else 0


def discard_unstarted(run_dir: str, created: bool) -> bool:
    """After a failure before any unit was written: remove what this driver made (run.json, the
    lock, empty folders; the directory itself if it created it), so the same command can simply
    be run again. Returns False, touching nothing, if any unit is on disk."""
    if units_written(run_dir):
        return False
    for name in (RUN_FILE, LOCK_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, name))
    for root, dirs, files in sorted(os.walk(run_dir), key=lambda entry: -len(entry[0])):
        if root != run_dir and not os.listdir(root):
            os.rmdir(root)
    if created and not os.listdir(run_dir):
        shutil.rmtree(run_dir)
    return True


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


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Units done / total, images/s and hits/s: on the console (one updating line on a terminal,
    a line per unit otherwise) and in run.json as the job goes."""

    def __init__(self, config: GenerateConfig, info: dict):
        self.config, self.info = config, info
        self.started = time.time()
        self.images = self.hits = self.samples = 0
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
        write_run_json(self.config, "running", info)
        info["run_json_seconds"] = round(info.get("run_json_seconds", 0.0) + time.time() - t0, 4)
        done, total = info["units_done"], info["units_total"]
        self.samples += summary["samples"]
        samples_done, samples_total = info["samples_done"], info["samples_total"]
        eta = elapsed / self.samples * max(samples_total - samples_done, 0)  # at this driver's own pace
        line = (f"generate: {samples_done}/{samples_total} images ({done}/{total} units), "
                f"{info['images_per_second']:.2f} images/s, {info['hits_per_second']:.1f} hits/s, "
                f"ETA {format_seconds(eta) if done < total else 'done'}")
        if self.tty and os.environ.get(QUIET_ENV) != "1":
            width = 24
            bar = "#" * int(width * done / max(total, 1))
            print(f"\r[{bar:<{width}}] {line}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        else:
            progress(line)
