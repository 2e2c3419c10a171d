"""Targets users type: all_models, model_<id> per model (dots and dashes made rule-safe), target_<t> per target."""


rule all_models:
    """Every model x scheme x target of the config, then the report."""
    localrule: True
    input:
        bench_outputs(),
        "results/report/index.html",


for _model in REG.all_models:

    rule:
        name:
            f"model_{rule_safe(_model)}"
        localrule: True
        input:
            bench_outputs(models=[_model]),


for _target in REG.all_targets:

    rule:
        name:
            f"target_{rule_safe(_target)}"
        localrule: True
        input:
            bench_outputs(targets=[_target]),
