"""The benchmark scripts run end to end and print every line they promise (never their timings).

``benchmarks/overhead.py --quick`` and ``benchmarks/throughput.py --quick`` (CPU, fp32) run at the same
time, as users run them (subprocesses from the repo root); together well under a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, env

ARMS = ["a", "a_acc", "b", "b2", "c", "d", "e"]
RATIOS = ["b/a", "b/a_acc", "c/b", "d/b", "e/b", "b2/b", "a/a_acc", "e/c"]
GOAL_RATIOS_TINY = ["b/a_acc", "c/b", "d/b", "e/b"]  # the goals of the tiny workload: PASS or MISS
HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None
NUMBER = r"-?\d+\.\d+"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    raw = tmp / "raw.json"
    runs = {
        "overhead": [sys.executable, "benchmarks/overhead.py", "--quick", "--json", str(raw)],
        "throughput": [sys.executable, "benchmarks/throughput.py", "--quick", "--precisions", "fp32",
                       "--out", str(tmp / "table.txt")],
        # The default schedule, on two arms: started together, run one at a time, compared on CPU seconds.
        "lockstep": [sys.executable, "benchmarks/overhead.py", "--quick", "--schedule", "lockstep", "--arms", "a_acc,b",
                     "--checkpoint-reps", "2", "--json", str(tmp / "lockstep.json")],
    }
    procs = {k: subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, cmd in runs.items()}
    out = {}
    for k, p in procs.items():
        text, _ = p.communicate(timeout=300)
        out[k] = (p.returncode, text)
    out["raw"] = json.loads(raw.read_text()) if raw.exists() else None
    out["lockstep_raw"] = json.loads((tmp / "lockstep.json").read_text()) if (tmp / "lockstep.json").exists() else None
    out["table"] = (tmp / "table.txt").read_text() if (tmp / "table.txt").exists() else ""
    return out


def test_overhead_quick_prints_every_arm_and_ratio(outputs):
    rc, text = outputs["overhead"]
    assert rc == 0, text[-3000:]
    assert re.search(r"^machine: .+, \d+ cores, \d+ threads in every arm", text, re.M), text
    assert re.search(r"^python .+ torch .+ accelerate .+ wandb .+ lightning ", text, re.M)
    for arm in ARMS:
        if arm == "e" and not HAS_LIGHTNING:
            assert re.search(r"^e\s+Lightning.*skipped: Lightning is not installed", text, re.M), text
            continue
        assert re.search(rf"^{arm}\s+\S.*\s{NUMBER}\s+{NUMBER}\s", text, re.M), f"no table row for arm {arm}:\n{text}"
    for ratio in RATIOS:
        if "e" in ratio.split("/") and not HAS_LIGHTNING:
            assert re.search(rf"^{re.escape(ratio)}\s+n/a.*skipped: Lightning is not installed", text, re.M), text
            continue
        assert re.search(rf"^{re.escape(ratio)}\s+{NUMBER}\s", text, re.M), f"no ratio line {ratio}:\n{text}"
    for ratio in GOAL_RATIOS_TINY:
        if "e" in ratio.split("/") and not HAS_LIGHTNING:
            continue
        assert re.search(rf"^{re.escape(ratio)}\s.*\s(PASS|MISS)\s", text, re.M), f"no verdict for {ratio}:\n{text}"


def test_overhead_quick_prints_checkpoint_and_tracker_lines(outputs):
    rc, text = outputs["overhead"]
    assert rc == 0, text[-3000:]
    for kind in ("none", "tensorboard", "wandb", "both"):
        assert re.search(rf"^trackers {kind}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}", text, re.M), (
            f"no tracker line {kind}:\n{text}"
        )
    assert re.search(rf"^checkpoint save: save_best, what training waits for\s+{NUMBER} ms", text, re.M), text
    assert re.search(rf"^checkpoint save: save_best until durable\s+{NUMBER} ms", text, re.M), text
    assert re.search(rf"^checkpoint save: save_file \+ fsync\s+{NUMBER} ms", text, re.M), text
    assert re.search(rf"^checkpoint ratio durable/save_file\s+{NUMBER}", text, re.M), text
    assert re.search(rf"^checkpoint ratio save_best/save_file {NUMBER}\s+goal <= 1.1\s+(PASS|MISS)", text, re.M), text


def test_overhead_json_holds_every_run(outputs):
    raw = outputs["raw"]
    assert raw is not None, outputs["overhead"][1][-3000:]
    arms = {r["arm"] for r in raw["runs"]}
    assert arms == set(ARMS if HAS_LIGHTNING else ARMS[:-1])
    for r in raw["runs"]:
        assert len(r["epoch_times"]) == 2 and all(t > 0 for t in r["epoch_times"]), r
    assert {t["kind"] for t in raw["trackers"]} == {"none", "tensorboard", "wandb", "both"}
    assert raw["failures"] == []


def test_throughput_quick_cpu_fp32(outputs):
    rc, text = outputs["throughput"]
    assert rc == 0, text[-3000:]
    assert "torch sees CUDA:" in text
    for workload in ("cnn", "tiny"):
        assert re.search(rf"^{workload}\s+fp32\s+off\s+off\s+[\d,]+\s+{NUMBER}", text, re.M), (
            f"no row for {workload}:\n{text}"
        )
    assert "ERROR" not in text
    assert outputs["table"].strip().splitlines()[-1].startswith("wall time"), outputs["table"]


def test_overhead_lockstep_compares_cpu_seconds(outputs):
    rc, text = outputs["lockstep"]
    assert rc == 0, text[-3000:]
    assert re.search(r"^arm\s+what\s+CPU s/ep", text, re.M), text
    assert re.search(rf"^b/a_acc\s+{NUMBER}\s.*\s(PASS|MISS)\s", text, re.M), text
    raw = outputs["lockstep_raw"]
    assert raw["settings"]["schedule"] == "lockstep" and raw["settings"]["clock"] == "epoch_cpu_times"
    for r in raw["runs"]:
        # Both clocks are reported; a stopped worker's wall time runs on while its CPU time does not.
        assert len(r["epoch_cpu_times"]) == 2 and all(t > 0 for t in r["epoch_cpu_times"]), r
        assert len(r["epoch_times"]) == 2
