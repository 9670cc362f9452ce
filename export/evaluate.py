"""Hit rate and NDCG on the fixed test split, scored through the server's own pipeline.

HR@k: fraction of test (user, movie) pairs whose movie is in that user's top-k list.
NDCG@10: per user, DCG of the test movies in the top 10 over the ideal DCG, averaged
over users with test movies. Every list excludes the movies the user rated in train.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from export.baselines import ease_lists
from export.data import MovieLens, fit_and_held_out, popularity_order
from server.backend import Backend, InProcessBackend
from server.catalog import CatalogStore
from server.errors import ModelsUnavailable
from server.layout import metadata_path
from server.limits import MAX_BATCH_USERS
from server.pipeline import Pipeline, Query

LIST_LENGTH = 100


SYSTEMS = ("popularity", "ease", "retrieval", "two_stage")


def hit_rate_curve(lists: dict[str, list[str]], held_out: dict[str, set[str]]) -> list[float]:
    """HR@k for k = 1..LIST_LENGTH."""
    hits_at = np.zeros(LIST_LENGTH)
    pairs = 0
    for user, movies in held_out.items():
        pairs += len(movies)
        for position, item in enumerate(lists.get(user, [])[:LIST_LENGTH]):
            if item in movies:
                hits_at[position] += 1
    return (np.cumsum(hits_at) / pairs).tolist()


def ranking_metrics(lists: dict[str, list[str]], held_out: dict[str, set[str]]) -> dict[str, float]:
    curve = hit_rate_curve(lists, held_out)
    ndcgs = []
    for user, movies in held_out.items():
        ranked = lists.get(user, [])
        dcg = sum(1.0 / np.log2(position + 2) for position, item in enumerate(ranked[:10]) if item in movies)
        ideal = sum(1.0 / np.log2(position + 2) for position in range(min(len(movies), 10)))
        ndcgs.append(dcg / ideal)
    return {"hr@10": curve[9], "hr@100": curve[99], "ndcg@10": float(np.mean(ndcgs))}


def popularity_lists(train: np.ndarray, users: list[str]) -> dict[str, list[str]]:
    """Each user's most popular unseen movies, in the served fallback's order (`popularity_order`)."""
    items, counts = np.unique(train[:, 1].astype(str), return_counts=True)
    popular = popularity_order(items.tolist(), dict(zip(items.tolist(), counts.tolist())))
    rated = defaultdict(set)
    for user, item in train[:, :2].astype(str).tolist():
        rated[user].add(item)
    return {user: [item for item in popular if item not in rated[user]][:LIST_LENGTH] for user in users}


def held_out_by_user(test: np.ndarray) -> dict[str, set[str]]:
    held_out = defaultdict(set)
    for user, item in test[:, :2].tolist():
        held_out[str(user)].add(str(item))
    return dict(held_out)


def two_stage_lists(pipeline: Pipeline, users: list[str], k: int = LIST_LENGTH) -> dict[str, list[str]]:
    """The served lists: the pipeline the server runs, default request options."""
    lists = {}
    for start in range(0, len(users), MAX_BATCH_USERS):
        batch = users[start:start + MAX_BATCH_USERS]
        for user, items in zip(batch, pipeline.recommend([Query(user, k=k) for user in batch])):
            lists[user] = [item.item_id for item in items]
    return lists


def evaluate_backend(backend: Backend, catalogs: CatalogStore, data: MovieLens, holdout: str = "test") -> dict:
    train, test = fit_and_held_out(data.ratings, holdout)
    held_out = held_out_by_user(test)
    users = sorted(held_out, key=int)
    retrieval_lists = {}
    model_version = ""
    for start in range(0, len(users), MAX_BATCH_USERS):
        batch = users[start:start + MAX_BATCH_USERS]
        candidates = backend.retrieve(batch, include_rated=False)
        model_version = candidates.model_version
        for user, row in zip(batch, candidates.item_ids):
            retrieval_lists[user] = row[:LIST_LENGTH].tolist()
    served_lists = two_stage_lists(Pipeline(backend, catalogs), users)
    test_users = test[:, 0].astype(str).tolist()
    test_items = test[:, 1].astype(str).tolist()
    predicted = backend.rank(test_users, test_items, model_version).predicted_rating
    rmse = float(np.sqrt(np.mean((predicted - data.stars(test)) ** 2)))
    lists = {"popularity": popularity_lists(train, users), "retrieval": retrieval_lists, "two_stage": served_lists}
    ease = ease_lists(data, holdout, users, LIST_LENGTH)
    if ease is not None:
        lists["ease"] = ease[0]
    metrics = {system: ranking_metrics(lists[system], held_out) for system in SYSTEMS if system in lists}
    if ease is not None:
        metrics["ease"]["lambda"] = ease[1]
    return {
        "model_version": model_version,
        "holdout": holdout,
        **metrics,
        "ranking": {"rmse": rmse},
        "hr_curve": {system: hit_rate_curve(lists[system], held_out) for system in SYSTEMS if system in lists},
    }


def evaluate_export(models_dir: Path, data: MovieLens) -> dict:
    """Metrics of the newest complete version in models_dir, with the baselines."""
    backend, catalogs = InProcessBackend(models_dir), CatalogStore(models_dir)
    if not backend.refresh(catalogs.get):
        raise ModelsUnavailable(f"no loadable model version in {models_dir}")
    version = backend.current_version()
    metadata = json.loads(metadata_path(models_dir, int(version)).read_text())
    if metadata.get("dataset", "ml-100k") != data.dataset:
        raise ModelsUnavailable(f"model version {version} was trained on {metadata['dataset']}, not {data.dataset}; "
                                f"pass --dataset {metadata['dataset']}")
    # A version trained for tuning is scored on the validation split, never on test.
    metrics = evaluate_backend(backend, catalogs, data, metadata.get("holdout", "test"))
    metrics["preset"] = metadata["preset"]["name"]
    metrics["train_seconds"] = metadata.get("train_seconds", {})
    return metrics


def format_table(metrics: dict) -> str:
    lines = [f"model version {metrics['model_version']} (preset {metrics.get('preset', '?')}), "
             f"{metrics['holdout']} split, movies rated in training excluded",
             f"{'system':<12} {'HR@10':>7} {'HR@100':>7} {'NDCG@10':>8} {'RMSE':>7}"]
    for system in (system for system in SYSTEMS if system in metrics):
        row = metrics[system]
        rmse = f"{metrics['ranking']['rmse']:.4f}" if system == "two_stage" else "-"
        lines.append(f"{system:<12} {row['hr@10']:>7.4f} {row['hr@100']:>7.4f} {row['ndcg@10']:>8.4f} {rmse:>7}")
    return "\n".join(lines)


def write_json(metrics: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")


def write_plot(curves: dict[str, list[float]], path: Path, title: str) -> None:
    """HR@k for k = 1..100, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    ks = np.arange(1, LIST_LENGTH + 1)
    for label, curve in curves.items():
        axes.plot(ks, curve, label=label)
    axes.set_xlabel("k (list length)")
    axes.set_ylabel("HR@k (held-out movies found)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
