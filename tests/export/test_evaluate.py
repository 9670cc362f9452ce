"""Offline evaluation on the real data, through the serving pipeline."""
import json

import pytest

from export.__main__ import main as export_main
from export.evaluate import held_out_by_user, popularity_lists, ranking_metrics


def test_popularity_baseline_is_in_its_known_range(ml100k_split):
    train, test = ml100k_split
    held_out = held_out_by_user(test)
    metrics = ranking_metrics(popularity_lists(train, list(held_out)), held_out)
    assert 0.085 <= metrics["hr@10"] <= 0.095
    assert 0.40 <= metrics["hr@100"] <= 0.42


def test_ranking_metrics_on_a_hand_made_case():
    lists = {"a": ["1", "2", "3"], "b": ["9", "8"]}
    held_out = {"a": {"2", "7"}, "b": {"9"}}
    metrics = ranking_metrics(lists, held_out)
    assert metrics["hr@10"] == 2 / 3
    ndcg_a = (1 / 1.5849625007211563) / (1 + 1 / 1.5849625007211563)
    assert abs(metrics["ndcg@10"] - (ndcg_a + 1.0) / 2) < 1e-9


@pytest.mark.slow
def test_evaluate_reports_every_system(ml100k_evaluation):
    evaluation = ml100k_evaluation
    for system in ("popularity", "ease", "retrieval", "two_stage"):
        assert {"hr@10", "hr@100", "ndcg@10"} <= set(evaluation[system])
        assert all(0.0 <= evaluation[system][key] <= 1.0 for key in ("hr@10", "hr@100", "ndcg@10"))
        curve = evaluation["hr_curve"][system]
        assert len(curve) == 100 and curve == sorted(curve)
        assert curve[9] == evaluation[system]["hr@10"] and curve[99] == evaluation[system]["hr@100"]
    assert evaluation["model_version"] == "1" and evaluation["holdout"] == "test"
    assert evaluation["ease"]["lambda"] in (50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)
    assert 0.16 <= evaluation["ease"]["hr@10"] <= 0.18


@pytest.mark.slow
def test_default_preset_quality_floor(ml100k_evaluation):
    """Regression guard on the real data: see the README's results table for the measured values."""
    evaluation = ml100k_evaluation
    assert evaluation["two_stage"]["hr@10"] >= 0.17
    assert evaluation["two_stage"]["hr@10"] >= evaluation["popularity"]["hr@10"] + 0.06
    assert evaluation["retrieval"]["hr@100"] >= 0.62
    assert evaluation["ranking"]["rmse"] <= 0.91


@pytest.mark.slow
def test_evaluate_cli_writes_json_and_plot(ml100k_models_dir, ml100k_dir, tmp_path, capsys, ml100k_evaluation):
    models_dir, data_dir, evaluation = ml100k_models_dir, ml100k_dir, ml100k_evaluation
    out, plot = tmp_path / "metrics.json", tmp_path / "hr.png"
    assert export_main(["evaluate", "--models", str(models_dir), "--data-dir", str(data_dir), "--json", str(out),
                        "--plot", str(plot)]) == 0
    written = json.loads(out.read_text())
    assert written["two_stage"] == evaluation["two_stage"]
    assert {"popularity", "retrieval", "two_stage", "ranking"} <= set(written)
    assert set(written["ranking"]) == {"rmse"}
    assert "two_stage" in capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_without_models_is_a_clear_error(tmp_path, data_dir, capsys):
    assert export_main(["evaluate", "--models", str(tmp_path), "--data-dir", str(data_dir)]) == 2
    assert "no loadable model version" in capsys.readouterr().err
