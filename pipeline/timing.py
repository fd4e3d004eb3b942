"""The `timing` stage: the plan's seconds per stage beside the ones each stage took.

Every stage run through `python -m pipeline` records its wall time in reports/timing/<stage>.json
(`pipeline.io.record_stage`); this stage, the last, reads those and the plan (reports/plan.json)
and writes reports/timing.json. "dvc" is the time between stages (DVC hashing outputs, process starts
before the clock), measured as the wall clock from prepare's start to now minus the stages' own.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.io import recorded, stage_started


def plan_vs_actual(plan: dict, stages: dict[str, Path], now: float | None = None) -> dict:
    """Planned and actual seconds of `stages` (name -> its record's path; this stage's so far included), their
    totals and ratio.

    The wall clock runs from the earliest stage's start; when the records span more than one run
    (some stages came from DVC's cache: older records), it is no longer one run's time and the
    actual total is the stages' sum."""
    now = time.time() if now is None else now
    planned = plan.get("planned_seconds") or {}
    records = {s: recorded(path) for s, path in stages.items()}
    records["timing"] = {"started": stage_started(), "seconds": now - stage_started()}
    actual = {s: (round(r["seconds"], 1) if r else None) for s, r in records.items()}
    own = sum(v for v in actual.values() if v is not None)
    starts = [r["started"] for r in records.values() if r]
    wall = now - min(starts) if starts else None
    one_run = wall is not None and all(r for r in records.values()) and wall < 1.5 * own + 300
    if one_run:
        actual["dvc"] = round(wall - own, 1)
    total = round(wall if one_run else own, 1)
    rows = {s: {"planned_s": planned.get(s), "actual_s": actual.get(s)} for s in dict.fromkeys([*planned, *actual])}
    planned_total = plan.get("planned_total_seconds")
    return {
        "budget_minutes": plan.get("budget_minutes"),
        "backbones": plan.get("backbones"),
        "stages": rows,
        "planned_total_seconds": planned_total,
        "actual_total_seconds": total,
        "one_run": one_run,
        "actual_over_planned": round(total / planned_total, 3) if planned_total else None,
    }
