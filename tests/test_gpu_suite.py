"""The GPU suite's CPU smoke mode (so the suite cannot rot) and the crop-sharpness benchmark."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_suite_smoke_mode_runs_every_task(tmp_path):
    output = tmp_path / "suite.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--smoke", "--output", str(output),
         "--work_dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["smoke"] and report["device"] == "cpu"
    assert list(report["tasks"]) == ["train", "train large batch", "e2e PIL",
                                     "e2e GPU augment + decode", "augmenter and decoders",
                                     "PIL loader"]
    for name, task in report["tasks"].items():
        assert "rows" in task, (name, task)
        assert task["rows"] and all(row["images_per_s"] > 0 for row in task["rows"]), name
    train = {row["item"]: row for row in report["tasks"]["train"]["rows"]}
    assert list(train) == [f"vit_tiny/16 b4 {config}" for config in
                           ("reference", "fp32", "fp32+packed", "fp32+skipdrop")]
    assert train["vit_tiny/16 b4 fp32"]["detail"].startswith("x ref ")
    e2e = report["tasks"]["e2e GPU augment + decode"]["rows"][0]["raw"]
    assert e2e["iterations"] == 12 and e2e["seconds_per_iter"] > 0  # 48 images, batches of 4
    assert "--gpu_decode true" in e2e["command"]
    assert "measurement" in result.stdout and "PIL loader, idle main process" in result.stdout


def test_crop_sharpness_benchmark_compares_canvas_crops_with_pil(tmp_path):
    output = tmp_path / "sharpness.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.crop_sharpness", "--photos", "chelsea",
         "--canvas_sizes", "128", "512", "--stretched_sizes", "512", "--crops", "3",
         "--output", str(output)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(output.read_text())["summary"]
    # The 451x300 photo fits a 512 canvas at its own size: as sharp as PIL's crops; shrunk to
    # 128 it is clearly softer, and stretched onto 512 it is resampled twice.
    assert summary["canvas 512"]["min"] > 0.99
    assert summary["canvas 128"]["mean"] < 0.8
    assert summary["stretched 512"]["mean"] < summary["canvas 512"]["mean"]
