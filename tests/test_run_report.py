"""A run's report JSON, one builder for the auditor and the plugin: the run's own warnings first, every field."""

from __future__ import annotations

import numpy as np

from tb_gradient_plugin.detect import detect
from tb_gradient_plugin.run_report import failed_report, report_json
from tb_gradient_plugin.runs import RunData, Series


def _run(warnings: list[str]) -> RunData:
    steps = np.arange(200, dtype=np.int64)
    return RunData(name="r", source="plain", series={"loss": Series(steps, 1.0 + 0.01 * np.cos(steps))},
                   warnings=list(warnings))


def test_run_warnings_come_first_and_once():
    run = _run(["events.out.tfevents.1@120: bad record"])
    report = detect(run)
    report.warnings.insert(0, run.warnings[0])  # a warning both the run and the detector hold is listed once
    doc = report_json(report, run.warnings)
    assert doc["warnings"][0] == run.warnings[0] and doc["warnings"].count(run.warnings[0]) == 1
    assert doc["warnings"][1:] == [w for w in report.warnings if w != run.warnings[0]]
    assert doc == report.to_json() | {"warnings": doc["warnings"]}


def test_failed_report_has_every_field_of_a_judged_one():
    judged = report_json(detect(_run([])))
    failed = report_json(failed_report("r", "plain", "detection failed: RuntimeError: boom"), ["damaged file"])
    assert list(failed) == list(judged)
    assert failed["warnings"] == ["damaged file", "detection failed: RuntimeError: boom"]
    assert failed["episodes"] == failed["loss_spikes"] == failed["validation"] == [] and failed["steps"] == 0
