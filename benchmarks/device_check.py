"""Device check: SPELL on CUDA tensors gives what it gives on the CPU.

    python -m benchmarks.device_check [--device cuda]     (prints one line per check)

(``--device cpu`` runs the same comparisons CPU against CPU: a dry run of the script itself.)

For every scheduler family of spellshield.toys.schedulers (those tests/test_scheduler_families.py
checks), the same step with the same inputs and shield sources (static points, batch siblings, a
history bank) on cuda and on cpu: the corrected outputs agree to float tolerance and the same hits
are found. Then the tiny StableDiffusion and SD3 pipelines on cuda: a shield that never hits is
bit-for-bit the plain pipeline there too, and one placed at a step-0 prediction is hit.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time

import numpy as np
import torch

from spellshield.pipeline.scheduler import ShieldedScheduler, SpellConfig
from spellshield.pipeline.sources import BatchSource, HistorySource, SampleRow, StaticSource


def scheduler_checks(device: str) -> None:
    from spellshield.toys.schedulers import CASES, advanced, step_kwargs

    for case in CASES:
        sched, t, x_t, m = advanced(case, 3)
        flat = x_t.reshape(3, -1)
        results = {}
        for dev in ("cpu", device):
            history = HistorySource(radius=1e6, size=2)
            history.add("p", "earlier", flat[0].double().mul(0.5).float())
            sources = [StaticSource(flat[:1].to(dev) * 0.9, 1e6), BatchSource(1e6), history]
            shielded = ShieldedScheduler(copy.deepcopy(sched), sources, SpellConfig(overcompensation=1e-3, correction_iterations=2))
            shielded.bind_batch([SampleRow(f"s{i}", "p") for i in range(3)])
            out = shielded.correct(m.to(dev), t.to(dev) if torch.is_tensor(t) else t, x_t.to(dev), 0,
                                   {k: v for k, v in step_kwargs(sched, 1).items() if k != "generator"})
            hits = sorted((h.row, h.source, h.neighbour_id, h.iteration) for h in shielded.log.hits)
            results[dev] = (out.cpu(), hits)
        close = torch.allclose(results["cpu"][0], results[device][0], atol=1e-4, rtol=1e-4)
        same = results["cpu"][1] == results[device][1]
        print(f"{case}: outputs agree {close}, same hits {same} ({len(results['cpu'][1])})", flush=True)
        assert close and same, case


def pipeline_checks(device: str) -> None:
    from spellshield.pipeline.invoke import sample_images
    from spellshield.pipeline.loading import load_pipeline
    from spellshield.toys import pipelines as tiny_pipelines
    from spellshield.toys.schedulers import Recorder

    with tempfile.TemporaryDirectory() as tmp:
        for name, save in (("sd", tiny_pipelines.save_stable_diffusion), ("sd3", tiny_pipelines.save_sd3)):
            pipe = load_pipeline(save(f"{tmp}/{name}"), device=device)
            inner = pipe.scheduler
            started = time.time()
            plain = sample_images(pipe, ["a red cat", "a dog"], [3, 4], 8)
            recorder = Recorder()
            pipe.scheduler = ShieldedScheduler(inner, [recorder])
            recorded = sample_images(pipe, ["a red cat", "a dog"], [3, 4], 8)
            first = recorder.queries[0]
            gap = float((first[0] - first[1]).norm())
            offset = torch.full_like(first[:1], 0.05 * gap / first.shape[1] ** 0.5)  # length 0.05 gap
            pipe.scheduler = ShieldedScheduler(inner, [StaticSource(first[:1] + offset, 0.1 * gap)])
            shielded = sample_images(pipe, ["a red cat", "a dog"], [3, 4], 8)
            hits = pipe.scheduler.reset_log().hits
            print(f"{name} on {device}: no-hit bit-for-bit {np.array_equal(plain, recorded)}, step-0 hit "
                  f"{any(h.step == 0 and h.row == 0 for h in hits)}, changed {not np.array_equal(plain[0], shielded[0])} "
                  f"({time.time() - started:.1f} s)", flush=True)
            assert np.array_equal(plain, recorded) and any(h.step == 0 and h.row == 0 for h in hits)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    device = parser.parse_args(argv).device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("no CUDA device", file=sys.stderr)
            return 2
        print(torch.cuda.get_device_name(0), torch.__version__, flush=True)
    scheduler_checks(device)
    pipeline_checks(device)
    print("device check passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
