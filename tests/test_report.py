"""The evaluation report (eval/report.py): thumbnails, and index.html checked as a browser
would use it: every link resolves inside OUT, the data survive hostile file names, absent
columns are left out, the plot has a point per image, and the table script sorts and pages
(run by node if present)."""
import html.parser
import json
import math
import os
import time
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from grain_jax.eval import report

NAMES = ["a face #1 100%.jpg", "x/y.jpg", "q&a</script>.png"]


class Page(html.parser.HTMLParser):
  """The static links (href, src), sortable header keys and script texts of a page."""

  def __init__(self, text):
    super().__init__()
    self.links, self.sort_keys, self.scripts, self._script = [], [], {}, None
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self.links += [attrs[a] for a in ("href", "src") if a in attrs]
    if tag == "th" and "data-key" in attrs:
      self.sort_keys.append(attrs["data-key"])
    if tag == "script":
      self._script = attrs.get("id", "js")

  def handle_data(self, data):
    if self._script:
      self.scripts[self._script] = self.scripts.get(self._script, "") + data

  def handle_endtag(self, tag):
    if tag == "script":
      self._script = None


def make_out(out, names, folders, thumbs=True, outputs=("hr", "hr_inv", "bicubic")):
  """A fake evaluation folder: PNGs in `folders` (+ thumbnails), metrics.json, per_image.csv.
  Row 1 (if any) has a NaN hr_psnr. Returns (summary, rows, png_names)."""
  rng = np.random.default_rng(0)
  png_names = [os.path.splitext(n)[0] + ".png" for n in names]
  for png in png_names:
    for _, folder, _ in report.COLUMNS:
      if folder in folders:
        u8 = rng.integers(0, 256, (16 if folder == "lr" else 64,) * 2 + (3,), np.uint8)
        path = out / folder / png
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(u8).save(path)
        if thumbs:
          report.write_thumbnail(str(out), folder, png, u8)
  rows = []
  for i, name in enumerate(names):
    row = {"file": name}
    for k in outputs:
      row.update({f"{k}_psnr": 25.0 + i + (2.0 if k != "bicubic" else 0.0),
                  f"{k}_ssim": 0.8 + 0.01 * i, f"{k}_lpips": 0.2 - 0.01 * i})
    row.update(lr_psnr=40.0 + i, lr_ssim=0.99)
    rows.append(row)
  if len(rows) > 1 and "hr" in outputs:
    rows[1]["hr_psnr"] = float("nan")
  summary = fake_summary(len(names), outputs)
  (out / "metrics.json").write_text(json.dumps(summary))
  (out / "per_image.csv").write_text("file\n")
  return summary, rows, png_names


def fake_summary(n, outputs=("hr", "hr_inv", "bicubic")):
  """metrics.json's content, with None, absent, KID ± std and hostile text."""
  summary = {"num_images": n, "num_failed": 1,
             "failed": [{"file": "bad<1>.jpg", "error": "cannot identify image"}],
             "data": "folder faces/ & more", "hr_size": 64, "lr_size": 16, "seconds": 1.5,
             "conventions": "8-bit RGB, data range 255",
             "skipped_metrics": {"id": "no ArcFace weights <irse50>"},
             "lr_psnr": 41.234, "lr_ssim": 0.99}
  for k in outputs:
    summary.update({f"{k}_psnr": 27.3456 if k == "hr" else 26.0, f"{k}_ssim": 0.81234,
                    f"{k}_lpips": None})
  if "hr" in outputs:
    summary.update(hr_kid=0.01234, hr_kid_std=0.00056, hr_fid=12.345)
  return summary


def read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def check_links(out, page):
  """Every static and JSON link is relative and names a file inside `out`; returns the JSON."""
  parsed = Page(page)
  data = json.loads(parsed.scripts["rows-data"])
  links = parsed.links + [p for r in data["rows"] for im in r["images"].values()
                          for p in (im["thumb"], im["full"])]
  assert parsed.links, "the page links metrics.json and per_image.csv"
  for link in links:
    path = urllib.parse.unquote(link)
    assert not os.path.isabs(path) and ":" not in link and ".." not in path.split("/"), link
    assert (out / path).is_file(), link
  return parsed, data


def test_report_links_names_and_columns(tmp_path):
  folders = ["lr", "bicubic", "invrrdb", "fusion", "gt"]  # no "stylegan": no generator
  summary, rows, pngs = make_out(tmp_path, NAMES, folders)
  path = report.write_report(str(tmp_path), summary, rows, pngs)
  assert path == os.path.join(str(tmp_path), "index.html")
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
  page = read(path)
  parsed, data = check_links(tmp_path, page)

  present = ["lr", "bicubic", "hr_inv", "hr", "gt"]
  assert [c["key"] for c in data["columns"]] == present
  assert "stylegan" not in page and "StyleGAN2" not in page
  assert [r["file"] for r in data["rows"]] == NAMES  # '</script>' did not end the JSON
  assert "q&a</script>" not in page and "q&amp;a&lt;/script&gt;.png" in page  # SVG titles
  for r, png in zip(data["rows"], pngs):
    assert set(r["images"]) == set(present)
    hr = r["images"]["hr"]
    assert urllib.parse.unquote(hr["thumb"]) == report.thumbnail_path("fusion", png)
    assert urllib.parse.unquote(hr["full"]) == f"fusion/{png}"
  assert "%23" in data["rows"][0]["images"]["gt"]["full"]  # '#' would start a fragment
  assert data["rows"][1]["metrics"]["hr_psnr"] is None  # NaN
  assert data["rows"][1]["metrics"]["gain"] is None
  assert data["rows"][2]["metrics"]["gain"] == pytest.approx(2.0)
  assert {"index", "file", "gain", "hr_psnr", "bicubic_lpips", "lr_ssim"} <= set(
      parsed.sort_keys)

  # Means: formatted values, n/a for None, – for absent, KID ± std, LR line, skipped reasons.
  assert "<td class=num>27.35</td>" in page and "0.0123 ± 0.0006" in page
  assert "<td class=num>12.35</td>" in page and "<td class=num>n/a</td>" in page
  assert "<td class=num>–</td>" in page  # hr_inv has no FID
  assert "PSNR 41.23" in page and "&lt;irse50&gt;" in page and "bad&lt;1&gt;.jpg" in page
  assert "hr_gan" not in page.split("<h2>Means</h2>")[1].split("</table>")[0]
  assert "folder faces/ &amp; more" in page

  # The plot: one circle per image with finite hr and bicubic PSNR (row 1 is NaN).
  assert page.count("<svg") == 2 and page.count("<circle") == 2
  assert "mean gain +2.00 dB; 100.0% of 2 images above bicubic" in page
  assert page.count("<img") == 1  # only in the script's row template


def test_report_one_image_rescaler_only(tmp_path):
  """A model without generator (hr_inv only): the plot uses hr_inv; missing thumbnails fall
  back to the full PNGs; a missing column folder is dropped."""
  folders = ["lr", "bicubic", "invrrdb", "gt"]
  summary, rows, pngs = make_out(tmp_path, ["only one.png"], folders, thumbs=False,
                                 outputs=("hr_inv", "bicubic"))
  page = read(report.write_report(str(tmp_path), summary, rows, pngs))
  _, data = check_links(tmp_path, page)
  (row,) = data["rows"]
  assert set(row["images"]) == {"lr", "bicubic", "hr_inv", "gt"}
  assert row["images"]["gt"]["thumb"] == row["images"]["gt"]["full"] == "gt/only%20one.png"
  assert page.count("<circle") == 1 and "hr_inv (InvRRDB) is shown instead" in page
  assert row["metrics"]["gain"] == pytest.approx(2.0)
  assert "fusion" not in page and "hr (GRAIN)" not in page


def test_report_large_is_fast_and_lazy(tmp_path):
  n = 5000
  folders = ["lr", "bicubic", "invrrdb", "fusion", "gt"]
  for f in folders:
    os.makedirs(tmp_path / f)
  names = [f"img_{i:05d}.png" for i in range(n)]
  summary = fake_summary(n)
  rng = np.random.default_rng(1)
  rows = [{"file": m, "hr_psnr": float(25 + rng.normal()), "bicubic_psnr": float(24 + rng.normal()),
           "hr_ssim": 0.8, "lr_psnr": 40.0} for m in names]
  t = time.perf_counter()
  path = report.write_report(str(tmp_path), summary, rows, names)
  assert time.perf_counter() - t < 5
  page = read(path)
  assert page.count("<img") == 1  # rows are rendered from the JSON, a page at a time
  assert page.count("<circle") == n
  data = json.loads(Page(page).scripts["rows-data"])
  assert len(data["rows"]) == n and data["page_size"] == 100


def test_report_rejects_mismatched_names(tmp_path):
  with pytest.raises(ValueError, match="2 rows but 1 PNG"):
    report.write_report(str(tmp_path), {}, [{"file": "a"}, {"file": "b"}], ["a.png"])


def test_report_empty_summary(tmp_path):
  """No metrics at all still gives a page (no means table, no plot)."""
  page = read(report.write_report(str(tmp_path), {}, [], []))
  assert "No mean metrics" in page and "no plot" in page and page.count("<circle") == 0


# The page's table script, run by QuickJS (the `quickjs` wheel, a test requirement) against a
# minimal DOM; `run` returns the rows shown after each action.
JS_HARNESS = r"""
function run(page, keysJson, actionsJson) {
  const data = page.match(/<script type="application\/json" id="rows-data">([\s\S]*?)<\/script>/)[1];
  const code = page.match(/<script>([\s\S]*?)<\/script>/)[1];
  function el(ds) { return {innerHTML: "", className: "", dataset: ds || {}, on: {},
    addEventListener(t, f) { this.on[t] = f; }}; }
  const tbody = el(), pagers = [el(), el()];
  const ths = JSON.parse(keysJson).map(k => el({key: k}));
  globalThis.document = {
    getElementById: id => id === "rows-data" ? {textContent: data} : id === "rows" ? tbody : null,
    querySelectorAll: s => s === ".pager" ? pagers : s === "th.sort" ? ths : []};
  (0, eval)(code);
  const shown = () => [...tbody.innerHTML.matchAll(/<tr><td class=num>(\d+)<\/td>/g)].map(m => +m[1]);
  const out = [{shown: shown(), html: tbody.innerHTML, pager: pagers[1].innerHTML}];
  for (const [act, arg] of JSON.parse(actionsJson)) {
    if (act === "click") ths.find(t => t.dataset.key === arg).on.click();
    if (act === "page") pagers[0].on.click({target: {dataset: {page: String(arg)}, disabled: false}});
    if (act === "size") pagers[0].on.change({target: {value: String(arg)}});
    out.push({shown: shown(), classes: ths.map(t => t.className), pager: pagers[0].innerHTML});
  }
  return JSON.stringify(out);
}
"""


def run_page_script(path, actions):
  """Runs the page's table script with a minimal DOM; the rows shown after each action."""
  import quickjs

  ctx = quickjs.Context()
  ctx.eval(JS_HARNESS)
  keys = Page(read(path)).sort_keys
  return json.loads(ctx.get("run")(read(path), json.dumps(keys), json.dumps(actions)))


def test_table_script_sorts_and_pages(tmp_path):
  folders = ["lr", "bicubic", "invrrdb", "fusion", "gt"]
  summary, rows, pngs = make_out(tmp_path, NAMES, folders)
  path = report.write_report(str(tmp_path), summary, rows, pngs)
  first, asc, desc, by_name = run_page_script(
      path, [["click", "hr_psnr"], ["click", "hr_psnr"], ["click", "file"]])
  assert first["shown"] == [1, 2, 3]
  assert asc["shown"] == [1, 3, 2] and desc["shown"] == [3, 1, 2]  # NaN last both ways
  assert by_name["shown"] == [1, 3, 2]  # "a face…" < "q&a…" < "x/y.jpg"
  assert "sort asc" in by_name["classes"] and "sort desc" in desc["classes"]
  html_ = first["html"]
  assert "q&amp;a&lt;/script&gt;.png" in html_ and html_.count("<img") == 15
  assert 'src="thumbs/fusion/a%20face%20%231%20100%25.jpg"' in html_
  assert '<td class=num>n/a</td>' in html_ and '<td class=num>27.00</td>' in html_

  n = 250
  names = [f"im{i:03d}.png" for i in range(n)]
  rows = [{"file": m, "hr_psnr": float(i % 7), "bicubic_psnr": 1.0} for i, m in enumerate(names)]
  rows[5]["hr_psnr"] = math.nan
  path = report.write_report(str(tmp_path), summary, rows, names)
  first, page2, last, big, sort_desc = run_page_script(
      path, [["page", 1], ["page", 2], ["size", 250], ["click", "hr_psnr"]])
  assert first["shown"] == list(range(1, 101)) and page2["shown"] == list(range(101, 201))
  assert last["shown"] == list(range(201, 251)) and "disabled>next" in last["pager"]
  assert big["shown"] == list(range(1, 251))
  assert sort_desc["shown"][-1] == 6 and len(sort_desc["shown"]) == 250  # the NaN row last


def test_thumbnail_enlarges_nearest():
  src = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
  t = report.thumbnail(src)
  assert t.shape == (128, 128, 3) and t.dtype == np.uint8
  np.testing.assert_array_equal(t, src.repeat(8, 0).repeat(8, 1))  # 8x8 constant blocks
  np.testing.assert_array_equal(report.thumbnail(src[:, :, :3].repeat(4, 0).repeat(4, 1)), t)


def test_thumbnail_shrinks_antialiased_and_keeps_equal():
  y, x = np.mgrid[0:1024, 0:1024] / 1024.0
  smooth = np.stack([128 + 100 * np.sin(2 * np.pi * x), 128 + 100 * np.cos(3 * np.pi * y),
                     255 * x * y], -1).astype(np.uint8)
  t = report.thumbnail(smooth)
  block = smooth.reshape(128, 8, 128, 8, 3).astype(float).mean((1, 3))
  assert t.shape == (128, 128, 3) and np.abs(t - block).max() <= 3
  # Antialiased, not sampled: a 1-px checkerboard shrinks to grey, not to black or white.
  checker = (((np.indices((1024, 1024)).sum(0) % 2) * 255)[..., None]).repeat(3, -1)
  assert np.abs(report.thumbnail(checker.astype(np.uint8)).astype(int) - 128).max() <= 3
  same = np.random.default_rng(1).integers(0, 256, (128, 128, 3), np.uint8)
  np.testing.assert_array_equal(report.thumbnail(same), same)


def test_write_thumbnail_path_and_jpeg(tmp_path):
  assert report.thumbnail_path("fusion", "x/y.png") == "thumbs/fusion/x/y.jpg"
  assert report.thumbnail_path("lr", "b_1.png") == "thumbs/lr/b_1.jpg"
  src = np.random.default_rng(2).integers(0, 256, (16, 16, 3), np.uint8)
  report.write_thumbnail(str(tmp_path), "lr", "x/y.png", src)
  with Image.open(tmp_path / "thumbs" / "lr" / "x" / "y.jpg") as img:
    assert img.format == "JPEG" and img.size == (128, 128) and img.mode == "RGB"
    # JPEG at quality 90 keeps the nearest-neighbour blocks close to the source pixels.
    got = np.asarray(img).astype(float).reshape(16, 8, 16, 8, 3).mean((1, 3))
  assert np.abs(got - src).mean() < 12
