"""The rooms of the layout and what each may import (../shared/DESIGN.md)."""
import ast
import re
from pathlib import Path

from tests.conftest import REPO_ROOT

# The server's edges (gRPC, and the HTTP face, which speaks gRPC's status codes) and the TF Serving
# backend (a gRPC client): the only server modules that may import grpc. The pipeline, catalog,
# batching and errors know nothing of the transport.
GRPC_MODULES = {"server/app.py", "server/floor.py", "server/security.py", "server/servicer.py", "server/status.py",
                "server/tf_serving.py", "server/wire.py", "server/rest.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _sources(room: str) -> list[Path]:
    return sorted((REPO_ROOT / room).rglob("*.py"))


def test_everything_is_imported_under_the_projects_own_name():
    """The installed packages are recsys.client, recsys.server, recsys.export and recsys.v1 (pyproject):
    an import of a bare `client`, `server`, `export` or `protos` would take a generic top-level name."""
    for room in ("client", "server", "export", "protos", "tests"):
        for path in _sources(room):
            bare = {name for name in _imports(path) if name.split(".")[0] in ("client", "server", "export", "protos")}
            assert not bare, f"{path.relative_to(REPO_ROOT)} imports {bare}"


def test_the_client_imports_only_the_contract():
    for path in _sources("client"):
        leaks = {name for name in _imports(path)
                 if name.startswith(("recsys.server", "recsys.export")) or name.split(".")[0] in ("tensorflow", "numpy")}
        assert not leaks, f"{path.relative_to(REPO_ROOT)} imports {leaks}: the client installs without them"


def test_grpc_is_imported_only_at_the_edge():
    for room in ("server", "export"):
        for path in _sources(room):
            relative = path.relative_to(REPO_ROOT).as_posix()
            uses_grpc = {name for name in _imports(path) if name == "grpc" or name.startswith(("grpc.", "grpc_"))}
            if relative not in GRPC_MODULES:
                assert not uses_grpc, f"{relative} imports {uses_grpc}; domain code maps no status codes"


def test_the_legacy_keras_switch_is_set_in_one_place():
    setting = re.compile(r"environ\S*\(\s*[\"']TF_USE_LEGACY_KERAS|environ\[[\"']TF_USE_LEGACY_KERAS")
    setters = [path.relative_to(REPO_ROOT).as_posix() for room in ("server", "export", "client", "tests")
               for path in _sources(room) if setting.search(path.read_text())]
    assert setters == ["server/__init__.py"]
    assert "TF_USE_LEGACY_KERAS" not in (REPO_ROOT / "Makefile").read_text()
