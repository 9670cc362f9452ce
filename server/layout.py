"""The models directory layout, shared by the exporter (writes it) and the server (reads it)."""
from __future__ import annotations

from pathlib import Path

RETRIEVAL_MODEL = "retrieval"
RANKING_MODEL = "ranking"
METADATA_DIR = "metadata"
DEFAULT_SIGNATURE = "serving_default"
INCLUDE_RATED_SIGNATURE = "include_rated"
WARMUP_FILE = "tf_serving_warmup_requests"
# The signatures' inputs (export/serving.py): every signature takes the user side; ranking also
# takes each user's candidate movies.
USER_ID_INPUT = "user_id"
INTERACTION_ITEMS_INPUT = "interaction_item_ids"
INTERACTION_RATINGS_INPUT = "interaction_ratings"
ITEM_IDS_INPUT = "item_ids"
ITEM_ID_INPUT = "item_id"  # similar_items: the movie to find neighbours of
SIMILAR_ITEMS_SIGNATURE = "similar_items"  # retrieval model
RATED_ITEMS_SIGNATURE = "rated_items"  # retrieval model: each user's training history, from user_id alone
EXPLAIN_SIGNATURE = "explain"  # ranking model: because_item_ids for given movies


def model_versions(model_dir: Path) -> list[int]:
    """Integer version directories that hold a SavedModel, oldest first."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.name.isdigit() and (p / "saved_model.pb").is_file())


def metadata_path(models_dir: Path, version: int) -> Path:
    return models_dir / METADATA_DIR / f"{version}.json"


def complete_versions(models_dir: Path) -> list[int]:
    """Versions for which retrieval, ranking and metadata all exist, oldest first."""
    ranking = set(model_versions(models_dir / RANKING_MODEL))
    return [v for v in model_versions(models_dir / RETRIEVAL_MODEL)
            if v in ranking and metadata_path(models_dir, v).is_file()]
