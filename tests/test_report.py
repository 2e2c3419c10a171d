"""llmopt.report: a results tree built by the real stages (tiny model, quantize, calibrate, partition, benchmark,
plus an absent target, a vanished one and a corrupt file) becomes a self-contained page whose every plot renders
in headless Chromium, a Markdown twin and summary.csv; problems are shown, not fatal."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess

import pytest

from llmopt.bench import run_benchmark
from llmopt.fsutil import write_json
from llmopt.partition import write_plan
from llmopt.report import build_report

BENCH = {"prompt_len": 16, "gen_len": 4, "batches": [1, 2], "warmup": 0, "repeats": 1, "check_tokens": 8,
         "baselines": ["hf"]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from llmopt import roofline
    from llmopt.backends import probe
    from llmopt.quant.pipeline import quantize_model
    from llmopt.registry import load
    from test_bench_models import build_tiny

    root = tmp_path_factory.mktemp("results")
    source, _ = build_tiny(root)  # root/tiny-qwen/{source, w4/quant}
    quantize_model(source, "w4g128", root / "tiny-qwen" / "w4g128" / "quant")
    probes = {t: {"target": t, **probe(t)} for t in ("cpu", "npu")}
    for t, p in probes.items():
        write_json(root / "targets" / f"{t}.json", p)
    calib = root / "targets" / "calibration.json"
    write_json(calib, roofline.calibrate(["cpu"], repeats=1, size=512, prefill_tokens=8, host_mib=16))
    entry = load().all_models["qwen2.5-7b-instruct"]  # full-scale facts for the laptop plan
    settings = {**BENCH, "calibration": str(calib), "budgets": {"npu": "2GB", "vulkan": "16GB"}}
    for scheme in ("w4", "w4g128"):
        quant = root / "tiny-qwen" / scheme / "quant"
        for target in ("cpu", "npu"):
            d = root / "tiny-qwen" / scheme / target
            write_plan(quant, entry, target, probes, settings, d / "partition.json")
        run_benchmark(quant, source, d.with_name("cpu") / "partition.json", "cpu", probes["cpu"], BENCH,
                      d.with_name("cpu") / "bench.json")
        run_benchmark(quant, source, None, "npu", probes["npu"], BENCH, d.with_name("npu") / "bench.json")
    # present at probe time, gone at benchmark time
    vanished = root / "tiny-qwen" / "w4" / "iree-npu"
    run_benchmark(root / "tiny-qwen" / "w4" / "quant", source, None, "npu", {"present": True}, BENCH,
                  vanished / "bench.json")
    corrupt = root / "tiny-qwen" / "w4" / "vulkan"
    corrupt.mkdir()
    (corrupt / "bench.json").write_text('{"model": "tiny-qwen", truncated')
    out = root / "report"
    build_report(root, {}, out)
    return root, out


def test_report_files_and_tables(results):
    root, out = results
    for name in ("index.html", "report.md", "summary.csv", "figures/seed_vs_ceiling.png",
                 "figures/measured_vs_ceiling.png", "figures/perplexity_vs_bpw.png",
                 "figures/predicted_vs_measured.png", "figures/partition_tiny-qwen_w4_cpu.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert {(r["scheme"], r["target"]) for r in rows} == {("w4", "cpu"), ("w4g128", "cpu")}
    for r in rows:
        assert float(r["decode_tok_s"]) > 0 and float(r["hf_decode_tok_s"]) > 0
        assert float(r["ceiling_decode_tok_s"]) > 0 and 0 < float(r["pct_of_ceiling"])
        assert r["seed_lo"] == "200" and float(r["laptop_decode_tok_s"]) > 0  # qwen2.5-7b's seed target beside
    w4g128 = next(r for r in rows if r["scheme"] == "w4g128")
    assert 4.1 < float(w4g128["bpw"]) < 4.2 and float(w4g128["compression"]) > 1
    md = (out / "report.md").read_text()
    for text in ("## Errors and skips", "no XDNA device node", "gone now", "not valid JSON",
                 "The seed's targets on the Phoenix laptop", "Environment and provenance"):
        assert text in md, text
    assert "](figures/seed_vs_ceiling.png)" in md


def test_html_is_self_contained(results):
    _, out = results
    page = (out / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    assert "<link" not in page and "<script" not in page
    imgs = re.findall(r"<img [^>]*src=\"([^\"]+)\"", page)
    n_png = len(list((out / "figures").glob("*.png")))
    assert len(imgs) == n_png >= 6 and all(s.startswith("data:image/png;base64,") for s in imgs)


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    return exe


def test_every_plot_renders_in_headless_chromium(results, tmp_path):
    """Load the page in Chromium; a script added to a copy reports each image's natural size into the DOM."""
    _, out = results
    exe = _chromium()
    probe_js = ("<script>window.addEventListener('load',()=>{const r=[...document.images].map(i=>"
                "[i.complete,i.naturalWidth,i.naturalHeight]);document.body.setAttribute('data-imgs',"
                "JSON.stringify(r));});</script></body>")
    page = tmp_path / "check.html"
    page.write_text((out / "index.html").read_text().replace("</body>", probe_js))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
             "--virtual-time-budget=10000"]
    dom = subprocess.run([exe, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    m = re.search(r"data-imgs=\"([^\"]+)\"", dom.stdout)
    assert m, dom.stderr[-2000:]
    sizes = json.loads(m.group(1).replace("&quot;", '"'))
    assert len(sizes) == len(list((out / "figures").glob("*.png")))
    for complete, w, h in sizes:
        assert complete and w >= 300 and h >= 200
    shot = tmp_path / "shot.png"
    subprocess.run([exe, *flags, "--window-size=1300,2400", f"--screenshot={shot}", (out / "index.html").as_uri()],
                   capture_output=True, timeout=180, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.std() > 0.05  # a rendered page, not a blank one


def test_bare_table_columns_are_key_header_and_no_format(tmp_path):
    from llmopt.report.render import Section, Table, render_markdown

    t = Table(["model", ("tok_s", "tok/s", ".1f")], [{"model": "m", "tok_s": 12.345}])
    assert t.columns == [("model", "model", None), ("tok_s", "tok/s", ".1f")]
    md = render_markdown([Section("S", tables=[t])], "T", tmp_path)
    assert "| model | tok/s |" in md and "| m | 12.3 |" in md
