"""The audit's report (audit/report.html) and its plots, and the side-by-side comparison of two
runs: what a trust-and-safety reviewer reads and signs.

First screen: the verdict and every warning in words (collapse, incompleteness), the headline
rate as a percentage with its 95% interval, the run's settings and the index's fingerprint.
Then the distance histogram (every audited image's nearest protected distance against the
radius), the per-step corrections, the per-prompt rates, the offenders (only when there are
any), and the three judges side by side (L2, perceptual copy, off-manifold) with a grid of the
images the second judges flag. A plot with nothing to show is replaced by a sentence saying so.

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


def plot_corrected_share(series: dict[str, list[float]], path: str, title: str) -> bool:
    """Share of trajectories corrected at each step, one bar series per run; False (and no file)
    when no run has a corrected step."""
    if not any(any(v > 0 for v in share) for share in series.values()):
        return False
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
    return True


def plot_correction_ratios(ratios: np.ndarray, path: str) -> bool:
    """Distribution of correction norm / model-output norm over corrected steps; False when none."""
    if not len(ratios):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.0), dpi=110)
    ax.hist(ratios, bins=40, color="#a5533a")
    ax.set_yscale("log")
    ax.set_xlabel("correction norm / model-output norm (per corrected step)")
    ax.set_ylabel("steps")
    _save(fig, path)
    return True


def plot_nearest_distances(distances, radius: float | None, path: str, corpus_median: float | None = None,
                           far_threshold: float | None = None) -> bool:
    """Histogram of every audited image's distance to its nearest protected image, with the
    radius (inside it: a near-duplicate) and the corpus's own median 1-NN distance marked."""
    distances = np.asarray([d for d in distances if d is not None and np.isfinite(d)], dtype=np.float64)
    if not len(distances):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=110)
    ax.hist(distances, bins=min(40, max(10, len(distances) // 4)), color="#4a6fa5")
    if radius is not None:
        ax.axvline(radius, color="#c0392b", linestyle="-", label=f"radius {radius:.4g}")
    if corpus_median is not None:
        ax.axvline(corpus_median, color="#555", linestyle="--", label=f"corpus median 1-NN {corpus_median:.4g}")
    if far_threshold is not None:
        ax.axvline(far_threshold, color="#999", linestyle=":", label=f"far from corpus {far_threshold:.4g}")
    ax.set_xlabel("distance to the nearest protected image (index latent space)")
    ax.set_ylabel("images")
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


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


def save_pair_grid(outputs: np.ndarray, nearest: np.ndarray, path: str, per_row: int = 8, scale: int = 2,
                   pad: int = 2) -> None:
    """Each output (N, H, W, 3) uint8 beside its protected image (N, H, W, 3), ``per_row`` pairs
    a row in reading order, white gaps, upscaled ``scale`` times (nearest neighbour), one PNG."""
    from PIL import Image

    count, size = len(outputs), outputs.shape[1]
    rows = (count + per_row - 1) // per_row
    canvas = np.full((rows * (size + pad), min(per_row, count) * (2 * size + 3 * pad), 3), 255, np.uint8)
    for i, (out_img, near) in enumerate(zip(outputs, nearest)):
        y, x = (i // per_row) * (size + pad), (i % per_row) * (2 * size + 3 * pad)
        canvas[y : y + size, x : x + size] = out_img
        canvas[y : y + size, x + size + pad : x + 2 * size + pad] = near
    tmp = path + ".tmp.png"
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(tmp)
    os.replace(tmp, path)


# -- words -------------------------------------------------------------------------------------

LABELS = {
    "model": "Model", "shielded": "Shielded", "shield_index": "Shield index", "shield_index_manifest_sha256":
    "Shield index fingerprint (manifest sha256)", "shield_radius": "Shield radius", "overcompensation":
    "Overcompensation (lam)", "correction_iterations": "Correction iterations", "max_neighbours": "Max neighbours (SPELL-K)",
    "on_breach": "Breach policy", "max_attempts": "Max attempts per sample", "steps": "Denoising steps", "seed": "Base seed",
    "search_backend": "Search backend", "batch_radius": "Batch radius", "history_radius": "History radius",
    "guidance_scale": "Guidance scale", "status": "Run status",
}


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def rate_text(summary: dict) -> str:
    """'18.8% (95% CI 6.6% to 43.0%): 3 of 16 images', or why there is no rate."""
    if summary.get("near_duplicate_rate") is None:
        return "not measured (no index to search: audit with --index)"
    low, high = summary["near_duplicate_rate_ci95"]
    return (f"{pct(summary['near_duplicate_rate'])} (95% CI {pct(low)} to {pct(high)}): "
            f"{summary['near_duplicates']} of {summary['num_images']} images")


def judge_rate_text(rate: dict | None) -> str:
    """'6.3% (95% CI 1.1% to 28.3%): 1 of 16 images' of a second judge's rate (auditing.stats.rate)."""
    if not rate:
        return "not measured"  # (a descriptor judge: only where the index has one)
    low, high = rate["near_duplicate_rate_ci95"]
    return (f"{pct(rate['near_duplicate_rate'])} (95% CI {pct(low)} to {pct(high)}): "
            f"{rate['near_duplicates']} of {rate['num_samples']} images")


JUDGES = (  # (summary key, name, what it catches, what it misses): README "Judges"
    (None, "L2 (the shield's)", "inside the radius of a protected image in the index's latent space",
     "a protected image under noise (1.4-1.6 r away), anything altered"),
    ("perceptual_copy", "Perceptual copy", "low-pass L2 or SSIM against the nearest protected images: a copy under noise",
     "copies altered at low frequencies (recoloured, shifted, cropped, mirrored)"),
    ("off_manifold", "Off-manifold", "far beyond the corpus's own 1-NN distances, or rough as noise",
     "a smooth image that is simply new (as it should)"),
    ("descriptor_copy", "Descriptor copy (optional)", "cosine similarity of a copy-detection model's descriptors with every "
     "protected image's: the alterations it was trained on", "what its training did not cover; not measured unless "
     "`index calibrate --descriptor` gave the index one"),
)


def judges_html(summary: dict) -> str:
    """The three judges side by side (rates with 95% Wilson intervals) and the grid of the images
    the second judges flag, each beside the protected image it was compared with."""
    second = summary.get("second_judges") or {}
    if not second:
        return '<p class="note">Not measured: the second judges run when the audit searches an index (--index).</p>'
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(rate_text(summary) if key is None else judge_rate_text(second.get(key)))}</td>"
        f"<td>{html.escape(catches)}</td><td>{html.escape(misses)}</td></tr>" for key, name, catches, misses in JUDGES)
    table = f"<table><tr><th>Judge</th><th>Flagged (95% CI)</th><th>Catches</th><th>Misses</th></tr>{rows}</table>"
    flagged = second.get("flagged") or {}
    if not flagged.get("grid"):
        return table + "<p>No image is flagged by the perceptual or the off-manifold judge.</p>"
    shown = flagged["images"]
    listing = "".join(
        f"<tr><td>{i + 1}</td><td>{html.escape(f['image'])}</td><td>{html.escape(f['judge'])}</td>"
        f"<td>{html.escape(f['protected_key'])}</td><td>{f['perceptual_distance']:.4g}</td><td>{f['perceptual_ssim']:.3f}</td></tr>"
        for i, f in enumerate(shown))
    first = f"; the first {len(shown)} of {flagged['total']}" if flagged["total"] > len(shown) else ""
    return (table + f"<p>Flagged images (generated | the protected image the judge compared it with), in reading order{first}:</p>"
            f'<img src="{html.escape(flagged["grid"])}" alt="flagged images beside their protected images">'
            f"<table><tr><th>#</th><th>Image</th><th>Judge</th><th>Protected image</th><th>Low-pass distance</th>"
            f"<th>SSIM</th></tr>{listing}</table>")


def _value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"


def _list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def _figure(name: str | None, alt: str, note: str) -> str:
    return f'<img src="{html.escape(name)}" alt="{html.escape(alt)}">' if name else f'<p class="note">{html.escape(note)}</p>'


STYLE = """body{font-family:sans-serif;max-width:64em;margin:2em auto;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left;vertical-align:middle}img{image-rendering:pixelated}
.fail{background:#fdecea;border:2px solid #c0392b;padding:.5em 1em}.warn{background:#fff4e0;border:2px solid #e67e22;padding:.5em 1em}
.pass{background:#eaf7ea;border:2px solid #27ae60;padding:.5em 1em}.note{color:#555;font-style:italic}"""


def _write_html(path: str, body: str, title: str) -> str:
    page = f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


def verdict_html(summary: dict) -> str:
    verdict = summary.get("verdict") or {}
    status = verdict.get("status", "not gated")
    parts = []
    gate = verdict.get("gate")
    if status == "fail":
        parts.append(f'<div class="fail"><strong>FAIL</strong>{_list(verdict.get("reasons", []))}</div>')
    elif status == "pass":
        parts.append(f'<div class="pass"><strong>PASS</strong>: {html.escape(_gate_text(gate))}</div>')
    if verdict.get("warnings"):
        parts.append(f'<div class="warn"><strong>Warnings</strong>{_list(verdict["warnings"])}</div>')
    elif status != "fail":
        parts.append('<p>No warnings: the run is complete and the collapse criteria are not met'
                     f'{" (not gated: no --fail-above)" if status == "not gated" else ""}.</p>')
    return "".join(parts)


def _gate_text(gate: dict | None) -> str:
    if not gate:
        return "no gate"
    what = "upper bound of the 95% interval" if gate["on"] == "upper" else "near-duplicate rate"
    return f"{what} {pct(gate['value'])} is at most {pct(gate['fail_above'])}"


def audit_rows(summary: dict) -> list[tuple[str, str]]:
    audit = summary.get("audit") or {}
    completeness = summary.get("completeness") or {}
    rows = [("Near-duplicate rate", rate_text(summary)),
            ("Images audited", f"{summary['num_images']} ({summary['num_samples']} written samples"
                               f"{', ' + str(completeness.get('unlisted_images')) + ' image files no sample row names' if completeness.get('unlisted_images') else ''})"),
            ("Complete", "yes" if completeness.get("complete") else "NO: " + "; ".join(completeness.get("problems", []))),
            ("Radius", f"{_value(summary.get('radius'))} ({audit.get('radius_source', '-')})"),
            ("Recomputed from the images", _value(summary.get("recomputed_from_images"))),
            ("Audit index", _value(audit.get("index"))),
            ("Audit index fingerprint (manifest sha256)", _value(audit.get("index_manifest_sha256"))),
            ("Steps corrected by the shield", pct(summary.get("active_step_fraction"))),
            ("Shield hits", _value(summary.get("hits")))]
    search = summary.get("index_search") or {}
    if search:  # the shield's per-step cost (auditing.stats.search_cost)
        rows.append(("Index search per query: candidates re-checked, lists probed",
                     f"{search['candidates_per_query']:.2f}, {search['lists_probed_per_query']:.1f} "
                     f"(over {search['index_queries']:.0f} queries)"))
    if completeness.get("units_planned") is not None:
        rows.insert(3, ("Units whole / planned", f"{completeness['units_whole']} / {completeness['units_planned']}"))
        rows.insert(4, ("Samples with rows / planned", f"{completeness['samples_with_rows']} / {completeness['samples_planned']}"
                                                       f" ({completeness['samples_dropped']} not written by the breach policy)"))
    return rows


def write_report(audit_dir: str, summary: dict, offenders: list[dict], plots: dict[str, str | None]) -> str:
    """audit/report.html. ``plots``: {"distances", "per_step", "ratios"} -> file name or None."""
    settings = summary.get("settings") or {}
    settings_rows = [(LABELS.get(k, k), _value(v)) for k, v in settings.items()]
    prompts = "".join(
        f"<tr><td>{p['prompt_index']}</td><td>{html.escape(str(p['prompt'] or '-'))}</td><td>{p['num_samples']}</td>"
        f"<td>{p['near_duplicates']}</td><td>{pct(p['near_duplicate_rate'])}</td>"
        f"<td>{pct(p['near_duplicate_rate_ci95'][0])} to {pct(p['near_duplicate_rate_ci95'][1])}</td></tr>"
        for p in summary.get("per_prompt", [])
    )
    prompt_table = (f"<table><tr><th>#</th><th>Prompt</th><th>Samples</th><th>Near-duplicates</th><th>Rate</th><th>95% CI</th></tr>"
                    f"{prompts}</table>" if prompts else '<p class="note">No rates: the audit had no index to search.</p>')
    if offenders:
        worst = "".join(
            f"<tr><td><img src=\"{html.escape(o['thumbnail'])}\" alt=\"generated | corpus\"></td><td>{html.escape(o['corpus_key'])}</td>"
            f"<td>{o['samples_inside']}</td><td>{o['min_distance']:.4g}</td><td>{html.escape(o['closest_sample'])}</td></tr>"
            for o in offenders)
        offender_html = (f"<table><tr><th>Generated | nearest protected image</th><th>Corpus key</th><th>Images inside the radius</th>"
                         f"<th>Closest distance</th><th>Closest image</th></tr>{worst}</table>")
    else:
        offender_html = "<p>No offenders: no audited image is within the radius of a protected image.</p>"
    completeness = summary.get("completeness") or {}
    missing = completeness.get("missing_units") or []
    missing_html = (_list([f"{m['unit']} ({m['samples']} samples): {'; '.join(m['problems'])}" for m in missing]) if missing else "")
    unlisted = completeness.get("unlisted_image_examples") or []
    unlisted_html = (f"<p>Image files no sample row names (audited anyway):</p>{_list(unlisted)}" if unlisted else "")
    collapse = summary.get("collapse") or {}
    body = f"""<h1>spellshield audit: {html.escape(str(summary.get('run')))}</h1>
{verdict_html(summary)}
<h2>Result</h2>{_table(audit_rows(summary))}
<h2>Run settings</h2>{_table(settings_rows)}
<h2>Distance of every image to its nearest protected image</h2>
{_figure(plots.get('distances'), 'nearest protected distance histogram', 'No distances: the audit had no index and the run recorded none.')}
{'<p class="note">' + html.escape(collapse['note']) + '</p>' if collapse.get('note') else ''}
<h2>Completeness</h2>{'<p>Every planned unit is whole on disk and every image file is named by a sample row.</p>' if completeness.get('complete') else _list(completeness.get('problems', []))}{missing_html}{unlisted_html}
<h2>Share of trajectories corrected at each step</h2>
{_figure(plots.get('per_step'), 'per-step corrected share', 'The shield corrected no step of any written image (unshielded run, or no image came near a protected one): nothing to plot.')}
<h2>Size of the corrections</h2>
{_figure(plots.get('ratios'), 'correction ratio histogram', 'No corrections: nothing to plot.')}
<h2>Near-duplicate rate per prompt</h2>{prompt_table}
<h2>Offenders: protected images with generated images inside their radius</h2>{offender_html}
<h2>The three judges</h2>{judges_html(summary)}"""
    return _write_html(os.path.join(audit_dir, "report.html"), body, "spellshield audit")


def comparison_warnings(a: dict, b: dict) -> list[str]:
    """Why two audits may not be comparable: another audit index or radius, another model, or two
    shielded runs with different shields."""
    warnings = []
    fa, fb = (a.get("audit") or {}).get("index_manifest_sha256"), (b.get("audit") or {}).get("index_manifest_sha256")
    if fa != fb:
        warnings.append(f"the two audits searched different indexes ({(fa or 'none')[:12]} vs {(fb or 'none')[:12]})")
    if a.get("radius") != b.get("radius"):
        warnings.append(f"the two audits used different radii ({_value(a.get('radius'))} vs {_value(b.get('radius'))})")
    sa, sb = a.get("settings") or {}, b.get("settings") or {}
    if sa.get("model") != sb.get("model"):
        warnings.append(f"the runs used different models ({sa.get('model')} vs {sb.get('model')})")
    if sa.get("shielded") and sb.get("shielded"):
        if sa.get("shield_index_manifest_sha256") != sb.get("shield_index_manifest_sha256"):
            warnings.append("the runs were shielded by different indexes")
        if sa.get("shield_radius") != sb.get("shield_radius"):
            warnings.append(f"the runs were shielded with different radii ({_value(sa.get('shield_radius'))} vs "
                            f"{_value(sb.get('shield_radius'))})")
    return warnings


def write_comparison(path: str, summaries: dict[str, dict], plot_name: str | None, warnings: list[str]) -> str:
    names = list(summaries)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = [("Near-duplicate rate", [rate_text(s) for s in summaries.values()]),
            ("Verdict", [(s.get("verdict") or {}).get("status", "-") for s in summaries.values()]),
            ("Complete", ["yes" if (s.get("completeness") or {}).get("complete") else "no" for s in summaries.values()]),
            ("Collapse warning", ["yes" if (s.get("collapse") or {}).get("warning") else "no" for s in summaries.values()]),
            *[(f"{name} rate", [judge_rate_text((s.get("second_judges") or {}).get(key)) for s in summaries.values()])
              for key, name, _, _ in JUDGES[1:]],
            ("Steps corrected by the shield", [pct(s.get("active_step_fraction")) for s in summaries.values()]),
            ("Audit radius", [_value(s.get("radius")) for s in summaries.values()]),
            ("Audit index", [_value((s.get("audit") or {}).get("index")) for s in summaries.values()])]
    rows += [(label, [_value((s.get("settings") or {}).get(key)) for s in summaries.values()]) for key, label in LABELS.items()]
    table = "".join(f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{html.escape(v)}</td>" for v in values) + "</tr>"
                    for k, values in rows)
    warn = f'<div class="warn"><strong>Not like for like</strong>{_list(warnings)}</div>' if warnings else ""
    body = f"""<h1>spellshield audit: {' vs '.join(html.escape(n) for n in names)}</h1>{warn}
<table><tr><th></th>{head}</tr>{table}</table>
<h2>Share of trajectories corrected at each step</h2>
{_figure(plot_name, 'per-step corrected share, both runs', 'Neither run has a corrected step: nothing to plot.')}"""
    return _write_html(path, body, "spellshield audit comparison")
