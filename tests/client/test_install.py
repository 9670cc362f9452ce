"""The client installs alone: `pip install .` with no extras brings no TensorFlow, and the
installed client talks to a running server."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# What a source distribution of the project holds (the installed packages and the build files).
PROJECT_FILES = ("pyproject.toml", "README.md", "protos", "client", "server", "export")


@pytest.mark.slow
def test_a_client_only_install_has_no_tensorflow_and_calls_the_server(tmp_path, running_server, client):
    source = tmp_path / "source"
    source.mkdir()
    for name in PROJECT_FILES:
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy
        copy(REPO_ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    installed = subprocess.run([python, "-m", "pip", "install", "--quiet", str(source)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    packages = subprocess.run([python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True,
                              check=True).stdout
    names = {package["name"].lower() for package in json.loads(packages)}
    assert {"grpcio", "protobuf", "grpcio-health-checking"} <= names
    assert not names & {"tensorflow", "tf-keras", "tensorflow-recommenders", "numpy", "grpcio-tools", "matplotlib"}
    # Run outside the repository, so nothing is imported from the working tree.
    no_tensorflow = subprocess.run([python, "-c", "import tensorflow"], cwd=tmp_path, capture_output=True, text=True)
    assert no_tensorflow.returncode != 0 and "No module named 'tensorflow'" in no_tensorflow.stderr
    no_server = subprocess.run([python, "-m", "recsys.server", "--models", str(tmp_path)], cwd=tmp_path, capture_output=True,
                               text=True, timeout=60)
    assert no_server.returncode == 2 and "pip install 'recsys[serve]'" in no_server.stderr
    assert "Traceback" not in no_server.stderr
    no_server_command = subprocess.run([str(venv / "bin" / "recsys-server"), "--models", str(tmp_path)], cwd=tmp_path,
                                       capture_output=True, text=True, timeout=60)
    assert no_server_command.returncode == 2 and "pip install 'recsys[serve]'" in no_server_command.stderr

    _, port = running_server
    called = subprocess.run([str(venv / "bin" / "recsys"), "recommend", "--target", f"127.0.0.1:{port}", "--user",
                             "42", "-k", "5", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert called.returncode == 0, called.stderr
    served = [item["item_id"] for item in json.loads(called.stdout)]
    assert served == [item.item_id for item in client.recommend("42", k=5)]
    # An application with a `client` module and a `protos` package of its own: both import beside ours.
    application = tmp_path / "application"
    (application / "protos").mkdir(parents=True)
    (application / "client.py").write_text("NAME = 'the application'\n")
    (application / "protos" / "__init__.py").write_text("NAME = 'its protos'\n")
    script = ("import client, protos\n"
              "from recsys.client import RecommenderClient\n"
              f"with RecommenderClient('127.0.0.1:{port}', timeout=10) as c:\n"
              "    print(c.health(), len(c.recommend('42', k=3)), client.NAME == 'the application',\n"
              "          protos.NAME == 'its protos')\n")
    library = subprocess.run([python, "-c", script], cwd=application, capture_output=True, text=True, timeout=60)
    assert library.stdout.split() == ["SERVING", "3", "True", "True"], library.stderr
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert {path.name for path in Path(site).iterdir()} & {"client", "server", "export", "protos"} == set()
