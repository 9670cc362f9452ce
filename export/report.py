"""The README's results table: train each preset, evaluate it with the baselines, one table."""
from __future__ import annotations

import time
from pathlib import Path

from export.data import MovieLens
from export.evaluate import evaluate_export, write_plot
from export.presets import PRESETS
from export.train import train_and_export


def run_report(data: MovieLens, presets: list[str], out_dir: Path, plot: Path | None) -> str:
    """Train `presets` into out_dir/<preset>, evaluate each on the test split, return a Markdown table."""
    results = {}
    for name in presets:
        started = time.perf_counter()
        train_and_export(data, PRESETS[name], out_dir / name)
        seconds = time.perf_counter() - started
        results[name] = (evaluate_export(out_dir / name, data), seconds)
    first = next(iter(results.values()))[0]
    rows = [("popularity", first["popularity"], None, None), (f"EASE (lambda {first['ease']['lambda']:g})",
                                                             first["ease"], None, None)]
    for name, (metrics, seconds) in results.items():
        rows.append((f"`{name}` preset, two-stage", metrics["two_stage"], metrics["ranking"]["rmse"], seconds))
        rows.append((f"`{name}` preset, retrieval only", metrics["retrieval"], None, None))
    lines = ["| system | HR@10 | HR@100 | NDCG@10 | ranker RMSE | train + export |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, row, rmse, seconds in rows:
        lines.append(f"| {label} | {row['hr@10']:.4f} | {row['hr@100']:.4f} | {row['ndcg@10']:.4f} | "
                     f"{'' if rmse is None else f'{rmse:.4f}'} | {'' if seconds is None else f'{seconds:.0f} s'} |")
    if plot:
        curves = {"popularity": first["hr_curve"]["popularity"], "EASE": first["hr_curve"]["ease"]}
        for name, (metrics, _) in results.items():
            curves[f"{name} two-stage"] = metrics["hr_curve"]["two_stage"]
            curves[f"{name} retrieval"] = metrics["hr_curve"]["retrieval"]
        write_plot(curves, plot, "MovieLens 100k, test split (rated movies excluded)")
    return "\n".join(lines)
