"""Offline evaluation on the real data, through the serving pipeline."""
import json

from export.__main__ import main as export_main
from export.evaluate import popularity_lists, ranking_metrics, held_out_by_user


def test_popularity_baseline_is_in_its_known_range(split):
    train, test = split
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


def test_evaluate_reports_every_system(evaluation):
    for system in ("popularity", "retrieval", "two_stage"):
        assert set(evaluation[system]) == {"hr@10", "hr@100", "ndcg@10"}
        assert all(0.0 <= value <= 1.0 for value in evaluation[system].values())
    assert 0.5 < evaluation["ranking"]["rmse"] < 1.2
    assert evaluation["model_version"] == "1"


def test_evaluate_cli_writes_json(models_dir, data_dir, tmp_path, capsys, evaluation):
    out = tmp_path / "metrics.json"
    assert export_main(["evaluate", "--models", str(models_dir), "--data-dir", str(data_dir), "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["two_stage"] == evaluation["two_stage"]
    assert "two_stage" in capsys.readouterr().out
