"""Per-version metadata: titles, genres, popularity and who rated what."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from server.errors import ModelsUnavailable
from server.layout import metadata_path


@dataclass(frozen=True)
class Catalog:
    model_version: str
    candidate_count: int
    titles: dict[str, str]
    genres: dict[str, tuple[str, ...]]
    popular_item_ids: tuple[str, ...]
    rated_item_ids: dict[str, frozenset[str]]
    preset: dict

    def is_known_user(self, user_id: str) -> bool:
        return user_id in self.rated_item_ids


def load_catalog(models_dir: Path, version: int) -> Catalog:
    raw = json.loads(metadata_path(models_dir, version).read_text())
    return Catalog(
        model_version=str(raw["model_version"]),
        candidate_count=int(raw["candidate_count"]),
        titles={item_id: item["title"] for item_id, item in raw["items"].items()},
        genres={item_id: tuple(item["genres"]) for item_id, item in raw["items"].items()},
        popular_item_ids=tuple(raw["popular_item_ids"]),
        rated_item_ids={user: frozenset(items) for user, items in raw["rated_item_ids"].items()},
        preset=raw.get("preset", {}),
    )


class CatalogStore:
    """Loads each version's metadata once; the backend says which version answered."""

    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)
        self._catalogs: dict[str, Catalog] = {}
        self._lock = threading.Lock()

    def get(self, model_version: str) -> Catalog:
        catalog = self._catalogs.get(model_version)
        if catalog is not None:
            return catalog
        with self._lock:
            if model_version not in self._catalogs:
                try:
                    self._catalogs[model_version] = load_catalog(self.models_dir, int(model_version))
                except (OSError, ValueError, KeyError) as error:
                    raise ModelsUnavailable(
                        f"no metadata for model version {model_version} in {self.models_dir}: {error}") from error
            return self._catalogs[model_version]
