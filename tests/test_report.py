"""``ticketlab report``: figures, a self-contained report.html, numbers traceable to results.csv.

One tiny lottery run (XOR, a 16-unit MLP, 2 levels, 2 replicates, the reinit
control) is shared by the module. A headless Chromium (Debian's ``chromium``)
checks that every embedded figure decodes; without it the test is skipped.
"""

from __future__ import annotations

import csv
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ticketlab.cli import main
from ticketlab.report import figures

LOTTERY = ["lottery", "--dataset", "xor", "--model", "mlp_16", "--batch-size", "50"]
LOTTERY += ["--steps", "40it", "--eval-every", "20it", "--levels", "2", "--replicates", "2"]
LOTTERY += ["--controls", "reinit", "--quiet"]


class Tables(HTMLParser):
    """Tables (caption, header, rows), images and every src/href of a page."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self.imgs: list[str] = []
        self.links: list[str] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._caption = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            if k in a:
                self.links.append(a[k])
        if tag == "img":
            self.imgs.append(a["src"])
        elif tag == "table":
            self.tables.append({"caption": "", "source": a.get("data-source", ""), "rows": []})
        elif tag == "caption":
            self._caption = True
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "caption":
            self._caption = False
        elif tag in ("td", "th") and self._row is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr":
            self.tables[-1]["rows"].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._caption:
            self.tables[-1]["caption"] += data
        elif self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    assert main(LOTTERY + ["--runs-dir", str(runs)]) == 0
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    return run_dir


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(run), "--out", str(out), "--quiet"]) == 0
    page = Tables()
    page.feed((out / "report.html").read_text())
    return out, page


def csv_rows(run: Path) -> tuple[list[str], list[dict]]:
    with open(run / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_report_has_every_figure_embedded(run, report):
    out, page = report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["accuracy.png", "early_stop.png", f"layers-{run.name}.png"]
    assert len(page.imgs) == len(pngs)
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
    # self-contained: nothing is fetched from anywhere
    assert all(link.startswith("data:") for link in page.links), page.links
    assert not re.search(r"https?://", (out / "report.html").read_text())


def test_report_raw_table_equals_results_csv(run, report):
    _, page = report
    columns, rows = csv_rows(run)
    (raw,) = [t for t in page.tables if t["caption"].endswith("results.csv")]
    assert raw["rows"][0] == columns
    assert raw["rows"][1:] == [[r[c] for c in columns] for r in rows]


def _stats(values):
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return m, sd


def test_report_summary_numbers_and_matching_come_from_results_csv(run, report):
    _, page = report
    _, rows = csv_rows(run)
    (acc,) = [t for t in page.tables if "test accuracy over replicates" in t["caption"]]
    header, body = acc["rows"][0], acc["rows"][1:]
    col = {c: i for i, c in enumerate(header)}
    dense_m, dense_sd = _stats([float(r["test_accuracy"]) for r in rows if r["level"] == "0"])
    assert f"threshold {100 * (dense_m - dense_sd):.2f}%" in acc["caption"]
    seen = set()
    for line in body:
        variant, level = line[col["variant"]], line[col["level"]]
        accs = [
            float(r["test_accuracy"])
            for r in rows
            if r["variant"] == variant and r["level"] == level
        ]
        m, sd = _stats(accs)
        assert line[col["n"]] == str(len(accs)) == "2"
        assert line[col["test acc % mean"]] == f"{100 * m:.2f}"
        assert line[col["std"]] == f"{100 * sd:.2f}"
        assert line[col["min"]] == f"{100 * min(accs):.2f}"
        assert line[col["max"]] == f"{100 * max(accs):.2f}"
        density = float(next(r["density"] for r in rows if r["level"] == level))
        assert line[col["weights %"]] == f"{100 * density:.1f}"
        expected = "matching" if m >= dense_m - dense_sd else ""
        assert line[col["matching"]] == expected
        seen.add((variant, level))
    assert seen == {(r["variant"], r["level"]) for r in rows}
    (stop,) = [t for t in page.tables if "early-stop" in t["caption"]]
    for line in stop["rows"][1:]:
        steps = [
            float(r["best_val_step"])
            for r in rows
            if r["variant"] == line[1] and r["level"] == line[2]
        ]
        assert line[6] == f"{sum(steps) / len(steps):.1f}"


def test_report_layer_densities_come_from_masks(run, report):
    from ticketlab.masks import Mask

    _, page = report
    (layers,) = [t for t in page.tables if "per layer" in t["caption"]]
    header = layers["rows"][0]
    for line in layers["rows"][1:]:
        level = line[0]
        path = run / "replicate-0" / f"level-{level}" / "mask.safetensors"
        if level == "0":
            path = run / "replicate-0" / "level-0" / "ticket" / "mask.safetensors"
        mask = Mask.load(path)
        assert line[1] == f"{100 * mask.density():.1f}"
        for name, cell in zip(header[2:], line[2:]):
            assert cell == f"{100 * mask.layer_density()[name]:.2f}"


def test_two_runs_compare_on_one_figure(run, tmp_path, capsys):
    other = tmp_path / "runs2"
    shutil.copytree(run, other / run.name)
    out = tmp_path / "out"
    assert main(["report", str(run), str(other / run.name), "--out", str(out), "--quiet"]) == 0
    page = Tables()
    page.feed((out / "report.html").read_text())
    acc = [t for t in page.tables if "test accuracy over replicates" in t["caption"]]
    assert len(acc) == 2 and acc[0]["caption"] != acc[1]["caption"]  # told apart by parent
    assert len(list(out.glob("layers-*.png"))) == 2


def test_report_refuses_a_dir_without_results(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert main(["report", str(empty), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no results.csv" in err[0]
    assert not out.exists()


def test_percent_labels_follow_the_papers():
    assert figures.percent_label(1.0) == "100"
    assert [figures.percent_label(0.8**k) for k in (3, 6, 9)] == ["51.2", "26.2", "13.4"]
    assert figures.density_ticks([1.0, 0.8, 0.8, 0.64]) == [1.0, 0.8, 0.64]
    assert len(figures.density_ticks([0.8**k for k in range(30)])) <= 12


CHROMIUM = ["/usr/bin/chromium", "chromium", "chromium-browser"]
PROBE = """<script>window.addEventListener('load', function () {
  var o = document.createElement('pre'); o.id = 'probe';
  o.textContent = Array.from(document.images).map(function (i) {
    return i.naturalWidth + 'x' + i.naturalHeight; }).join(' ');
  document.body.appendChild(o); });</script>"""


def test_report_renders_in_headless_chromium(report, tmp_path):
    exe = next((shutil.which(c) for c in CHROMIUM if shutil.which(c)), None)
    if exe is None:
        pytest.skip("chromium not installed: apt-get install -y chromium (or `make browser`)")
    out, page = report
    # the page itself has no script; a copy gets a probe that records each image's size
    probe = tmp_path / "probe.html"
    probe.write_text((out / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
           "--dump-dom", probe.as_uri()]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'<pre id="probe">([^<]*)</pre>', dom)
    assert m, f"the probe did not run; chromium printed: {dom[:300]!r}"
    sizes = m.group(1).split()
    assert len(sizes) == len(page.imgs) == 3
    for s in sizes:
        w, h = map(int, s.split("x"))
        assert w > 100 and h > 100, sizes


def test_a_density_sweep_of_one_shot_runs_is_one_line_per_criterion(tmp_path):
    """prune runs that differ only in --density are joined; the criterion tells lines apart."""
    from ticketlab.report import curve_groups, density_lines, load_runs, summarize

    runs_dir = tmp_path / "runs"
    prune = ["prune", "--dataset", "xor", "--model", "mlp_16", "--batch-size", "50"]
    prune += ["--steps", "20it", "--eval-every", "20it", "--quiet", "--runs-dir", str(runs_dir)]
    for criterion in ("snip", "random"):
        for density in ("0.5", "0.2"):
            assert main(prune + ["--criterion", criterion, "--density", density]) == 0
    runs = load_runs(sorted(p for p in runs_dir.iterdir() if p.is_dir()))
    groups = curve_groups(runs)
    assert sorted(len(g) for g, _ in groups) == [2, 2]
    assert all(tells == [("criterion", g[0].spec["spec"]["criterion"])] for g, tells in groups)
    summaries = {r.label: summarize(r) for r in runs}
    lines = {s["label"]: s for s in density_lines(runs, summaries, "acc")}
    assert set(lines) == {"prune snip", "prune random"}
    for g, _ in groups:
        line = lines[f"prune {g[0].spec['spec']['criterion']}"]
        by_density = {s["density"]: 100 * s["acc_mean"] for r in g for s in summaries[r.label]}
        assert len(by_density) == 2 and line["density"] == sorted(by_density, reverse=True)
        assert line["mean"] == [by_density[d] for d in line["density"]]


def test_runs_without_a_density_target_stay_apart(run, tmp_path):
    from ticketlab.report import curve_groups, load_runs

    other = tmp_path / "copy"
    shutil.copytree(run, other / run.name)
    groups = curve_groups(load_runs([run, other / run.name]))
    assert [len(g) for g, _ in groups] == [1, 1]


def test_runs_whose_parents_share_a_name_are_still_told_apart(run, tmp_path):
    from ticketlab.report.sections import load_runs

    a, b = tmp_path / "a" / "runs" / run.name, tmp_path / "b" / "runs" / run.name
    shutil.copytree(run, a)
    shutil.copytree(run, b)
    labels = [r.label for r in load_runs([a, b])]
    assert labels[0] != labels[1] and labels[0].endswith(f"a/runs/{run.name}")
