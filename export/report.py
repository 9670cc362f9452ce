"""The README's results tables: train each preset, evaluate it with the baselines under every protocol."""
from __future__ import annotations

import time
from pathlib import Path

from recsys.export.data import MovieLens
from recsys.export.evaluate import LABELS, evaluate_export, system_label, write_plot
from recsys.export.presets import PRESETS
from recsys.export.train import train_and_export

HEADER = ["| system | HR@10 | HR@100 | NDCG@10 | ranker RMSE | train + export |", "|---|---:|---:|---:|---:|---:|"]


def _row(label: str, row: dict, rmse: float | None = None, seconds: float | None = None, error: bool = False) -> str:
    cells = [f"{row[key]:.4f} ± {row[key + '_se']:.4f}" if error else f"{row[key]:.4f}"
             for key in ("hr@10", "hr@100", "ndcg@10")]
    return (f"| {label} | {' | '.join(cells)} | {'' if rmse is None else f'{rmse:.4f}'} | "
            f"{'' if seconds is None else f'{seconds:.0f} s'} |")


def _trained(data: MovieLens, name: str, out_dir: Path, holdout: str = "test") -> float:
    started = time.perf_counter()
    train_and_export(data, PRESETS[name], out_dir, holdout)
    return time.perf_counter() - started


def run_report(data: MovieLens, presets: list[str], out_dir: Path, plot: Path | None) -> str:
    """Train `presets` into out_dir/<preset> (random split) and the default preset into
    out_dir/default-users (users held out); return the Markdown tables of the three protocols."""
    results = {}
    for name in presets:
        seconds = _trained(data, name, out_dir / name)
        results[name] = (evaluate_export(out_dir / name, data, "random"), seconds)
    first = next(iter(results.values()))[0]["systems"]
    lines = ["Random split (test rows):", "", *HEADER, _row("popularity", first["popularity"]),
             _row(system_label("ease", first["ease"]), first["ease"]), _row(system_label("als", first["als"]), first["als"])]
    for name, (metrics, seconds) in results.items():
        lines.append(_row(f"`{name}` preset, two-stage", metrics["systems"]["two_stage"], metrics["ranking"]["rmse"],
                          seconds))
        lines.append(_row(f"`{name}` preset, retrieval only", metrics["systems"]["retrieval"]))
    if "default" in results:
        metrics = results["default"][0]
        similar, reasons = metrics["similar_items"], metrics["reasons"]
        lines += ["", "SimilarItems (`default` preset) against item-kNN:", "",
                  "| system | item-to-item HR@10 | genre overlap of the 10 nearest |", "|---|---:|---:|",
                  f"| served | {similar['served']['hr@10']:.4f} ± {similar['served']['hr@10_se']:.4f} | "
                  f"{similar['served']['genre_overlap']:.3f} |",
                  f"| item-kNN | {similar['item_knn']['hr@10']:.4f} ± {similar['item_knn']['hr@10_se']:.4f} | "
                  f"{similar['item_knn']['genre_overlap']:.3f} |",
                  f"| random pairs | | {similar['random_pairs_genre_overlap']:.3f} |",
                  "", f"Reasons: the first reason was rated 4+ by the user for {reasons['first_reason_rated_4_or_more']:.1%} "
                  f"of the recommendations (any movie of theirs: {reasons['any_history_movie_rated_4_or_more']:.1%}); "
                  f"{reasons['items_with_a_reason']:.1%} of model items have a reason."]
        recent = evaluate_export(out_dir / "default", data, "recent")
        lines += ["", f"Recent interactions ({recent['users']} test users, {recent['pairs']} target pairs):", "",
                  *HEADER[:1], HEADER[1]]
        for system in ("two_stage_without_interactions", "two_stage_excluding_them", "two_stage"):
            lines.append(_row(f"`default` preset, {LABELS.get(system, system).replace('two_stage', 'two-stage')}",
                              recent["systems"][system], error=True))
        for name, label in (("vs_without", "without them"), ("vs_excluding", "with them only excluded")):
            difference = recent["difference"][name]
            lines.append(f"\nHR@10 with interactions minus {label}: {difference['hr@10']:+.4f} "
                         f"± {difference['hr@10_se']:.4f}")
        seconds = _trained(data, "default", out_dir / "default-users", "users")
        fold_in = evaluate_export(out_dir / "default-users", data, "fold-in")
        systems = fold_in["systems"]
        lines += ["", f"Fold-in ({fold_in['users']} users held out of training, {fold_in['pairs']} target pairs):", "",
                  *HEADER, _row("popularity", systems["popularity"], error=True),
                  _row(f"{system_label('ease', systems['ease'])} folded in", systems["ease"], error=True),
                  _row(f"{system_label('als', systems['als'])} folded in", systems["als"], error=True),
                  _row("`default` preset, two-stage", systems["two_stage"], fold_in["ranking"]["rmse"], seconds,
                       error=True),
                  _row("`default` preset, retrieval only", systems["retrieval"], error=True)]
    if plot:
        curves = {"popularity": results[presets[0]][0]["hr_curve"]["popularity"],
                  "EASE": results[presets[0]][0]["hr_curve"]["ease"]}
        for name, (metrics, _) in results.items():
            curves[f"{name} two-stage"] = metrics["hr_curve"]["two_stage"]
            curves[f"{name} retrieval"] = metrics["hr_curve"]["retrieval"]
        write_plot(curves, plot, "MovieLens 100k, test split (rated movies excluded)")
    return "\n".join(lines)

