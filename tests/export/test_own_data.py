"""Training on one's own data: a catalog in the documented CSV format, and the ratings recorded through
the service (the interaction store), including a new user who is then served from their own towers."""
import csv
import json

import pytest

from recsys.client import RecommenderClient
from recsys.export.__main__ import main as export_cli
from recsys.export.data import DataFormatError, load_csv
from recsys.server.app import create_server
from recsys.server.catalog import CatalogStore
from recsys.server.in_process import InProcessBackend
from recsys.server.layout import metadata_path
from recsys.server.options import ServerOptions
from recsys.server.store import open_store
from tests.conftest import STORE_READ_SECONDS, wait_for

# The tiny preset trained a few steps an epoch, where what is checked is which users and movies a
# version holds, not how well it ranks them.
SHORT_TINY = ["--preset", "tiny", "--set", "steps_per_epoch=5"]


def write_csv_catalog(movielens, directory):
    """The synthetic data set rewritten in the CSV format, titles with commas and quotes in them."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "ratings.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "item_id", "rating", "timestamp"])
        writer.writerows(movielens.ratings.tolist())
    with open(directory / "items.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item_id", "title", "genres"])
        for item_id, item in movielens.items.items():
            writer.writerow([item_id, f'{item.title}, "the cut"', "|".join(item.genres)])
    return directory / "ratings.csv", directory / "items.csv"


@pytest.mark.slow
def test_a_csv_catalog_trains_evaluates_and_serves_like_movielens(movielens, tmp_path, capsys):
    ratings, items = write_csv_catalog(movielens, tmp_path / "catalog")
    data = ["--dataset", "csv", "--ratings", str(ratings), "--items", str(items)]
    models = tmp_path / "models"
    assert export_cli(["train", *data, "--preset", "tiny", "--out", str(models)]) == 0
    assert export_cli(["evaluate", *data, "--models", str(models), "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["systems"]["two_stage"]["hr@10"] > metrics["systems"]["popularity"]["hr@10"]
    assert json.loads(metadata_path(models, 1).read_text())["dataset"] == "csv"
    backend = InProcessBackend(models)
    recommender, port = create_server("127.0.0.1:0", backend, models, ServerOptions(poll_seconds=0.3))
    recommender.start()
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_until_serving(60)
            served = client.recommend("42", k=5)
            assert len(served) == 5 and all(item.title.endswith(', "the cut"') and item.genres for item in served)
    finally:
        recommender.stop(0).wait()


@pytest.mark.parametrize("which, line, text, message", [
    ("ratings", 1, "user,item,rating,timestamp", "expected the header 'user_id,item_id,rating,timestamp'"),
    ("ratings", 3, "7,12,9,880000000", "rating 9 is not a multiple of 0.5 in (0, 5]"),
    ("ratings", 4, "7,12,4", "expected 4 fields"),
    ("ratings", 2, "7,12,4,soon", "invalid literal"),
    ("ratings", 2, "7,no-such-movie,4,880000000", "movie id 'no-such-movie' is not in the items file"),
    ("items", 3, "1,Title twice,Drama", "movie id '1' is listed twice"),
])
def test_a_malformed_csv_row_names_its_file_and_line(movielens, tmp_path, capsys, which, line, text, message):
    ratings, items = write_csv_catalog(movielens, tmp_path / "catalog")
    path = ratings if which == "ratings" else items
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=rf"{path}:{line}: .*{message}".replace("(", r"\(").replace(")", r"\)")):
        load_csv(ratings, items)
    assert export_cli(["train", "--dataset", "csv", "--ratings", str(ratings), "--items", str(items),
                       "--preset", "tiny", "--out", str(tmp_path / "m")]) == 2
    assert f"{path}:{line}" in capsys.readouterr().err


def test_csv_needs_both_files(tmp_path):
    with pytest.raises(SystemExit):
        export_cli(["train", "--dataset", "csv", "--ratings", str(tmp_path / "r.csv"), "--out", str(tmp_path)])


@pytest.mark.slow
def test_a_new_user_records_ratings_then_the_next_version_knows_them(data_dir, models_dir, tmp_path, heaviest_user,
                                                                    split, capsys):
    """Record 10 ratings for a new user: a personalised list at once; train with the store: the next
    version knows them. Forget them: served as an unknown id at once, and the version after leaves
    them out."""
    models = tmp_path / "models"
    for name in ("retrieval", "ranking", "metadata"):
        (models / name).mkdir(parents=True)
    location = str(tmp_path / "interactions.sqlite3")
    store = open_store(location)
    backend = InProcessBackend(models)
    recommender, port = create_server("127.0.0.1:0", backend, models,
                                      ServerOptions(poll_seconds=0.3, store_read_seconds=STORE_READ_SECONDS), store)
    recommender.start()
    try:
        assert export_cli(["train", "--data-dir", str(data_dir), *SHORT_TINY, "--out", str(models)]) == 0
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_until_serving(60)
            rows = split[0][split[0][:, 0] == int(heaviest_user)][:10]
            ratings = [(str(item), float(stars)) for _, item, stars, _ in rows.tolist()]
            assert all(item.fallback for item in client.recommend("new-user"))
            assert client.record_interactions("new-user", ratings + [("no-such-movie", 3.0), ("5", 0.0)]) == 12
            # A rating the data set holds already (in its test split): never trained on.
            client.record_interactions("42", [(str(split[1][split[1][:, 0] == 42][0, 1]), 5.0)])
            assert not any(item.fallback for item in client.recommend("new-user"))
            capsys.readouterr()
            assert export_cli(["train", "--data-dir", str(data_dir), *SHORT_TINY, "--out", str(models),
                               "--interactions-db", location]) == 0
            assert "10 stored ratings added (1 users new to the data set); skipped: 1 of movies outside the " \
                   "catalog, 1 without a rating, 1 already in the data set" in capsys.readouterr().out
            wait_for(lambda: client.model_info().model_version == "2", 60, "version 2")
            catalog = CatalogStore(models).get("2")
            assert catalog.is_known_user("new-user")
            assert sorted(backend.rated_items(["new-user"], "2")[0]) == sorted(item for item, _ in ratings)
            items = client.recommend("new-user")
            assert not {item for item, _ in ratings} & {item.item_id for item in items}
            assert client.forget_user("new-user") == 12
            erased = client.recommend("new-user")
            assert all(item.fallback for item in erased), "erased: served as an unknown id at once"
            assert export_cli(["train", "--data-dir", str(data_dir), *SHORT_TINY, "--out", str(models),
                               "--interactions-db", location]) == 0
            wait_for(lambda: client.model_info().model_version == "3", 60, "version 3")
            assert not CatalogStore(models).get("3").is_known_user("new-user"), "the next version leaves them out"
    finally:
        recommender.stop(0).wait()
        store.close()
