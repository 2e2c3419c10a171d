"""The registry: config/config.yaml, config/models.yaml and config/targets.yaml, loaded and schema-checked.

    python -m llmopt.registry [.test/config.yaml]     # validate (with overrides) and print what a run covers

The Snakefile and the command line both go through ``load``: every YAML file is validated against its JSON schema in
``workflow/schemas/`` and cross-checked (a model id, scheme or target the config names must exist), so a bad file
fails in one line naming the file and field before any stage runs. Model entries handed to the stages are the
models.yaml entries with their ``id`` added.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.errors import LlmoptError

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "workflow" / "schemas"
DEFAULT_CONFIG = REPO / "config" / "config.yaml"


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing or malformed file is a one-line LlmoptError with the line number."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LlmoptError(f"{path}: file not found") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise LlmoptError(f"{path}: malformed YAML{where}: {problem}") from None


def validate(data: Any, schema: str, where: str | Path) -> None:
    """Check ``data`` against ``workflow/schemas/<schema>.schema.yaml``; raise naming the first bad field."""
    import jsonschema

    schema_doc = load_yaml(SCHEMAS / f"{schema}.schema.yaml")
    validator = jsonschema.Draft202012Validator(schema_doc)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        field = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise LlmoptError(f"{where}: {field}: {error.message}")


def rule_safe(model_id: str) -> str:
    """A model id as part of a Snakemake rule name: dots and dashes become underscores."""
    return re.sub(r"[^A-Za-z0-9_]", "_", model_id)


@dataclass
class Registry:
    """What a run covers: the validated config, its models (entries with ``id``), schemes and targets."""

    config: dict
    models: dict[str, dict]  # the models the config selects, in config order
    all_models: dict[str, dict]  # every entry of models.yaml
    targets: dict[str, dict]  # the targets the config selects
    all_targets: dict[str, dict]  # every entry of targets.yaml
    schemes: dict[str, dict]  # the schemes the workflow builds (run_schemes), each with its ``name``

    def model(self, model_id: str) -> dict:
        """The entry of ``model_id`` (any model in models.yaml, selected or not)."""
        if model_id not in self.all_models:
            raise LlmoptError(f"unknown model id '{model_id}' (models.yaml has: {', '.join(self.all_models)})")
        return self.all_models[model_id]


def _resolve(path: str | Path, base: Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else base / path


def load_models(path: str | Path) -> dict[str, dict]:
    """Every entry of a models.yaml, validated, each with its ``id`` added."""
    data = load_yaml(path)
    validate(data, "models", path)
    return {mid: {**entry, "id": mid} for mid, entry in data["models"].items()}


def load_targets(path: str | Path) -> dict[str, dict]:
    """Every entry of a targets.yaml, validated."""
    data = load_yaml(path)
    validate(data, "targets", path)
    return data["targets"]


def load(config: dict | str | Path | None = None, base: str | Path = REPO, where: str = "config") -> Registry:
    """Validate a config (a dict, as Snakemake holds it, or a YAML path) and the registry files it names.

    Relative ``models_file``/``targets_file`` paths resolve against ``base`` (the repository root); ``where`` names
    a dict config in error messages.
    """
    if config is None or isinstance(config, (str, Path)):
        path = Path(config or DEFAULT_CONFIG)
        where, config = str(path), load_yaml(path)
    validate(config, "config", where)
    base = Path(base)
    models = load_models(_resolve(config["models_file"], base))
    targets = load_targets(_resolve(config["targets_file"], base))
    for field, names, known in (("models", config["models"], models), ("targets", config["targets"], targets),
                                ("run_schemes", config["run_schemes"], config["schemes"])):
        for name in names:
            if name not in known:
                raise LlmoptError(f"{where}: {field}: unknown {field.rstrip('s').replace('run_', '')} '{name}' "
                                  f"(expected one of {', '.join(known)})")
    return Registry(
        config=config,
        models={mid: models[mid] for mid in config["models"]},
        all_models=models,
        targets={t: targets[t] for t in config["targets"]},
        all_targets=targets,
        schemes={name: {"name": name, **config["schemes"][name]} for name in config["run_schemes"]},
    )


def merged(base: dict, override: dict) -> dict:
    """``override`` merged over ``base`` as Snakemake merges config files: dicts key by key, the rest replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m llmopt.registry [OVERRIDE.yaml ...]``: config/config.yaml with overrides (like --configfile)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = load_yaml(DEFAULT_CONFIG)
        for path in argv:
            config = merged(config, load_yaml(path) or {})
        reg = load(config, where=" + ".join(["config/config.yaml", *argv]))
    except LlmoptError as err:
        print(f"llmopt: error: {err}", file=sys.stderr)
        return 2
    print(f"scale {reg.config['scale']}: {len(reg.models)} models x {len(reg.schemes)} schemes x "
          f"{len(reg.targets)} targets")
    for mid, entry in reg.models.items():
        print(f"  {mid:24s} {entry['family']:11s} tier {entry['tier']!s:9s} source {entry['source']}")
    print(f"  schemes: {', '.join(reg.schemes)}   targets: {', '.join(reg.targets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
