import json
import re

import pytest

import eval_knn
import sample_data


@pytest.mark.slow
def test_short_demo_writes_its_summary_and_the_teacher_beats_random_weights(run_script, tmp_path):
    """One epoch instead of the demo's six: already above random weights (and the teacher's
    cooling follows --epochs: a 6-epoch temperature schedule would not fit a 1-epoch run)."""
    result = run_script("demo.py", "--data_dir", str(tmp_path / "data"),
                        "--output_dir", str(tmp_path / "out"), "--epochs", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "out" / "summary.json") as summary_file:
        summary = json.load(summary_file)
    assert sorted(summary) == ["figures", "knn_top1", "minutes"]
    assert sorted(summary["knn_top1"]) == ["dino", "pixels", "random"]
    assert summary["figures"] == [str(tmp_path / "out" / "attention.png"),
                                  str(tmp_path / "out" / "curves.png")]
    assert all((tmp_path / "out" / name).is_file() for name in ("attention.png", "curves.png"))
    assert 0 < summary["minutes"] < 30
    accuracies = summary["knn_top1"]
    assert accuracies["dino"] > accuracies["random"]
    pixels = eval_knn.bank_top1(eval_knn.pixel_feature_bank(sample_data.digits_train_val()))
    assert accuracies["pixels"] == pytest.approx(pixels)
    table = re.findall(r"^  (DINO teacher|random weights|raw pixels).* ([0-9.]+)%$",
                       result.stdout, re.MULTILINE)
    assert [name for name, _ in table] == ["DINO teacher", "random weights", "raw pixels"]
    assert float(table[0][1]) == pytest.approx(accuracies["dino"], abs=0.005)
    assert len(list((tmp_path / "data" / "val").glob("*/*.png"))) == 500
