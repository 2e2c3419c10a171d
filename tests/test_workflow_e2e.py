"""The smallest config (.test/config.yaml) end to end: snakemake runs every stage for real, then dry runs show
that editing one model reruns only that model's chain and editing one shader only what depends on it.

Needs every stage's library (download, quantize, compile, partition, bench, report) and takes minutes on 2 cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from test_workflow_dag import REPO, job_counts, snakemake

pytestmark = pytest.mark.workflow
MODELS = ["gemma-2-2b-it", "qwen2.5-14b-instruct"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The .test config run to the end in a fresh work directory, with editable copies of shaders and models.yaml."""
    workdir = tmp_path_factory.mktemp("e2e")
    shutil.copytree(REPO / "shaders", workdir / "shaders")
    shutil.copy2(REPO / "config/models.yaml", workdir / "models.yaml")
    override = workdir / "override.yaml"
    override.write_text(yaml.safe_dump({"shaders_dir": str(workdir / "shaders"),
                                        "models_file": str(workdir / "models.yaml")}))
    args = ["--cores", "2", "--configfile", str(REPO / ".test/config.yaml"), str(override)]
    snakemake(workdir, *args, timeout=3600)
    return workdir, args


def test_every_stage_wrote_its_outputs(run):
    from llmopt.download.manifest import verify_folder

    workdir, _ = run
    results = workdir / "results"
    for model in MODELS:
        assert verify_folder(results / model / "source")["source"] == "synthetic"
        assert (results / model / "w4g128/quant/quant.json").is_file()
        for target in ("cpu", "vulkan"):
            bench = json.loads((results / model / "w4g128" / target / "bench.json").read_text())
            assert bench["model"] == model and bench["target"] == target
            probe = json.loads((results / "targets" / f"{target}.json").read_text())
            assert bench.get("skipped", False) == (not probe["present"])
            if probe["present"]:
                assert (results / model / "w4g128" / target / "partition.json").is_file()
    for name in ("index.html", "report.md", "summary.csv"):
        assert (results / "report" / name).stat().st_size > 0
    assert "Nothing to be done" in snakemake(workdir, *run[1], "-n").out


def test_model_edit_reruns_only_that_models_chain(run):
    workdir, args = run
    models = workdir / "models.yaml"
    original = models.read_text()
    data = yaml.safe_load(original)
    data["models"]["qwen2.5-14b-instruct"]["tiny"]["num_hidden_layers"] = 3
    models.write_text(yaml.safe_dump(data, sort_keys=True))  # reordered keys too: only the value counts
    try:
        out = snakemake(workdir, *args, "-n").out
    finally:
        models.write_text(original)
    counts = job_counts(out)
    assert counts == {"download": 1, "quantize": 1, "laptop_plan": 1, "partition": 2, "benchmark": 2, "report": 1,
                      "all": 1}, counts
    assert "gemma-2-2b-it/w4g128" not in out.split("rule report")[0]
    assert "Nothing to be done" in snakemake(workdir, *args, "-n").out  # the same entry again: nothing to redo


def test_shader_edit_recompiles_it_and_reruns_only_vulkan(run):
    workdir, args = run
    if not json.loads((workdir / "results/targets/vulkan.json").read_text())["present"]:
        pytest.skip("no Vulkan device here")
    with open(workdir / "shaders" / "rmsnorm.comp", "a") as f:
        f.write("\n// edited\n")
    out = snakemake(workdir, *args, "-n").out
    counts = job_counts(out)
    assert counts == {"compile_shader": 1, "compile_vulkan": 1, "benchmark": 2, "report": 1, "all": 1}, counts
    assert "wildcards: shader=rmsnorm" in out and "target=cpu" not in out


def test_snakemake_report(run):
    workdir, args = run
    snakemake(workdir, *args, "--report", str(workdir / "snakemake-report.html"))
    assert (workdir / "snakemake-report.html").stat().st_size > 10_000
