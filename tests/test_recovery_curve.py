"""benchmarks/recovery_curve.py: the curve table reads recovery.py's results as they are."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("recovery_curve", ROOT / "benchmarks" / "recovery_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(path: Path, partial: bool = False, recipe: dict | None = None, distilled=(0.88, 0.86),
         labels: bool = False) -> Path:
    def row(label, acc, worst):
        return {"K": 8, "recovery": label, "accuracy": acc, "worst_accuracy": worst, "original_accuracy": 0.9,
                "runs": [{}, {}, {}]}
    rows = [row("cut", 0.1, 0.1), row("distil 4ep", distilled[0], distilled[0] - 0.01), row("refit", 0.6, 0.5),
            row("distil 2ep", distilled[1], distilled[1] - 0.01)]
    meta = {"task": "shapes", "recipe": recipe or {}, "labels": labels}
    path.write_text(json.dumps({"meta": meta, "rows": rows, "partial": partial}))
    return path


def test_curve_orders_epochs_and_gives_gaps_in_points(tmp_path):
    curve = _module()
    table = curve.rows([_run(tmp_path / "r.json")])
    assert [r["epochs"] for r in table] == [0, 2, 4]  # the uncut row is not a point of the curve
    text = curve.markdown(table)
    assert "| shapes | 8 | 4 | 88.00% | 87.00% | 90.00% | 2.00 | 3.00 |" in text
    assert "| shapes | 8 | refit | 60.00% |" in text


def test_curve_keeps_a_point_two_runs_share_once_and_refuses_a_disagreement(tmp_path):
    curve = _module()
    a, b = _run(tmp_path / "a.json"), _run(tmp_path / "b.json")
    assert [r["epochs"] for r in curve.rows([a, b])] == [0, 2, 4]
    data = json.loads(b.read_text())
    data["rows"][2]["accuracy"] = 0.61
    b.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="differs between a.json and b.json"):
        curve.rows([a, b])


def test_runs_of_other_recipes_are_rows_of_their_own(tmp_path):
    """The same points under another recipe are not a disagreement: they get a recipe
    column; the refit, which distils nothing, stays one row."""
    curve = _module()
    table = curve.rows([_run(tmp_path / "a.json"),
                        _run(tmp_path / "b.json", recipe={"views": 4, "lr": 0.01}, distilled=(0.9, 0.89))])
    assert [(r["epochs"], r["recipe"]) for r in table] == [(0, "default"), (2, "default"), (4, "default"),
                                                           (2, "--lr 0.01 --views 4"), (4, "--lr 0.01 --views 4")]
    text = curve.markdown(table)
    assert "| shapes | 8 |  | refit | 60.00% |" in text
    assert "| shapes | 8 | --lr 0.01 --views 4 | 2 | 89.00% | 88.00% | 90.00% | 1.00 | 2.00 |" in text
    assert "| shapes | 8 | default | 2 | 86.00% |" in text
    assert "recipe" not in curve.markdown(curve.rows([tmp_path / "b.json"])).splitlines()[0]
    labelled = curve.rows([_run(tmp_path / "c.json", recipe={"views": 4}, labels=True)])
    assert [r["recipe"] for r in labelled] == ["default", "--views 4 --labels", "--views 4 --labels"]


def test_a_run_from_another_refit_level_has_a_refit_row_of_its_own(tmp_path):
    """``recovery.py --refit stats`` measures another refit: its epoch-0 row is a row of
    its own (not a disagreement with the least-squares one) and says which level it is."""
    curve = _module()
    stats = _run(tmp_path / "b.json", recipe={"views": 4, "refit": "stats"})
    data = json.loads(stats.read_text())
    data["rows"][2].update(accuracy=0.2, worst_accuracy=0.19)
    stats.write_text(json.dumps(data))
    table = curve.rows([_run(tmp_path / "a.json"), stats])
    assert [(r["epochs"], r["recipe"]) for r in table][:2] == [(0, "default"), (0, "--refit stats")]
    text = curve.markdown(table)
    assert "| shapes | 8 |  | refit | 60.00% |" in text
    assert "| shapes | 8 | --refit stats | refit | 20.00% | 19.00% |" in text
    assert "| shapes | 8 | --refit stats --views 4 | 2 | 86.00% |" in text


@pytest.mark.parametrize("text", [None, "not json", '{"rows": []}'])
def test_curve_refuses_what_is_not_a_results_file_in_one_line(tmp_path, text):
    path = tmp_path / "r.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit, match="r.json: not a results file of benchmarks/recovery.py"):
        _module().rows([path])


def test_curve_refuses_a_stopped_run(tmp_path):
    with pytest.raises(SystemExit, match="stopped"):
        _module().rows([_run(tmp_path / "r.json", partial=True)])
