"""What a run shows: its pictures as PNG files, and report.html, the run on one page.

PNGs are written with the standard library's zlib (write_png). report.html is rewritten at each
held-out evaluation and at the end: curves of every stage as inline SVG (training values as lines,
held-out evaluations as dots, quantities that span decades on a log scale), the run's pictures by
relative path, the evaluation, the summary and the configuration; no script, and it prints.
`python train.py report --run RUN` rebuilds it for any run folder.
"""
import html
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from codes import encode_all, sample_images
from datasets import to_uint8
from evaluation import evaluation_table
from runs import atomic_write, read_metrics


# -----------------------------------------------------------------------------
# pictures


def write_png(path, img):
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> a PNG file (8-bit grey or RGB, no filtering)."""
    img = np.ascontiguousarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    H, W = img.shape[:2]
    colour_type = 0 if img.ndim == 2 else 2
    rows = np.concatenate([np.zeros((H, 1), np.uint8), img.reshape(H, -1)], 1)  # filter byte 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, colour_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
           + chunk(b"IEND", b""))
    atomic_write(path, png)


def image_grid(rows, scale=2, gap=2):
    """A list of uint8 batches (n, H, W, C), one per grid row -> one image with gaps between."""
    n, H, W, C = rows[0].shape
    grid = np.full((len(rows) * (H + gap) + gap, n * (W + gap) + gap, C), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid[gap + r * (H + gap):gap + r * (H + gap) + H, gap + c * (W + gap):gap + c * (W + gap) + W] = img
    return grid.repeat(scale, 0).repeat(scale, 1)


def recon_grid(model, images, real_hw, n=8, top_only=False):
    """Up to two groups of rows of n images: originals over their reconstructions (and, with
    top_only, over the reconstructions from the top codes alone)."""
    h, w = real_hw
    x = images[:2 * n]
    codes = encode_all(model, x)
    shown = [x[:, :h, :w], to_uint8(model.decode(*codes))[:, :h, :w]]
    if top_only:
        shown.insert(1, to_uint8(model.decode(codes[0]))[:, :h, :w])
    rows = [s[:n] for s in shown]
    if len(x) == 2 * n:
        rows += [s[n:] for s in shown]
    return image_grid(rows)


def write_recon_pictures(run, model, data):
    """recon.png (held-out images over their reconstructions); two levels: recon_top.png as well."""
    real_hw = data["train"].shape[1:3]
    write_png(run / "recon.png", recon_grid(model, data["test_padded"], real_hw))
    if model.cfg.levels == 2:                                          # what the top level carries by itself
        write_png(run / "recon_top.png", recon_grid(model, data["test_padded"], real_hw, top_only=True))


def draw_samples(model, priors, rows, per_row, seed, rule, real_hw):
    """A grid of new images, one row per class when the priors are class-conditional
    -> (grid, codes per level, seconds spent sampling the codes)."""
    labels = np.repeat(np.arange(rows), per_row) if priors[0].cfg.num_classes else None
    images, codes, seconds = sample_images(model, priors, rows * per_row, seed, rule, real_hw, labels)
    return image_grid([images[r * per_row:(r + 1) * per_row] for r in range(rows)]), codes, seconds


# -----------------------------------------------------------------------------
# report.html: curves as inline SVG, written with the standard library


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def nice_ticks(lo, hi, n=4):
    """About n round numbers (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def svg_chart(title, series, log_y=False, width=460, height=230):
    """A line chart: series = [(name, [(step, value), ...], held_out)], training series as lines,
    held-out ones as dots. Non-finite values (and, on a log scale, values <= 0) are left out."""
    per_row = 4                                                        # legend entries per row, above the plot
    L, R, B = 58, 24, 34                                               # margins; the top one holds the legend
    T_ = 26 + 14 * math.ceil(len(series) / per_row)
    keep = lambda v: isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not log_y)
    series = [(name, [(x, math.log10(y) if log_y else y) for x, y in pts if keep(y)], held) for name, pts, held in series]
    xs = [x for _, pts, _ in series for x, _ in pts]
    ys = [y for _, pts, _ in series for _, y in pts]
    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">',
           f'<text x="{L}" y="15" class="title">{html.escape(title)}{" (log scale)" if log_y else ""}</text>']
    if not ys:
        return "".join(out) + f'<text x="{L}" y="{height // 2}">no finite values</text></svg>'
    x0 = min(0, min(xs))
    x1 = max(max(xs), x0 + 1)                                          # a single step still spans the axis
    y0, y1 = min(ys), max(ys)
    if not y1 - y0 > 1e-9 * max(1.0, abs(y0)):                        # one value (or one in float64's
        half = 0.5 * max(1.0, abs(y0))                                 # rounding at 4e15): a band around it
        y0, y1 = y0 - half, y1 + half
    y0, y1 = y0 - 0.04 * (y1 - y0), y1 + 0.04 * (y1 - y0)              # no dot on the frame
    px = lambda x: L + (x - x0) / (x1 - x0) * (width - L - R)
    py = lambda y: height - B - (y - y0) / (y1 - y0) * (height - T_ - B)
    if log_y and y1 - y0 >= 2:                                         # whole decades
        ticks = range(math.ceil(y0), math.floor(y1) + 1)
    elif log_y:                                                        # under two decades: round values
        ticks = [math.log10(t) for t in nice_ticks(10 ** y0, 10 ** y1, 5) if t > 0]
    else:
        ticks = nice_ticks(y0, y1)
    drawn = []
    for t in ticks:                                                    # grid and y labels, 14 px apart at least
        if any(abs(py(t) - d) < 14 for d in drawn):
            continue
        drawn.append(py(t))
        label = f"{10 ** t:.3g}" if log_y else f"{t:.4g}"
        out.append(f'<line x1="{L}" x2="{width - R}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>'
                   f'<text x="{L - 4}" y="{py(t) + 4:.1f}" class="ylabel">{label}</text>')
    for t in nice_ticks(x0, x1):
        out.append(f'<text x="{px(t):.1f}" y="{height - B + 14}" class="xlabel">{t:g}</text>')
    out.append(f'<text x="{width - R}" y="{height - 4}" class="xlabel end">step</text>')
    for i, (name, pts, held) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        if held:
            dots = "".join(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3"/>' for x, y in pts)
            out.append(f'<g fill="{colour}" data-series="{html.escape(name)}" data-points="{len(pts)}">{dots}</g>')
        else:
            line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{line}" stroke="{colour}" data-series="{html.escape(name)}" '
                       f'data-points="{len(pts)}"/>')
        out.append(f'<text x="{L + (width - L - R) // per_row * (i % per_row)}" y="{30 + 14 * (i // per_row)}" '
                   f'fill="{colour}" class="legend">'
                   f'{"&#9679; " if held else "&#8212; "}{html.escape(name)}</text>')
    return "".join(out) + "</svg>"


def standing(records):
    """A stage's records less those a later training superseded: where the steps go back (a prior
    trained anew after its VQ-VAE trained on, a run resumed from an earlier checkpoint than its
    last line), the rows from that step on are dropped, so that a chart shows the stage as it stands."""
    kept = []
    for r in records:
        if kept and r["step"] < kept[-1]["step"]:
            kept = [k for k in kept if k["step"] < r["step"]]
        kept.append(r)
    return kept


def stage_charts(stage, records):
    """The charts of one stage from its metrics: training values as lines, held-out as dots."""
    records = standing(records)
    train = [r for r in records if "loss" in r]
    held = [r for r in records if "loss" not in r]

    def pts(rows, key):
        return [(r["step"], r[key]) for r in rows if key in r]

    if stage == "vqvae":
        parts = [k for k in ("loss", "recon", "vq", "codebook", "commitment") if any(k in r for r in train)]
        charts = [svg_chart("VQ-VAE loss and its parts", [(k, pts(train, k), False) for k in parts], log_y=True),
                  svg_chart("held-out MSE (two levels: also from the top code alone)", [
                      (k, pts(held, k), True) for k in ("val_mse", "top_only_mse")
                      if k == "val_mse" or any(k in r for r in held)], log_y=True),
                  svg_chart("held-out PSNR (dB)", [("val_psnr", pts(held, "val_psnr"), True)])]
        levels = ["top_", ""] if any("top_perplexity" in r for r in records) else [""]
        charts.append(svg_chart("perplexity of the codes", [
            (f"{p}{label}", pts(rows, f"{p}perplexity"), rows is held)
            for p in levels for label, rows in (("batch", train), ("held out", held))], log_y=True))
        charts.append(svg_chart("share of the codes used", [
            (f"{p}{label}", pts(rows, f"{p}{key}"), rows is held)
            for p in levels for label, rows, key in (("batch", train, "usage"), ("held out", held, "codes_used"))]))
        if any("disc_loss" in r for r in train):                       # VQGAN: from the discriminator's start
            charts.append(svg_chart("adversarial: D's hinge loss, L_GAN, lambda, mean logits", [
                (k, pts(train, k), False) for k in ("disc_loss", "gan", "gan_weight", "logits_real", "logits_fake")]))
        return charts
    if stage == "codec":                                               # speech: the audio codec
        return [svg_chart("codec loss and its parts", [(k, pts(train, k), False) for k in
                                                      ("loss", "wave", "spectral", "vq", "commitment")], log_y=True),
                svg_chart("held-out SI-SNR (dB), all stages", [("val_si_snr_db", pts(held, "val_si_snr_db"), True)]),
                svg_chart("held-out log-mel distance, all stages", [
                    ("val_log_mel_distance", pts(held, "val_log_mel_distance"), True)], log_y=True),
                svg_chart("codes: the stages' mean share used in a batch", [("usage", pts(train, "usage"), False)])]
    return [svg_chart(f"{stage}: bits per code", [("training", pts(train, "bits_per_code"), False),
                                                  ("held out", pts(held, f"{stage}_val_bits_per_code"), True)])]


def read_optional_json(path):
    try:
        value = json.loads(Path(path).read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def key_values(d):
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}</td></tr>"
                   for k, v in d.items() if not isinstance(v, (dict, list)) or k in ("image_hw", "codes_used_per_stage"))
    return f"<table>{rows}</table>"


REPORT_STYLE = """body{font:14px/1.4 system-ui,sans-serif;max-width:1000px;margin:1em auto;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.6em}
.charts{display:flex;flex-wrap:wrap;gap:8px}.chart{border:1px solid #ddd;background:#fff;max-width:100%;height:auto}
.chart polyline{fill:none;stroke-width:1.5}.chart .grid{stroke:#eee}.chart text{font-size:11px;fill:#444}
.chart .title{font-weight:600;fill:#222}.chart .ylabel{text-anchor:end}.chart .xlabel{text-anchor:middle}
.chart .end{text-anchor:end}table{border-collapse:collapse;margin:.5em 0}th,td{padding:2px 10px;text-align:left;
border-bottom:1px solid #eee;font-variant-numeric:tabular-nums}th{font-weight:500;color:#555}
img{image-rendering:pixelated;max-width:100%;border:1px solid #ddd}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}
.cols{display:flex;flex-wrap:wrap;gap:2em}@media print{body{max-width:none}.chart,img{break-inside:avoid}}"""


def report_html(run):
    """The page for a run folder, from whatever of its files are there and readable."""
    run = Path(run)
    records = read_metrics(run / "metrics.jsonl")
    config, summary = read_optional_json(run / "config.json"), read_optional_json(run / "summary.json")
    evaluation = read_optional_json(run / "evaluation.json")
    stages = list(dict.fromkeys(r["stage"] for r in records))
    body = [f"<h1>VQ-VAE run {html.escape(run.name)}</h1>",
            f"<p>{html.escape(str(summary.get('data', config.get('train', {}).get('data', '?'))))}, "
            f"{len(records)} metric records, stages: {html.escape(', '.join(stages) or 'none yet')}. "
            f"Lines: training (every --log-every steps); dots: held out.</p>"]
    for stage in stages:
        body.append(f"<h2>{html.escape(stage)}</h2><div class='charts'>"
                    + "".join(stage_charts(stage, [r for r in records if r["stage"] == stage])) + "</div>")
    pictures = [(name, title) for name, title in (("recon.png", "held-out images over their reconstructions"),
                                                  ("recon_top.png", "originals, top code only, both levels"),
                                                  ("samples.png", "samples (a row per class; speech: "
                                                                  "spectrograms, a row per digit)"),
                                                  ("spectrograms.png", "held-out clips over their reconstructions from "
                                                                       "all stages, then a quarter of them"))
                if (run / name).is_file()]
    if pictures:
        body.append("<h2>pictures</h2><div class='cols'>" + "".join(
            f"<figure><img src='{name}' alt='{title}'><figcaption>{name}: {title}</figcaption></figure>"
            for name, title in pictures) + "</div>")
    clips = sorted((run / "audio").glob("*_original.wav")) if (run / "audio").is_dir() else []
    if clips:                                                          # speech: each clip, then its reconstructions
        body.append("<h2>listen</h2><table>" + "".join(
            f"<tr><th>{html.escape(c.name.removesuffix('_original.wav'))}</th>" + "".join(
                f"<td>{html.escape(w.stem.rsplit('_', 1)[1])}<br><audio controls preload='none' "
                f"src='audio/{html.escape(w.name)}'></audio></td>"
                for w in [c] + sorted(run.glob(f"audio/{c.name.removesuffix('original.wav')}stages*.wav"),
                                      key=lambda p: int(p.stem.rsplit("stages", 1)[1])))
            + "</tr>" for c in clips) + "</table>")
    for folder, title in (("samples", "digits spoken from the prior"), ("converted", "held-out clips in another voice")):
        wavs = sorted((run / folder).glob("*.wav")) if (run / folder).is_dir() else []
        if wavs:                                                       # speech: the prior's stage
            body.append(f"<h2>{title}</h2><div class='cols'>" + "".join(
                f"<figure>{html.escape(w.stem)}<br><audio controls preload='none' src='{folder}/{html.escape(w.name)}'>"
                f"</audio></figure>" for w in wavs) + "</div>")
    if isinstance(summary.get("per_stages"), list) and summary["per_stages"]:
        rows = [r for r in summary["per_stages"] if isinstance(r, dict)]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        body.append("<h2>per number of stages</h2><table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys)
                    + "</tr>" + "".join("<tr>" + "".join(
                        f"<td>{html.escape(f'{r.get(k):.4g}' if isinstance(r.get(k), float) else str(r.get(k, '')))}</td>"
                        for k in keys) + "</tr>" for r in rows) + "</table>")
    if evaluation:
        try:
            table = evaluation_table(evaluation)
        except (KeyError, TypeError, ValueError):
            table = json.dumps(evaluation, indent=2)
        body.append(f"<h2>evaluation (train.py evaluate)</h2><pre>{html.escape(table)}</pre>")
    if summary:
        body.append("<h2>summary</h2>" + key_values(summary))
    if config:
        priors = config["priors"] if isinstance(config.get("priors"), list) else []  # a hand-made file may be anything
        body.append("<h2>configuration</h2><div class='cols'>" + "".join(
            f"<div><h3>{html.escape(str(part))}</h3>{key_values(v if isinstance(v, dict) else {})}</div>"
            for part, v in [*((k, config[k]) for k in ("train", "model", "codec") if k in config),
                            *((f"prior {i}", p) for i, p in enumerate(priors))]) + "</div>")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(run.name)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{REPORT_STYLE}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


def write_report(run):
    """RUN/report.html; a path that is not UTF-8 (bytes the file system allows) shows as '?' there."""
    atomic_write(Path(run) / "report.html", report_html(run).encode("utf-8", "replace"))
