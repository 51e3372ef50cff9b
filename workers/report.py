"""Plots and the HTML report of an audit, and the side-by-side comparison of two runs.

Everything is written to a temporary name and renamed; file names are made here (never from
corpus keys or prompts), so nothing a dataset or a user wrote can steer where a file goes.
"""

from __future__ import annotations

import html
import os

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    plt = _pyplot()
    tmp = path + ".tmp.png"
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_corrected_share(series: dict[str, list[float]], path: str, title: str) -> None:
    """Share of trajectories corrected at each step; one bar series per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=110)
    width = 0.85 / max(1, len(series))
    for i, (name, share) in enumerate(series.items()):
        steps = np.arange(len(share)) + i * width - 0.425 + width / 2
        ax.bar(steps, share, width=width, label=name)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("share of trajectories corrected")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    _save(fig, path)


def plot_correction_ratios(ratios: np.ndarray, path: str) -> None:
    """Distribution of correction norm / model-output norm over corrected steps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.0), dpi=110)
    if len(ratios):
        ax.hist(ratios, bins=40, color="#a5533a")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no correction", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("correction norm / model-output norm (per corrected step)")
    ax.set_ylabel("steps")
    _save(fig, path)


def save_pair(generated: np.ndarray, corpus: np.ndarray, path: str, size: int = 96) -> None:
    """Generated image beside its nearest corpus image, nearest-neighbour upscaled."""
    from PIL import Image

    left = Image.fromarray(generated).resize((size, size), Image.NEAREST)
    right = Image.fromarray(corpus).resize((size, size), Image.NEAREST)
    canvas = Image.new("RGB", (2 * size + 6, size), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (size + 6, 0))
    tmp = path + ".tmp.png"
    canvas.save(tmp)
    os.replace(tmp, path)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value) and len(value) == 2:
        return f"[{value[0]:.4g}, {value[1]:.4g}]"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)


STYLE = """body{font-family:sans-serif;max-width:64em;margin:2em auto;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left;vertical-align:middle}img{image-rendering:pixelated}"""

SUMMARY_KEYS = ("run", "num_samples", "radius", "near_duplicate_rate", "near_duplicate_rate_ci95", "near_duplicates",
                "active_step_fraction", "steps", "hits", "hits_by_source", "correction_ratio_quantiles",
                "recomputed_from_images", "index")


def _write_html(path: str, body: str, title: str) -> str:
    page = f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


def write_report(audit_dir: str, summary: dict, offenders: list[dict]) -> str:
    """audit/report.html: the numbers, the plots, rates per prompt and the worst offenders."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(summary.get(k)))}</td></tr>" for k in SUMMARY_KEYS)
    prompts = "".join(
        f"<tr><td>{p['prompt_index']}</td><td>{html.escape(str(p['prompt'] or '-'))}</td><td>{p['num_samples']}</td>"
        f"<td>{p['near_duplicates']}</td><td>{p['near_duplicate_rate']:.4f}</td><td>{html.escape(_fmt(p['near_duplicate_rate_ci95']))}</td></tr>"
        for p in summary.get("per_prompt", [])
    )
    prompt_table = (f"<table><tr><th>#</th><th>prompt</th><th>samples</th><th>near-dups</th><th>rate</th><th>95% CI</th></tr>{prompts}</table>"
                    if prompts else "<p>no rates (audit without an index)</p>")
    worst = "".join(
        f"<tr><td><img src=\"{html.escape(o['thumbnail'])}\" alt=\"generated | corpus\"></td><td>{html.escape(o['corpus_key'])}</td>"
        f"<td>{o['samples_inside']}</td><td>{o['min_distance']:.4f}</td><td>{html.escape(o['closest_sample'])}</td></tr>"
        for o in offenders
    )
    worst_table = (f"<table><tr><th>generated | nearest corpus image</th><th>corpus key</th><th>samples inside</th>"
                   f"<th>closest distance</th><th>closest sample</th></tr>{worst}</table>" if worst else "<p>none</p>")
    body = f"""<h1>spellshield audit: {html.escape(str(summary.get('run')))}</h1>
<table>{rows}</table>
<h2>Share of trajectories corrected at each step</h2><img src="corrected_per_step.png" alt="per-step corrected share">
<h2>Size of the corrections</h2><img src="correction_ratio.png" alt="correction ratio histogram">
<h2>Near-duplicate rate per prompt</h2>{prompt_table}
<h2>Top offending corpus images</h2>{worst_table}"""
    return _write_html(os.path.join(audit_dir, "report.html"), body, "spellshield audit")


def write_comparison(path: str, summaries: dict[str, dict], plot_name: str) -> str:
    names = list(summaries)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{html.escape(_fmt(summaries[n].get(k)))}</td>" for n in names) + "</tr>"
        for k in SUMMARY_KEYS
    )
    body = f"""<h1>spellshield audit: {' vs '.join(html.escape(n) for n in names)}</h1>
<table><tr><th></th>{head}</tr>{rows}</table>
<h2>Share of trajectories corrected at each step</h2><img src="{html.escape(plot_name)}" alt="per-step corrected share, both runs">"""
    return _write_html(path, body, "spellshield audit comparison")
