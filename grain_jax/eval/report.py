"""The HTML report of an evaluation run: OUT/index.html, and the thumbnails it shows.

`write_report` writes one self-contained page (inline CSS, JS and SVG; no external resource,
no fetch(), which file:// blocks) from metrics.json's content and the per-image rows: the
means, a per-image PSNR plot against bicubic, and a sortable, paginated table of every image
with its thumbnails (OUT/thumbs/<folder>/<stem>.jpg, written by `write_thumbnail`) linking to
the full-size PNGs. Every link is relative, so the folder can be moved or served as it is.
The rows travel as inline JSON and are rendered a page at a time, so a 5000-image report does
not build 30000 <img> elements at once. `comparison_grid` draws the labelled panels (in
COLUMNS' order) of every comparison picture the project writes.
"""
from __future__ import annotations

import html
import importlib.resources
import json
import math
import os
import posixpath
import string
import urllib.parse

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from grain_jax.eval.metrics import METRICS
from grain_jax.util import files

# The page (package data beside this module), with $header, $means, $plots, $head and $data
# to fill in (string.Template).
TEMPLATE = "report.html"

COLUMNS = (("lr", "lr", "LR (nearest)"), ("bicubic", "bicubic", "bicubic"),
           ("hr_inv", "invrrdb", "hr_inv (InvRRDB)"), ("hr_gan", "stylegan", "hr_gan (StyleGAN2)"),
           ("hr", "fusion", "hr (GRAIN)"), ("gt", "gt", "ground truth"))
# (image key, folder under OUT, column label), in panel order.

THUMB_SIZE = 128
KINDS = ("hr", "hr_inv", "hr_gan", "bicubic")  # the judged outputs, in the means table's order
PAGE_SIZE = 100


def thumbnail(u8: np.ndarray, size: int = THUMB_SIZE) -> np.ndarray:
  """HxWx3 uint8 -> size x size uint8 thumbnail: nearest neighbour when enlarging (an LR of
  16 px stays visibly pixelated, small 64-px outputs are not blurred), antialiased (PIL
  LANCZOS) when shrinking, unchanged when equal. Input images are square."""
  u8 = np.asarray(u8, np.uint8)
  if u8.shape[:2] == (size, size) and u8.ndim == 3 and u8.shape[2] == 3:
    return u8
  img = Image.fromarray(u8).convert("RGB")
  if img.width < size:
    img = img.resize((size, size), Image.NEAREST)
  else:  # reducing_gap: a box reduce first, then Lanczos (fast on 1024 px, same look)
    img = img.resize((size, size), Image.LANCZOS, reducing_gap=3.0)
  return np.asarray(img)


def thumbnail_path(column_folder: str, png_name: str) -> str:
  """Relative path (posix, relative to OUT) of a thumbnail: 'thumbs/<folder>/<stem>.jpg'."""
  stem = posixpath.splitext(png_name.replace(os.sep, "/"))[0]
  return posixpath.join("thumbs", column_folder, stem + ".jpg")


def write_thumbnail(out_dir: str, column_folder: str, png_name: str, u8: np.ndarray) -> None:
  """Writes thumbnail(u8) as JPEG quality 90 at out_dir/thumbnail_path(...), creating folders."""
  path = os.path.join(out_dir, *thumbnail_path(column_folder, png_name).split("/"))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(thumbnail(u8)).save(path, format="JPEG", quality=90)


def comparison_grid(rows: list[dict], scale: int = 1, psnrs: list[dict] | None = None,
                    notes: dict | None = None, columns=COLUMNS) -> np.ndarray:
  """The project's comparison picture: one row per image, the panels of `columns` in their
  order (LR enlarged to the HR size with nearest neighbour), each enlarged `scale` times
  (nearest, so pixels stay pixels), under a header of labelled columns.

  rows: {image key: HxWx3 uint8}; a key no row has is left out. psnrs: per row {key: dB},
  printed under the panel. notes: {key: text} appended to a label (e.g. 'untrained prior').
  """
  keys = [(k, label) for k, _, label in columns if any(k in r for r in rows)]
  hr = max(r[k].shape[0] for r in rows for k, _ in keys)
  side = hr * scale
  font_px = max(11, min(28, side // 14))
  try:
    font = ImageFont.load_default(size=font_px)
  except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
    font = ImageFont.load_default()
  line = font_px + 6
  head = 2 * line if notes else line
  foot = line if psnrs else 0
  canvas = Image.new("RGB", (side * len(keys), head + len(rows) * (side + foot)), "white")
  draw = ImageDraw.Draw(canvas)
  for j, (k, label) in enumerate(keys):
    draw.text((j * side + 4, 3), label, fill="black", font=font)
    if notes and notes.get(k):
      draw.text((j * side + 4, 3 + line), notes[k], fill=(170, 0, 0), font=font)
  for i, r in enumerate(rows):
    top = head + i * (side + foot)
    for j, (k, _) in enumerate(keys):
      if k not in r:
        continue
      img = Image.fromarray(np.asarray(r[k], np.uint8))
      canvas.paste(img.resize((side, side), Image.NEAREST), (j * side, top))
      if psnrs and psnrs[i].get(k) is not None:
        draw.text((j * side + 4, top + side + 2), f"PSNR {psnrs[i][k]:.2f} dB", fill="black",
                  font=font)
  return np.asarray(canvas)


def _num(v) -> float | None:
  """A finite float, or None (NaN, infinity, None, not a number)."""
  try:
    v = float(v)
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def _fmt(v, metric: str) -> str:
  """A summary value: None -> 'n/a' (no finite value), else fixed decimals for the metric."""
  return "n/a" if _num(v) is None else f"{float(v):.{_digits(metric)}f}"


def _metric_keys(rows: list[dict]) -> list[str]:
  """The per-image metric keys present in any row: outputs x metrics, LR, then the others."""
  present = {k for r in rows for k, v in r.items()
             if k != "file" and isinstance(v, (int, float, np.number))}
  known = [f"{k}_{m}" for k in KINDS for m in METRICS] + ["lr_psnr", "lr_ssim"]
  return [k for k in known if k in present] + sorted(present - set(known))


def _digits(metric: str) -> int:
  """Decimals of a metric (metrics.METRICS; the PSNR gain over bicubic as PSNR)."""
  return METRICS["psnr" if metric == "gain" else metric].digits if (
      metric in METRICS or metric == "gain") else 4


def _label(metric: str) -> str:
  return (METRICS[metric].label or metric.upper()) if metric in METRICS else metric


def _metric_label(key: str) -> str:
  kind, _, metric = key.rpartition("_")
  return f"{'LR' if kind == 'lr' else kind} {_label(metric)}" if metric in METRICS else key


def _url(*parts: str) -> str:
  """A relative URL (posix, percent-quoted so spaces, '#' and '%' in names work)."""
  return urllib.parse.quote(posixpath.join(*(p.replace(os.sep, "/") for p in parts)))


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
  """Round tick values inside [lo, hi], about n of them."""
  step = 10 ** math.floor(math.log10((hi - lo) / n))
  step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
  first = math.ceil(lo / step) * step
  return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _axes(w, h, m, xt, yt, sx, sy, xlabel, ylabel) -> list[str]:
  """SVG axes frame, tick marks with values and axis labels (m = left, top, right, bottom)."""
  out = [(f'<rect x="{m[0]}" y="{m[1]}" width="{w - m[0] - m[2]}" height="{h - m[1] - m[3]}" '
          'fill="none" stroke="#888"/>')]
  for t in xt:
    out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{h - m[3]}" y2="{h - m[3] + 4}" '
               f'stroke="#888"/><text x="{sx(t):.1f}" y="{h - m[3] + 15}" '
               f'text-anchor="middle">{t:g}</text>')
  for t in yt:
    out.append(f'<line x1="{m[0] - 4}" x2="{m[0]}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" '
               f'stroke="#888"/><text x="{m[0] - 6}" y="{sy(t) + 4:.1f}" '
               f'text-anchor="end">{t:g}</text>')
  out.append(f'<text x="{(m[0] + w - m[2]) / 2}" y="{h - 4}" text-anchor="middle">'
             f'{html.escape(xlabel)}</text><text transform="translate(12 {(m[1] + h - m[3]) / 2}) '
             f'rotate(-90)" text-anchor="middle">{html.escape(ylabel)}</text>')
  return out


def _plots(rows: list[dict], key: str, label: str) -> str:
  """Inline SVG: per-image `key` PSNR against bicubic PSNR (with y = x), and a histogram of
  the gain over bicubic. Images with a non-finite value are left out."""
  pts = [(x, y, r.get("file", "")) for r in rows
         if (x := _num(r.get("bicubic_psnr"))) is not None
         and (y := _num(r.get(f"{key}_psnr"))) is not None]
  if not pts:
    return "<p>No image has finite PSNRs for both outputs: no plot.</p>"
  w, h, m = 380, 380, (50, 10, 10, 40)
  lo, hi = min(min(p[:2]) for p in pts), max(max(p[:2]) for p in pts)
  pad = max(0.5, 0.05 * (hi - lo))
  lo, hi = lo - pad, hi + pad
  sx = lambda v: m[0] + (v - lo) / (hi - lo) * (w - m[0] - m[2])
  sy = lambda v: h - m[3] - (v - lo) / (hi - lo) * (h - m[1] - m[3])
  r = 3 if len(pts) <= 200 else 2
  svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">']
  svg += _axes(w, h, m, _ticks(lo, hi), _ticks(lo, hi), sx, sy, "bicubic PSNR (dB)",
               f"{label} PSNR (dB)")
  svg.append(f'<line x1="{sx(lo):.1f}" y1="{sy(lo):.1f}" x2="{sx(hi):.1f}" y2="{sy(hi):.1f}" '
             'stroke="#999" stroke-dasharray="4 3"/>')
  for x, y, name in pts:  # green above the diagonal (better than bicubic), red below
    svg.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r}" fill="'
               f'{"#1a7f37" if y > x else "#c62828"}" fill-opacity="0.6"><title>'
               f'{html.escape(str(name))}: bicubic {x:.2f}, {key} {y:.2f} dB</title></circle>')
  svg.append("</svg>")

  gain = np.array([y - x for x, y, _ in pts])
  glo, ghi = min(gain.min(), 0.0), max(gain.max(), 0.0)
  if ghi - glo < 1e-9:
    glo, ghi = glo - 0.5, ghi + 0.5
  counts, edges = np.histogram(gain, int(np.clip(np.sqrt(len(gain)), 5, 40)), (glo, ghi))
  hw, hh, hm = 380, 260, (50, 40, 10, 40)
  hx = lambda v: hm[0] + (v - glo) / (ghi - glo) * (hw - hm[0] - hm[2])
  hy = lambda c: hh - hm[3] - c / counts.max() * (hh - hm[1] - hm[3])
  yt = [t for t in _ticks(0, counts.max() + 1e-9) if t == int(t)] if counts.max() > 1 else [0, 1]
  hist = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{hw}" height="{hh}" role="img">']
  hist += _axes(hw, hh, hm, _ticks(glo, ghi), yt, hx, hy, f"{key} PSNR - bicubic PSNR (dB)",
                "images")
  for c, a, b in zip(counts, edges[:-1], edges[1:]):
    if c:
      hist.append(f'<rect x="{hx(a):.1f}" y="{hy(c):.1f}" width="{max(hx(b) - hx(a) - 1, 1):.1f}" '
                  f'height="{hy(0) - hy(c):.1f}" fill="#4a74b4"><title>{a:.2f} to {b:.2f} dB: '
                  f'{c}</title></rect>')
  above = float(np.mean(gain > 0))
  hist.append(f'<line x1="{hx(0):.1f}" x2="{hx(0):.1f}" y1="{hm[1]}" y2="{hh - hm[3]}" '
              f'stroke="#c62828" stroke-width="1.5"/><text x="{hm[0]}" y="16">mean gain '
              f'{gain.mean():+.2f} dB; {above:.1%} of {len(gain)} images above bicubic</text>'
              "</svg>")
  caption = (f"Per-image PSNR of {html.escape(label)} against bicubic ({len(pts)} images with "
             f"finite values; points above the dashed diagonal beat bicubic), and the histogram "
             f"of the gain (red line: no gain).")
  if key != "hr":
    caption += f" hr was not computed: {html.escape(label)} is shown instead."
  return (f'<figure>{"".join(svg)}</figure><figure>{"".join(hist)}</figure>'
          f"<p class=caption>{caption}</p>")


def _means(summary: dict, labels: dict) -> str:
  """The means table (outputs x metrics), the LR line and the skipped metrics."""
  metrics = [m for m in METRICS if any(f"{k}_{m}" in summary for k in KINDS)]
  kinds = [k for k in KINDS if any(f"{k}_{m}" in summary for m in METRICS)]
  out = []
  if kinds:
    out.append("<table class=means><tr><th>output</th>"
               + "".join(f"<th>{html.escape(_label(m))}</th>" for m in metrics) + "</tr>")
    for k in kinds:
      cells = []
      for m in metrics:
        absent = f"{k}_{m}" not in summary  # not computed, unlike None: no finite value
        text = "–" if absent else _fmt(summary[f"{k}_{m}"], m)
        if m == "kid" and not absent and _num(summary.get(f"{k}_kid_std")) is not None:
          text += f" ± {_fmt(summary[f'{k}_kid_std'], m)}"
        cells.append(f"<td class=num>{text}</td>")
      out.append(f"<tr><th>{html.escape(labels.get(k, k))}</th>{''.join(cells)}</tr>")
    out.append("</table>")
  else:
    out.append("<p>No mean metrics.</p>")
  lr = [f"{m.upper()} {_fmt(summary[f'lr_{m}'], m)}" for m in ("psnr", "ssim")
        if f"lr_{m}" in summary]
  if lr:
    out.append(f"<p>LR against a bicubic 8-bit downscale: {', '.join(lr)}.</p>")
  by_reason = {}  # one line per reason: a missing network skips a metric of every output
  for k, why in (summary.get("skipped_metrics") or {}).items():
    by_reason.setdefault(str(why), []).append(str(k))
  if by_reason:
    out.append("<p>Skipped metrics:</p><ul>" + "".join(
        f"<li><b>{html.escape(', '.join(keys))}</b>: {html.escape(why)}</li>"
        for why, keys in by_reason.items()) + "</ul>")
  return "".join(out)


def _header(out_dir: str, summary: dict) -> str:
  """The run's description: data, counts, sizes, failures, conventions, result files."""
  g, esc = summary.get, lambda v: html.escape(str(v))
  facts = [("data", g("data")), ("images", g("num_images")), ("failed", g("num_failed")),
           ("with a non-finite metric", g("num_nonfinite")),
           ("sizes", f"{g('hr_size')} px → {g('lr_size')} px" if g("hr_size") else None),
           ("seconds", g("seconds"))]
  out = ["<ul class=facts>"] + [f"<li>{k}: <b>{esc(v)}</b></li>" for k, v in facts
                                if v not in (None, "")] + ["</ul>"]
  if g("failed"):
    out.append(f"<details><summary>{len(g('failed'))} failed files</summary><ul>" + "".join(
        f"<li>{esc(f.get('file', '?'))}: {esc(f.get('error', ''))}</li>" for f in g("failed"))
        + "</ul></details>")
  if g("conventions"):
    out.append(f"<p class=conv>Conventions: {esc(g('conventions'))}</p>")
  links = [n for n in ("metrics.json", "per_image.csv") if os.path.isfile(os.path.join(out_dir, n))]
  if links:
    out.append("<p>Files: " + ", ".join(f'<a href="{_url(n)}">{n}</a>' for n in links) + "</p>")
  return "".join(out)


def _rows_json(out_dir: str, rows: list[dict], png_names: list[str], columns, keys, plot_key):
  """The per-image data the page's script renders; '<' escaped so no text ends the script."""
  data = []
  for i, (r, png) in enumerate(zip(rows, png_names)):
    images = {}
    for key, folder, _ in columns:
      full = posixpath.join(folder, png.replace(os.sep, "/"))
      if not os.path.isfile(os.path.join(out_dir, full)):
        continue  # this image was not written: an empty cell
      thumb = thumbnail_path(folder, png)
      thumb = thumb if os.path.isfile(os.path.join(out_dir, thumb)) else full
      images[key] = {"thumb": urllib.parse.quote(thumb), "full": urllib.parse.quote(full)}
    metrics = {k: (None if _num(r[k]) is None else round(float(r[k]), 5))
               for k in keys if k in r}
    if plot_key:  # the plot's gain over bicubic, to sort by
      x, y = _num(r.get("bicubic_psnr")), _num(r.get(f"{plot_key}_psnr"))
      metrics["gain"] = None if None in (x, y) else round(y - x, 5)
    data.append({"index": i + 1, "file": str(r.get("file", png)), "images": images,
                 "metrics": metrics})
  return data


def page_template() -> str:
  """The page's HTML, CSS and table script (TEMPLATE)."""
  return importlib.resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")


def write_report(out_dir: str, summary: dict, rows: list[dict], png_names: list[str],
                 columns=COLUMNS) -> str:
  """Writes out_dir/index.html (atomically, via files.atomic_open) and returns its path.

  `summary` is metrics.json's content, `rows` the per-image metrics ({"file": name, metric:
  value}), `png_names[i]` row i's PNG name in each column folder. Columns whose folder is not
  in out_dir are left out; so are metrics no row has.
  """
  if len(png_names) != len(rows):
    raise ValueError(f"{len(rows)} rows but {len(png_names)} PNG names")
  columns = [c for c in columns if os.path.isdir(os.path.join(out_dir, c[1]))]
  labels = {k: label for k, _, label in COLUMNS} | {k: label for k, _, label in columns}
  keys = _metric_keys(rows)
  plot_key = next((k for k in ("hr", "hr_inv") if f"{k}_psnr" in keys), None)
  if "bicubic_psnr" not in keys:
    plot_key = None
  metrics = ([{"key": "gain", "label": f"{plot_key} − bicubic PSNR", "digits": 2}]
             if plot_key else [])
  metrics += [{"key": k, "label": _metric_label(k),
               "digits": _digits(k.rpartition("_")[2])} for k in keys]
  data = {"thumb_size": THUMB_SIZE, "page_size": PAGE_SIZE,
          "columns": [{"key": k, "label": label} for k, _, label in columns],
          "metrics": metrics,
          "rows": _rows_json(out_dir, rows, png_names, columns, keys, plot_key)}
  head = ('<th class=sort data-key="index">#</th><th class=sort data-key="file">file</th>'
          + "".join(f"<th>{html.escape(label)}</th>" for _, _, label in columns)
          + "".join(f'<th class=sort data-key="{html.escape(m["key"])}">'
                    f'{html.escape(m["label"])}</th>' for m in metrics))
  page = string.Template(page_template()).substitute(
      header=_header(out_dir, summary), means=_means(summary, labels),
      plots=(_plots(rows, plot_key, labels.get(plot_key, plot_key)) if plot_key
             else "<p>No per-image PSNR of an output and of bicubic: no plot.</p>"),
      head=head, data=json.dumps(data, ensure_ascii=False, allow_nan=False,
                                 separators=(",", ":")).replace("<", "\\u003c"))
  path = os.path.join(out_dir, "index.html")
  with files.atomic_open(path, "w", encoding="utf-8") as f:
    f.write(page)
  return path
