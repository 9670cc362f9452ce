"""The CLI: every input error is a usage message (exit code 2, the problem named), never a traceback; its tables."""
import pytest

from recsys.client.__main__ import format_items
from recsys.client.__main__ import main as client_main
from recsys.v1 import recommender_pb2


@pytest.mark.parametrize("argv, named", [
    (["recommend", "--user", "42", "-k", "-1"], "-1"),
    (["recommend", "--user", "42", "-k", "1000"], "1000"),
    (["similar", "--item", "1", "-k", "ten"], "'ten'"),
    (["recommend", "--user", "42", "--interaction", "1:5:3"], "'1:5:3'"),
    (["record", "--user", "42", "--interaction", "abc:"], "'abc:'"),
    (["record", "--user", "42", "--interaction", ":4"], "':4'"),
    (["record", "--user", "42", "--interaction", "50:9"], "'50:9'"),
])
def test_bad_input_is_a_usage_error(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        client_main(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "usage:" in error and named in error and "Traceback" not in error


def test_the_table_cuts_with_an_ellipsis_and_leaves_ratings_nobody_predicted_blank():
    rated = recommender_pb2.RankedItem(rank=1, title="A" * 60, genres=["Action", "Adventure", "Romance", "Sci-Fi"],
                                       score=1.5, predicted_rating=4.25, because_titles=["Heat (1995)"])
    similar = recommender_pb2.RankedItem(rank=2, title="Short (1995)", genres=["Drama"], score=0.9)
    header, first, reason, second = format_items([rated, similar]).splitlines()
    assert first.startswith("   1  " + "A" * 49 + "… Action, Adventure, Romance, Sci… ") and first.endswith(" 4.25")
    assert reason.strip() == "because you watched Heat (1995)"
    assert second.endswith("0.900") and len(second) < len(header)
