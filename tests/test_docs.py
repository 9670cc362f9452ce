"""The README and docs/ stay true to the code: the flag table (docs/operations.md) is argparse's, and the README
stays short."""
import argparse
import re

from recsys.server.__main__ import build_parser
from tests.conftest import REPO_ROOT, STORE_READ_SECONDS

README = REPO_ROOT / "README.md"
OPERATIONS = REPO_ROOT / "docs" / "operations.md"


def _flag_table() -> dict[str, str]:
    """`--flag` -> default cell, from the flag table of docs/operations.md."""
    section = OPERATIONS.read_text().split("\n## Flags", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) == 3 and cells[0].startswith("`--"):
            flag = cells[0].strip("`").split()[0].replace("--[no-]", "--")
            rows[flag] = cells[1].strip("`")
    return rows


def _shown(action: argparse.Action) -> str | float:
    if action.required:
        return "required"
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on" if action.default else "off"
    if action.default is None:
        return "none"
    return float(action.default) if isinstance(action.default, (int, float)) else str(action.default)


def test_the_flag_table_is_argparse():
    table = _flag_table()
    actions = {action.option_strings[0]: action for action in build_parser()._actions
               if action.option_strings and action.option_strings[0] != "-h"}
    assert set(table) == set(actions), "flags missing from the README table, or listed but gone"
    for flag, action in actions.items():
        expected = _shown(action)
        if flag == "--model-version":
            expected = "newest" if action.default is None else expected
        if flag == "--interactions-db":  # under the user's state directory: the README names the usual one
            assert expected.endswith("/recsys/interactions.sqlite3")
            expected = "~/.local/state/recsys/interactions.sqlite3"
        shown = float(table[flag]) if isinstance(expected, float) else table[flag]
        assert shown == expected, f"{flag}: README says {table[flag]!r}, argparse {action.default!r}"


def test_the_readme_is_short_and_docs_tell_no_history():
    assert len(README.read_text().splitlines()) <= 250
    diary = re.compile(r"this session|earlier session|previous session|one-off|not kept|throwaway", re.IGNORECASE)
    for path in [README, *(REPO_ROOT / "docs").glob("*.md")]:
        found = diary.findall(path.read_text())
        assert not found, f"{path.name} speaks of how it was made: {found[:3]}"


def test_docs_hold_no_placeholders():
    """Figures are measured or absent: no placeholder token (an upper-case NAME_LIKE_THIS where a number
    belongs, TODO, TBD, FIXME, XXX) in the README or docs/."""
    placeholder = re.compile(r"\b(TODO|TBD|FIXME|XXX|[A-Z]+_(NOISE|FIGURE|NUMBER|VALUE|RESULT)S?)\b|not yet in this document")
    for path in [README, *(REPO_ROOT / "docs").glob("*.md")]:
        found = [match.group(0) for match in placeholder.finditer(path.read_text())]
        assert not found, f"{path.name} holds placeholders: {found[:3]}"


def test_the_readme_python_snippet_runs_and_the_list_follows_what_was_sent(models_dir, tmp_path, capsys):
    """The README's Python block, run as written against a real server with a store (port swapped in):
    the list of the new user who sent three ratings is not the popularity list they had before."""
    from recsys.server.app import create_server
    from recsys.server.in_process import InProcessBackend
    from recsys.server.options import ServerOptions
    from recsys.server.store import open_store

    block = README.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    store = open_store(str(tmp_path / "s.sqlite3"))
    server, port = create_server("127.0.0.1:0", InProcessBackend(models_dir), models_dir,
                                 ServerOptions(poll_seconds=0.2, store_read_seconds=STORE_READ_SECONDS), store=store)
    server.start()
    try:
        from recsys.client import RecommenderClient

        with RecommenderClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(60)
        exec(compile(block.replace("localhost:50051", f"127.0.0.1:{port}"), "README.md", "exec"), {})
    finally:
        server.stop(0).wait(10)
        store.close()
    lines = capsys.readouterr().out.splitlines()
    popular = eval(lines[0])  # noqa: S307 - the snippet's own printed list
    streamed = [line.split(" ", 1)[1].rsplit(" (", 1)[0] for line in lines[1:6]]
    assert len(popular) == 5 and len(lines) == 7
    assert [title.split(" (")[0] for title in popular] != [title.split(" (")[0] for title in streamed]
