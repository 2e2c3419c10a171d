"""Report: results/report/ (index.html, report.md, summary.csv, figures/) over everything the config selects."""


rule report:
    input:
        benches=bench_outputs(),
        plans=present_plans,
        probes=expand("results/targets/{target}.json", target=TARGETS),
    output:
        html=report("results/report/index.html", caption="../report/index.rst", category="Report"),
        md="results/report/report.md",
        csv=report("results/report/summary.csv", caption="../report/summary.rst", category="Report"),
        figures=report(
            directory("results/report/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    params:
        config=canonical(config),
    log:
        "results/logs/report.log",
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/llmopt.yaml"
    script:
        "../../scripts/report.py"
