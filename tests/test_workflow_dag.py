"""The Snakemake workflow without running the stages: lint, DAG shape, rule names, config errors, slurm profile,
and that changing one shader recompiles only that shader (a dry run after a real compile of two shaders)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.workflow
REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run snakemake on the repository's Snakefile in ``workdir``; ``.out`` is stdout and stderr together."""
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    proc.out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.out[-4000:]}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    table = output.split("Job stats:")[1].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def test_lint_clean(tmp_path):
    out = snakemake(tmp_path, "--lint").out
    assert "Congratulations, your workflow is in a good condition!" in out


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> Path:
    """A work directory where the five probes have run (they are a checkpoint: the DAG beyond depends on them)."""
    return write_probes(tmp_path_factory.mktemp("probed"), ["cpu", "vulkan", "npu", "iree-cpu", "cuda"])


def write_probes(workdir: Path, targets: list[str]) -> Path:
    """Probe in this process (what the probe rule runs, without a Python start-up per target)."""
    from llmopt.probe import write_probe

    for target in targets:
        write_probe(target, workdir / "results" / "targets" / f"{target}.json")
    return workdir


def present(workdir: Path) -> list[str]:
    return [p.stem for p in (workdir / "results/targets").glob("*.json") if yaml.safe_load(p.read_text())["present"]]


def test_fresh_dry_run_starts_with_the_probes(tmp_path):
    counts = job_counts(snakemake(tmp_path, "-n", "--cores", "2").out)
    assert counts == {"probe": 5, "benchmark": 45, "report": 1, "all": 1}


def test_default_dry_run_covers_every_stage(probed):
    """After the probes: every model downloaded and quantized once, planned and benchmarked on every present
    target; absent targets get a benchmark job that records the probe's reason and nothing else."""
    counts = job_counts(snakemake(probed, "-n", "--cores", "2").out)
    here = present(probed)
    assert "cpu" in here and "npu" not in here
    assert counts["download"] == 9 and counts["quantize"] == 9 and counts["calibrate"] == 1
    assert counts["partition"] == 9 * len(here) and counts["benchmark"] == 45 and counts["report"] == 1
    if "vulkan" in here:
        assert counts["compile_shader"] == len(list((REPO / "shaders").glob("*.comp"))) and counts["compile_vulkan"] == 1
    assert counts.get("compile_kernels", 0) == ("iree-cpu" in here)


def test_rules_per_model_and_target(tmp_path):
    rules = set(snakemake(tmp_path, "--list-rules").out.split())
    assert {"all", "all_models", "probe", "download", "quantize", "compile_shader", "compile_vulkan",
            "compile_kernels", "partition", "benchmark", "report"} <= rules
    assert {"model_gemma_3_27b_it", "model_qwen2_5_7b_instruct", "model_qwen2_5_vl_7b_instruct",
            "model_qwq_32b_preview", "model_gemma_3_270m"} <= rules
    assert {"target_cpu", "target_vulkan", "target_npu", "target_iree_cpu", "target_cuda"} <= rules


def test_one_model_rule_and_any_path(probed):
    counts = job_counts(snakemake(probed, "-n", "model_gemma_2_2b_it").out)
    assert counts["download"] == 1 and counts["quantize"] == 1 and counts["benchmark"] == 5
    counts = job_counts(snakemake(probed, "-n", "results/qwen2.5-7b-instruct/w8/cpu/bench.json").out)
    assert counts["quantize"] == 1 and counts["benchmark"] == 1  # any scheme of config.yaml, by path


@pytest.mark.parametrize("override, message", [
    ("scale=huge", r"config \(config/config\.yaml with --config/--configfile overrides\): scale: 'huge' is not one of"),
    ("models=[gpt-5]", r"models: unknown model 'gpt-5'"),
    ("targets=[tpu]", r"targets: unknown target 'tpu'"),
])
def test_bad_config_stops_before_any_job(tmp_path, override, message):
    proc = snakemake(tmp_path, "-n", "--config", override, check=False)
    assert proc.returncode != 0
    assert re.search(message, proc.out)
    assert not (tmp_path / "results").exists()


def test_malformed_models_yaml(tmp_path):
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  x: [unclosed\n")
    proc = snakemake(tmp_path, "-n", "--config", f"models_file={bad}", check=False)
    assert proc.returncode != 0 and re.search(rf"{re.escape(str(bad))}: malformed YAML at line \d+", proc.out)


def test_slurm_profile_dry_run(probed):
    """The slurm executor plugin accepts the profile; GPU targets' jobs ask for a GPU, others don't."""
    out = snakemake(probed, "--profile", str(REPO / "workflow/profiles/slurm"), "-n",
                    "results/gemma-2-2b-it/w4g128/cuda/bench.json", "results/gemma-2-2b-it/w4g128/cpu/bench.json").out
    jobs = out.split("\n\n")
    bench = {re.search(r"target=([\w-]+)", j)[1]: j for j in jobs if "rule benchmark:" in j}
    assert re.search(r"mem_mb=96000.*runtime=240.*gpu=0", bench["cpu"])
    if "cuda" in bench:  # present only on a CUDA machine: absent targets' benchmarks are recorded locally
        assert re.search(r"gpu=1", bench["cuda"])
    assert re.search(r"rule quantize:.*?mem_mb=32000", out, re.S)


def test_shader_change_recompiles_only_that_shader(tmp_path):
    """Compile two shaders for real, edit a header only one includes, then that shader: each time the dry run shows
    one compile_shader job (+ the manifest)."""
    shaders = tmp_path / "shaders"
    shaders.mkdir()
    for path in [REPO / "shaders/add.comp", REPO / "shaders/rmsnorm.comp", *(REPO / "shaders").glob("*.glsl")]:
        shutil.copy2(path, shaders / path.name)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"shaders_dir": str(shaders), "targets": ["cpu", "vulkan"]}))
    args = ("--configfile", str(config), "--cores", "2")
    write_probes(tmp_path, ["cpu", "vulkan"])
    snakemake(tmp_path, *args, "results/kernels/vulkan/manifest.json")
    probe = yaml.safe_load((tmp_path / "results/targets/vulkan.json").read_text())
    if not probe["present"]:
        pytest.skip(f"no Vulkan device: {probe['reason']}")
    assert {p.name for p in (tmp_path / "results/kernels/vulkan").glob("*.spv")} == {"add.spv", "rmsnorm.spv"}
    assert "Nothing to be done" in snakemake(tmp_path, *args, "-n", "results/kernels/vulkan/manifest.json").out

    for edited in ("x8.glsl", "rmsnorm.comp"):  # a header only rmsnorm.comp includes, then the shader itself
        with open(shaders / edited, "a") as f:
            f.write("\n// edited\n")
        out = snakemake(tmp_path, *args, "-n", "results/kernels/vulkan/manifest.json").out
        assert job_counts(out) == {"compile_shader": 1, "compile_vulkan": 1}, edited
        assert "wildcards: shader=rmsnorm" in out and "shader=add" not in out, edited
