"""Probe stage: is a target usable here, and if not, exactly why (``results/targets/{target}.json``).

    llmopt probe vulkan -o results/targets/vulkan.json
    llmopt probe --all

``write_probe`` asks the target's backend module (``llmopt.backends.probe``), adds the target name and the time,
checks the record against ``workflow/schemas/probe.schema.yaml`` and writes it atomically. An absent device is not
an error: ``present`` is false and ``reason`` says what is missing; compile, partition, benchmark and report read it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from llmopt.fsutil import write_json


def probe_record(target: str) -> dict:
    """The probe record of ``target`` (the contract of docs/ARCHITECTURE.md), validated."""
    from llmopt import backends
    from llmopt.registry import validate

    found = backends.probe(target)
    record = {"target": target, "present": bool(found.get("present")), "reason": str(found.get("reason", "")),
              "device": found.get("device") or {}, "features": found.get("features") or {},
              "probed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    record.update({k: v for k, v in found.items() if k not in record})
    validate(record, "probe", f"probe of {target}")
    return record


def write_probe(target: str, out: Path) -> dict:
    """Probe ``target`` and write its record to ``out`` atomically; return the record."""
    record = probe_record(target)
    write_json(out, record)
    return record
