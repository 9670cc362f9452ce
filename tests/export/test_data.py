import dataclasses
import hashlib
import zipfile

import numpy as np
import pytest

from recsys.export import data as data_module
from recsys.export.data import (
    DataFormatError,
    DataSourceError,
    download_dataset,
    fit_and_held_out,
    load_movielens,
    read_ratings,
    resolve_data_dir,
)


def test_split_is_the_documented_permutation(ml100k):
    train, test = fit_and_held_out(ml100k.ratings, "test")
    permutation = np.random.default_rng(42).permutation(len(ml100k.ratings))
    assert len(train) == 80_000 and len(test) == 20_000
    np.testing.assert_array_equal(train, ml100k.ratings[permutation[:80_000]])
    np.testing.assert_array_equal(test, ml100k.ratings[permutation[80_000:]])
    again_train, again_test = fit_and_held_out(load_movielens(ml100k.source).ratings, "test")
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(test, again_test)


def test_validation_is_carved_from_train_only(ml100k):
    train, test = fit_and_held_out(ml100k.ratings, "test")
    fit, validation = fit_and_held_out(ml100k.ratings, "validation")
    assert len(fit) + len(validation) == len(train) and len(validation) == 8_000
    as_set = lambda rows: {tuple(row) for row in rows.tolist()}  # noqa: E731
    assert as_set(fit) | as_set(validation) == as_set(train)
    assert not as_set(validation) & as_set(test)
    np.testing.assert_array_equal(fit_and_held_out(ml100k.ratings, "test")[1], test)


def test_items_are_keyed_by_movie_id_with_metadata(ml100k):
    assert len(ml100k.items) == 1682 and len(ml100k.users) == 943
    toy_story = ml100k.items["1"]
    assert toy_story.title == "Toy Story (1995)"
    assert toy_story.genres == ("Animation", "Children's", "Comedy")
    titles = [item.title for item in ml100k.items.values()]
    assert len(set(titles)) < len(titles), "ML-100k has duplicate titles; ids must be the key"
    assert ml100k.users["1"].occupation == "technician"


def test_explicit_missing_directory_names_every_way(tmp_path, monkeypatch):
    monkeypatch.delenv("RECSYS_DATA_DIR", raising=False)
    with pytest.raises(DataSourceError) as error:
        resolve_data_dir(tmp_path / "nowhere")
    message = str(error.value)
    assert "--data-dir" in message and "RECSYS_DATA_DIR" in message and "data/ml-100k" in message
    assert "download" in message


def test_env_var_is_used_and_validated(tmp_path, monkeypatch, ml100k_dir):
    monkeypatch.setenv("RECSYS_DATA_DIR", str(ml100k_dir))
    assert resolve_data_dir(None) == ml100k_dir
    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path))
    with pytest.raises(DataSourceError, match="RECSYS_DATA_DIR"):
        resolve_data_dir(None)


def test_nothing_found_without_download_names_every_way(tmp_path, monkeypatch):
    monkeypatch.delenv("RECSYS_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataSourceError, match="--data-dir.*RECSYS_DATA_DIR.*data/ml-100k"):
        resolve_data_dir(None, allow_download=False)


def test_corrupt_line_is_reported_with_file_and_line(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("1\t2\t3\t881250949\n1\t3\tfive\t881250949\n")
    with pytest.raises(DataFormatError, match=r"u\.data:2: .*'1\\t3\\tfive"):
        read_ratings(path)
    path.write_text("1\t2\t9\t881250949\n")
    with pytest.raises(DataFormatError, match=r"u\.data:1: rating 9 is outside 1..5"):
        read_ratings(path)


def _zip_of(ml100k_dir, tmp_path):
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for name in ("u.data", "u.item", "u.user"):
            bundle.write(ml100k_dir / name, f"ml-100k/{name}")
    return archive


def test_download_verifies_checksum(tmp_path, ml100k_dir):
    archive = _zip_of(ml100k_dir, tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(DataSourceError, match="checksum mismatch"):
        download_dataset(cache, url=archive.as_uri())
    assert not (cache / "ml-100k.zip").exists(), "a file with the wrong checksum must not be kept"
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    unpacked = download_dataset(cache, url=archive.as_uri(), sha256=digest)
    assert (unpacked / "u.data").read_bytes() == (ml100k_dir / "u.data").read_bytes()


def test_download_is_the_last_resort(tmp_path, monkeypatch, ml100k_dir):
    monkeypatch.delenv("RECSYS_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECSYS_CACHE_DIR", str(tmp_path / "cache"))
    archive = _zip_of(ml100k_dir, tmp_path)
    spec = dataclasses.replace(data_module.DATASETS["ml-100k"], url=archive.as_uri(),
                               sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    monkeypatch.setitem(data_module.DATASETS, "ml-100k", spec)
    assert resolve_data_dir(None) == tmp_path / "cache" / "ml-100k"


def test_published_checksums_are_pinned():
    expected = {
        "ml-100k": "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        "ml-1m": "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        "ml-20m": "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
        "ml-25m": "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
    }
    downloadable = {name: spec for name, spec in data_module.DATASETS.items() if spec.url}
    assert {name: spec.sha256 for name, spec in downloadable.items()} == expected
    assert all(spec.url.endswith(f"/{name}.zip") for name, spec in downloadable.items())
    assert set(data_module.DATASETS) - set(downloadable) == {"csv"}, "one's own catalog is read from named files"
