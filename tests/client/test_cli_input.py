"""Every CLI input error is a usage message (exit code 2, the problem named), never a traceback."""
import pytest

from client.__main__ import main as client_main


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
