"""eval.sequences against worked examples computed by hand from the papers' definitions."""
import json

import pytest

from eval.sequences import main, sequence_metrics

# R[i][j]: score on task j after stage i.  Task 0 improves after stage 1 (positive backward
# transfer) and then falls back, so BWT and Chaudhry forgetting disagree in sign.
R = [[0.5, 0.0, 0.0],
     [0.9, 0.6, 0.1],
     [0.7, 0.65, 0.8]]


def test_worked_example_positive_transfer():
    m = sequence_metrics(R, b=[0.1, 0.05, 0.05])
    # ACC = (0.7 + 0.65 + 0.8) / 3
    assert m.average_accuracy == pytest.approx(2.15 / 3)
    # BWT (Lopez-Paz & Ranzato): ((0.7 - 0.5) + (0.65 - 0.6)) / 2 = 0.125
    assert m.backward_transfer == pytest.approx(0.125)
    # FWT: ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0 - 0.05) + (0.1 - 0.05)) / 2 = 0
    assert m.forward_transfer == pytest.approx(0.0)
    # Chaudhry: f_0 = max(0.5, 0.9) - 0.7 = 0.2, f_1 = max(0.0, 0.6) - 0.65 = -0.05
    assert m.forgetting_per_task == pytest.approx([0.2, -0.05])
    assert m.forgetting == pytest.approx(0.075)
    # after stage 1 only task 0 counts: 0.5 - 0.9 = -0.4
    assert m.forgetting_by_stage[0] is None
    assert m.forgetting_by_stage[1] == pytest.approx(-0.4)
    assert m.forgetting_by_stage[2] == pytest.approx(0.075)


def test_worked_example_plain_forgetting_in_points():
    # Each new task erases part of the old ones; here -BWT equals the forgetting.
    R2 = [[90, 10, 20, 5],
          [60, 80, 30, 5],
          [50, 70, 95, 10],
          [40, 40, 70, 85]]
    m = sequence_metrics(R2)
    assert m.average_accuracy == pytest.approx((40 + 40 + 70 + 85) / 4)
    assert m.backward_transfer == pytest.approx(((40 - 90) + (40 - 80) + (70 - 95)) / 3)
    assert m.forgetting_per_task == pytest.approx([90 - 40, 80 - 40, 95 - 70])
    assert m.forgetting == pytest.approx((50 + 40 + 25) / 3)
    assert m.forgetting_by_stage[2] == pytest.approx(((90 - 50) + (80 - 70)) / 2)
    assert m.forward_transfer is None


def test_single_task_and_bad_shapes():
    m = sequence_metrics([[0.7]])
    assert m.average_accuracy == pytest.approx(0.7)
    assert m.backward_transfer is None and m.forgetting is None and m.forgetting_per_task == []
    with pytest.raises(ValueError, match="row 1"):
        sequence_metrics([[1, 2], [3]])
    with pytest.raises(ValueError, match=r"R\[0\]\[1\]"):
        sequence_metrics([[1, "x"], [3, 4]])
    with pytest.raises(ValueError, match="one score per task"):
        sequence_metrics([[1, 2], [3, 4]], b=[1])


def test_cli_prints_json_fields(tmp_path, capsys):
    path = tmp_path / "R.json"
    path.write_text(json.dumps({"R": R}))
    assert main([str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"average_accuracy", "backward_transfer", "forgetting", "forgetting_per_task"}
    assert out["backward_transfer"] == pytest.approx(0.125)
    path.write_text("[[1, 2], [3]]")
    assert main([str(path)]) == 2
