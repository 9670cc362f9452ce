"""ML-1M, ML-20M and ML-25M parsers, on small files written here in the exact formats
(the real archives cannot be downloaded on the build machines)."""
import json

import numpy as np
import pytest
import tensorflow as tf

from recsys.export.__main__ import main as export_cli
from recsys.export.data import DataFormatError, fit_and_held_out, load_movielens, split_row_numbers
from recsys.export.examples import from_rows, from_stream
from recsys.server.layout import complete_versions, metadata_path
from tests.export.test_savedmodel import user_side

ML1M = {
    "ratings.dat": "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n2::3408::1::978300275\n",
    "movies.dat": "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                  "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n3408::Erin Brockovich (2000)::Drama\n",
    "users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n",
}
ML_CSV = {
    "ratings.csv": "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,4.0,1112484676\n2,2,0.5,974820889\n",
    "movies.csv": 'movieId,title,genres\n2,Jumanji (1995),Adventure|Children|Fantasy\n'
                  '29,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Adventure|Drama\n'
                  '131262,Innocence (2014),(no genres listed)\n',
}


def _write(directory, files, encoding="utf-8"):
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text, encoding=encoding)
    return directory


def test_ml1m(tmp_path):
    data = load_movielens(_write(tmp_path / "ml-1m", ML1M, "latin-1"), "ml-1m")
    np.testing.assert_array_equal(data.ratings[0], [1, 1193, 5, 978300760])
    assert data.rating_scale == 1.0 and data.stars(data.ratings).tolist() == [5, 3, 4, 1]
    assert data.items["661"].genres == ("Animation", "Children's", "Musical")
    assert data.users["2"].age == 56 and data.users["2"].gender == "M"


@pytest.mark.parametrize("dataset", ["ml-20m", "ml-25m"])
def test_ml20m_and_ml25m_half_stars_and_quoted_titles(tmp_path, dataset):
    data = load_movielens(_write(tmp_path / dataset, ML_CSV), dataset)
    assert data.stars(data.ratings).tolist() == [3.5, 4.0, 0.5]
    assert data.ratings.dtype == np.int64
    assert data.items["29"].title == "City of Lost Children, The (Cité des enfants perdus, La) (1995)"
    assert data.items["131262"].genres == ()
    train, test = fit_and_held_out(data.ratings, "test")
    assert len(train) == 2 and len(test) == 1


def test_malformed_larger_files_name_file_and_line(tmp_path):
    bad = dict(ML_CSV, **{"ratings.csv": "userId,movieId,rating,timestamp\n1,2,3.5,1\n1,29,3.3,2\n"})
    with pytest.raises(DataFormatError, match=r"ratings\.csv:3: rating 3\.3"):
        load_movielens(_write(tmp_path / "a", bad), "ml-20m")
    bad = dict(ML1M, **{"ratings.dat": "1::1193::5::978300760\n1::661::5\n"})
    with pytest.raises(DataFormatError, match=r"ratings\.dat:2: expected 4"):
        load_movielens(_write(tmp_path / "b", bad, "latin-1"), "ml-1m")
    bad = dict(ML_CSV, **{"movies.csv": "id,title,genres\n"})
    with pytest.raises(DataFormatError, match=r"movies\.csv:1: expected the header"):
        load_movielens(_write(tmp_path / "c", bad), "ml-25m")


# Streaming: the large sets are trained from the file through tf.data, never loaded whole.

def test_streamed_fit_rows_are_the_in_memory_split(ml100k_dir):
    """Same split, same users, same rated movies (with their stars) and counts, whichever way the rows are read."""
    in_memory = load_movielens(ml100k_dir)
    lazy = load_movielens(ml100k_dir, with_ratings=False)
    assert lazy.ratings is None
    for holdout in ("test", "validation"):
        expected = from_rows(fit_and_held_out(in_memory.ratings, holdout)[0])
        streamed = from_stream(lazy, holdout)
        assert streamed.row_count == expected.row_count
        assert streamed.user_ids == expected.user_ids
        assert streamed.rating_counts == expected.rating_counts
        def rated_with_stars(fit):
            return {user: sorted(zip(items, fit.rated_stars[user].tolist())) for user, items in fit.rated_item_ids.items()}
        assert rated_with_stars(streamed) == rated_with_stars(expected)
    batch = next(iter(streamed.batches(256, seed=0)))
    assert {name: tensor.dtype for name, tensor in batch.items()} == {
        "user_id": tf.string, "item_id": tf.string, "rating": tf.float32}
    assert batch["rating"].shape == (256,)
    epoch = [row for rows in streamed.batches(4096, seed=0) for row in zip(
        rows["user_id"].numpy().tolist(), rows["item_id"].numpy().tolist())]
    assert len(epoch) == expected.row_count
    assert epoch[:50] != sorted(epoch[:50]), "the stream must be shuffled, not in file order"


def _generated_ml25m(directory, users=40, movies=300, seed=0):
    """A small ratings.csv in ML-25M's exact format, sorted by user as the real one is."""
    rng = np.random.default_rng(seed)
    lines = ["userId,movieId,rating,timestamp"]
    for user in range(1, users + 1):
        for movie in sorted(rng.choice(np.arange(1, movies + 1), size=rng.integers(5, 30), replace=False)):
            lines.append(f"{user},{movie},{rng.integers(1, 11) / 2:g},{1_100_000_000 + user * 1000 + movie}")
    movie_lines = ["movieId,title,genres"] + [f"{movie},Movie {movie} (2001),Drama|Comedy"
                                              for movie in range(1, movies + 1)]
    return _write(directory, {"ratings.csv": "\n".join(lines) + "\n", "movies.csv": "\n".join(movie_lines) + "\n"})


@pytest.mark.slow
def test_ml25m_trains_streamed_by_default_end_to_end(tmp_path, capsys):
    directory = _generated_ml25m(tmp_path / "ml-25m")
    out = tmp_path / "models"
    # A few steps an epoch: what is checked is the streamed read and what the export holds.
    assert export_cli(["train", "--dataset", "ml-25m", "--data-dir", str(directory), "--preset", "seed",
                       "--set", "steps_per_epoch=5", "--out", str(out), "--shuffle-buffer", "100"]) == 0
    in_memory = load_movielens(directory, "ml-25m")
    expected = from_rows(fit_and_held_out(in_memory.ratings, "test")[0], in_memory.rating_scale)
    assert f"streaming {expected.row_count} fit rows" in capsys.readouterr().out
    assert complete_versions(out) == [1]
    metadata = json.loads(metadata_path(out, 1).read_text())
    assert metadata["streamed"] is True and metadata["dataset"] == "ml-25m"
    assert "rated_item_ids" not in metadata and sorted(metadata["user_ids"]) == sorted(expected.rated_item_ids)
    retrieval = tf.saved_model.load(str(out / "retrieval" / "1"))
    users = sorted(expected.rated_item_ids)
    history = retrieval.signatures["rated_items"](user_id=tf.constant(users))["item_ids"].numpy().astype(str)
    assert ({user: sorted(item for item in row if item) for user, row in zip(users, history.tolist())}
            == {user: sorted(items) for user, items in expected.rated_item_ids.items()}), "the graph holds who rated what"
    user = expected.user_ids[0]
    candidates = retrieval.signatures["serving_default"](**user_side([user]))["item_ids"].numpy()[0]
    rated = set(expected.rated_item_ids[user])
    assert len(candidates) and not {item.decode() for item in candidates} & rated


def test_malformed_streamed_rows_fail_with_the_file(tmp_path):
    for number, (bad_line, message) in enumerate([("1,2,3.3,1112486027", "a rating is not a multiple of 0.5"),
                                                  ("1,2,4.0", "a row does not have 4 fields separated by ,"),
                                                  ("1,two,4.0,1112486027", "could not correctly convert string: two")]):
        directory = _generated_ml25m(tmp_path / f"bad{number}")
        lines = (directory / "ratings.csv").read_text().splitlines()
        fit_row = int(split_row_numbers(len(lines) - 1, "test")[0][0])
        lines[1 + fit_row] = bad_line
        (directory / "ratings.csv").write_text("\n".join(lines) + "\n")
        with pytest.raises(DataFormatError, match=rf"ratings\.csv: {message}"):
            from_stream(load_movielens(directory, "ml-25m", with_ratings=False), "test")


@pytest.mark.slow
def test_data_bench_measures_both_modes_on_the_same_rows_and_the_store_s_ratings_added(tmp_path, capsys):
    from recsys.server.store_bench import main as store_bench

    store = tmp_path / "store.sqlite3"
    assert store_bench(["--store", str(store), "--load-only", "--movielens-ids", "--users", "30", "--rows", "900",
                        "--items", "400"]) == 0
    stored = int(capsys.readouterr().out.split(" rows of ")[0].split()[-1].replace(",", ""))
    assert export_cli(["data-bench", "--synthetic-rows", "20000", "--batch-size", "1024",
                       "--interactions-db", str(store)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["mode", "fit", "rows", "prepare", "s", "epoch", "s", "peak", "RSS", "MB"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert set(rows) == {"stream", "memory", "memory+store"}
    assert rows["stream"][0] == rows["memory"][0] == "16000"
    assert int(rows["memory+store"][0]) == 16000 + stored, "every stored rating is new and known"
    assert all(float(value) > 0 for values in rows.values() for value in values[2:])
