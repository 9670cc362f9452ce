"""Progress with an ETA: one line per tenth of the work when the output is not a terminal."""
import io
import re

import recsys.export.data
from recsys.export.data import load_csv
from recsys.export.progress import Progress
from recsys.export.synth import generate, write


def test_a_phase_prints_nine_lines_with_an_eta_then_closes():
    stream = io.StringIO()
    progress = Progress("[ranking] epoch 1/2", 200, "steps", stream)
    for _ in range(200):
        progress.advance()
    assert progress.close() >= 0
    lines = stream.getvalue().splitlines()
    assert [re.search(r"(\d+)% of 200 steps", line).group(1) for line in lines] == [str(n) for n in range(10, 100, 10)]
    assert all(re.search(r", \d+s, eta \d+s$", line) for line in lines)


def test_reading_a_large_ratings_file_shows_its_progress(tmp_path, monkeypatch, capsys):
    files = write(generate(200, 60, 8_000, seed=2), tmp_path, "csv")
    monkeypatch.setattr(recsys.export.data, "PROGRESS_BYTES", 1_000)
    monkeypatch.setattr(recsys.export.data, "PROGRESS_LINES", 100)
    load_csv(files["ratings"], files["items"])
    shown = [line for line in capsys.readouterr().out.splitlines() if "reading ratings.csv" in line]
    assert len(shown) >= 5 and "bytes" in shown[0] and "eta" in shown[-1]
