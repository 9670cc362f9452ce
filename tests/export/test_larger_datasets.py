"""ML-1M, ML-20M and ML-25M parsers, on small files written here in the exact formats
(the real archives cannot be downloaded on the build machines)."""
import numpy as np
import pytest

from export.data import DataFormatError, fit_and_held_out, load_movielens

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
