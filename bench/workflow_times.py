"""Where a workflow run's time went: the per-job `benchmark:` records (results/logs/**/*.tsv) summed per rule.

    python bench/workflow_times.py [WORKDIR]        # default: the current directory

Prints, per stage, the number of jobs, their summed wall time and CPU time, the longest job and the peak RSS
(max_rss, MB), from the TSV files Snakemake's `benchmark:` directive writes for every job. On a shared machine the
CPU time is the fairer measure: it is what the jobs would need on a quiet one (plus their waits on I/O).
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path


def stage_times(workdir: Path) -> dict[str, dict]:
    """{stage: {"jobs", "total_s", "max_s", "max_job", "max_rss_mb"}} from ``workdir/results/logs``."""
    logs = workdir / "results" / "logs"
    out: dict[str, dict] = defaultdict(lambda: {"jobs": 0, "total_s": 0.0, "cpu_s": 0.0, "max_s": 0.0, "max_job": "",
                                                "max_rss_mb": 0.0})
    for tsv in sorted(logs.rglob("*.tsv")):
        rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
        if not rows:
            continue
        stage = tsv.relative_to(logs).parts[0].removesuffix(".tsv")
        seconds = float(rows[-1]["s"])
        rss = float(rows[-1].get("max_rss") or 0) if rows[-1].get("max_rss") not in ("-", "NA") else 0.0
        rec = out[stage]
        rec["jobs"] += 1
        rec["total_s"] += seconds
        rec["cpu_s"] += float(rows[-1].get("cpu_time") or 0)
        rec["max_rss_mb"] = max(rec["max_rss_mb"], rss)
        if seconds > rec["max_s"]:
            rec["max_s"], rec["max_job"] = seconds, str(tsv.relative_to(logs).with_suffix(""))
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    workdir = Path(argv[0] if argv else ".")
    times = stage_times(workdir)
    if not times:
        print(f"{workdir}/results/logs: no benchmark records", file=sys.stderr)
        return 1
    print(f"{'stage':10s} {'jobs':>5s} {'wall s':>9s} {'cpu s':>8s} {'max s':>8s} {'max RSS MB':>10s}  longest job")
    for stage, r in sorted(times.items(), key=lambda kv: -kv[1]["total_s"]):
        print(f"{stage:10s} {r['jobs']:5d} {r['total_s']:9.1f} {r['cpu_s']:8.1f} {r['max_s']:8.1f} {r['max_rss_mb']:10.0f}"
              f"  {r['max_job']}")
    total = {k: sum(r[k] for r in times.values()) for k in ("jobs", "total_s", "cpu_s")}
    print(f"{'all':10s} {total['jobs']:5d} {total['total_s']:9.1f} {total['cpu_s']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
