"""Shared fixtures.

Two data sets, two tiers:
- the fast tier's export: the `tiny` preset trained in seconds on a synthetic data set in
  MovieLens 100k's format (`tests/synthetic.py`). The service contract, end to end, runs on it
  (`data_dir`, `movielens`, `split`, `trained`, `models_dir`, `running_server`, `client`);
- the real MovieLens 100k (`ml100k_*`), read by the data tests, and trained with the default
  preset for the quality floors, in the background from the first test on (`RealDataJob`): every
  test that needs such an export is marked `slow` and runs last.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

import recsys.server  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Tests that read the real MovieLens 100k are marked `real_data` (the fast tier leaves them out,
    so it runs with no data set at all). Tests on the real data's exports must be marked slow, and
    run last: their training runs in the background meanwhile (`RealDataJob`)."""
    for item in items:
        if "ml100k_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)
    on_real_exports = [item for item in items if SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))]
    later = set(map(id, on_real_exports))
    unmarked = [item.nodeid for item in on_real_exports if not item.get_closest_marker("slow")]
    if unmarked:
        raise pytest.UsageError(f"tests that train on the real data must be marked slow: {unmarked}")
    items[:] = [item for item in items if id(item) not in later] + on_real_exports


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """The real MovieLens 100k, where the README says data goes ($RECSYS_DATA_DIR, else ./data/ml-100k);
    tests never write into it."""
    path = Path(os.environ.get("RECSYS_DATA_DIR") or REPO_ROOT / "data" / "ml-100k")
    if not (path / "u.data").is_file():
        pytest.fail(f"MovieLens 100k not found at {path}: set RECSYS_DATA_DIR or unpack it into ./data/ml-100k "
                    "(make test-fast needs no data)")
    return path.resolve()


@pytest.fixture(scope="session")
def ml100k(ml100k_dir):
    from recsys.export.data import load_movielens

    return load_movielens(ml100k_dir)


@pytest.fixture(scope="session")
def ml100k_split(ml100k):
    from recsys.export.data import fit_and_held_out

    return fit_and_held_out(ml100k.ratings, "test")


# The exports on the real data, each trained by `python -m recsys.export train` then scored by
# `python -m recsys.export evaluate --json`: the CLI a user runs. The fold-in floor's export is the default
# preset with fewer epochs (CI's time), the users held out; the README's figures are the full preset's.
# Both run below the tests' CPU priority; the longer one above the shorter one's.
FOLD_IN_EPOCHS = ["retrieval_epochs=3", "ranking_epochs=5"]
REAL_DATA_JOBS = {
    "test": {"train": [], "evaluate": ["random", "recent"], "niceness": 10,
             "fixtures": {"ml100k_models_dir", "ml100k_evaluation", "ml100k_evaluation_output", "ml100k_recent"}},
    "users": {"train": ["--holdout", "users", *(f"--set={field}" for field in FOLD_IN_EPOCHS)],
              "evaluate": ["fold-in"], "niceness": 19, "fixtures": {"ml100k_users_models_dir", "ml100k_fold_in"}},
}
SLOW_FIXTURES = set().union(*(job["fixtures"] for job in REAL_DATA_JOBS.values()))
# One TensorFlow thread per pool for the child processes that train beside the tests: a process's
# default pools are a thread per core, while several TensorFlow processes share the cores here, and
# one thread trains the ranker as fast alone (docs/evaluation.md "Quality floors in the tests").
# TensorFlow reads these for pools nobody sized (tensorflow/core/common_runtime/process_util.cc).
ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


class RealDataJob(threading.Thread):
    """Trains, then evaluates (the protocols side by side), one export on the real data in child
    processes at a low CPU priority, from the first test on: the minutes of training overlap the rest
    of the run, which mostly waits on sockets and sleeps, and the timing-sensitive tests keep the CPU
    they need. Each step's output goes to `<step>.log` in `out`."""

    def __init__(self, name: str, data_dir: Path, out: Path):
        super().__init__(name=f"real-data-{name}", daemon=True)
        self.job, self.data_dir, self.out = REAL_DATA_JOBS[name], data_dir, out
        self.models_dir = out / "models"
        self.failure: str | None = None

    def run(self) -> None:
        data = ["--data-dir", str(self.data_dir)]
        if self._side_by_side({"train": ["train", "--out", str(self.models_dir), *data, *self.job["train"]]}):
            self._side_by_side({protocol: ["evaluate", "--models", str(self.models_dir), *data, "--protocol", protocol,
                                           "--json", str(self.metrics_path(protocol)),
                                           *(["--plot", str(self.plot_path)] if protocol == "random" else [])]
                                for protocol in self.job["evaluate"]})

    def _side_by_side(self, steps: dict[str, list[str]]) -> bool:
        running = {}
        for step, arguments in steps.items():
            with self.log_path(step).open("w") as log:
                log.write(f"$ python -m recsys.export {' '.join(arguments)}\n")
                log.flush()
                running[step] = subprocess.Popen(
                    ["nice", "-n", str(self.job["niceness"]), sys.executable, "-m", "recsys.export", *arguments],
                    cwd=REPO_ROOT, env={**os.environ, **ONE_THREAD}, stdout=log, stderr=subprocess.STDOUT)
        for step, process in running.items():
            if process.wait() != 0 and self.failure is None:
                self.failure = step
        return self.failure is None

    def log_path(self, step: str) -> Path:
        return self.out / f"{step}.log"

    def metrics_path(self, protocol: str) -> Path:
        return self.out / f"{protocol}.json"

    @property
    def plot_path(self) -> Path:
        return self.out / "hr.png"

    def wait(self) -> "RealDataJob":
        self.join()
        if self.failure:
            lines = self.log_path(self.failure).read_text().splitlines()
            pytest.fail(f"python -m recsys.export {self.failure} failed; its output ends:\n" + "\n".join(lines[-40:]))
        return self

    def metrics(self, protocol: str) -> dict:
        return json.loads(self.wait().metrics_path(protocol).read_text())


@pytest.fixture(scope="session", autouse=True)
def real_data_jobs(request, tmp_path_factory) -> dict[str, RealDataJob]:
    """Starts, before the first test, the jobs that the selected tests need."""
    needed = set().union(*(getattr(item, "fixturenames", ()) for item in request.session.items))
    jobs = {}
    for name, job in REAL_DATA_JOBS.items():
        if job["fixtures"] & needed:
            jobs[name] = RealDataJob(name, request.getfixturevalue("ml100k_dir"), tmp_path_factory.mktemp(f"ml100k_{name}"))
            jobs[name].start()
    return jobs


@pytest.fixture(scope="session")
def ml100k_models_dir(real_data_jobs) -> Path:
    """The default preset on the real data, exported as version 1."""
    return real_data_jobs["test"].wait().models_dir


@pytest.fixture(scope="session")
def ml100k_evaluation(real_data_jobs) -> dict:
    return real_data_jobs["test"].metrics("random")


@pytest.fixture(scope="session")
def ml100k_evaluation_output(real_data_jobs) -> tuple[str, Path]:
    """What `evaluate --protocol random --json --plot` printed, and the plot it wrote."""
    job = real_data_jobs["test"].wait()
    return job.log_path("random").read_text(), job.plot_path


@pytest.fixture(scope="session")
def ml100k_recent(real_data_jobs) -> dict:
    return real_data_jobs["test"].metrics("recent")


@pytest.fixture(scope="session")
def ml100k_users_models_dir(real_data_jobs) -> Path:
    """The default preset (with FOLD_IN_EPOCHS) with 20% of the users held out of training."""
    return real_data_jobs["users"].wait().models_dir


@pytest.fixture(scope="session")
def ml100k_fold_in(real_data_jobs) -> dict:
    return real_data_jobs["users"].metrics("fold-in")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The synthetic data set, in MovieLens 100k's format."""
    from tests.synthetic import write_synthetic_ml100k

    return write_synthetic_ml100k(tmp_path_factory.mktemp("synthetic") / "ml-100k")


@pytest.fixture(scope="session")
def movielens(data_dir):
    from recsys.export.data import load_movielens

    return load_movielens(data_dir)


@pytest.fixture(scope="session")
def split(movielens):
    from recsys.export.data import fit_and_held_out

    return fit_and_held_out(movielens.ratings, "test")


@pytest.fixture(scope="session")
def trained(movielens, tmp_path_factory):
    """The tiny preset on the synthetic data, exported as version 1."""
    from recsys.export.presets import PRESETS
    from recsys.export.train import train_and_export

    models_dir = tmp_path_factory.mktemp("models")
    return models_dir, train_and_export(movielens, PRESETS["tiny"], models_dir)


@pytest.fixture(scope="session")
def models_dir(trained) -> Path:
    return trained[0]


@pytest.fixture(scope="session")
def heaviest_user(split) -> str:
    """The user with the most ratings in train: the hardest exclusion case."""
    import numpy as np

    users, counts = np.unique(split[0][:, 0], return_counts=True)
    return str(users[np.argmax(counts)])


@pytest.fixture(scope="session")
def running_server(models_dir):
    """The real server on a loopback port, serving the session's export in-process."""
    from recsys.client import RecommenderClient
    from recsys.server.app import create_server
    from recsys.server.in_process import InProcessBackend
    from recsys.server.options import ServerOptions

    backend = InProcessBackend(models_dir)
    recommender, port = create_server("127.0.0.1:0", backend, models_dir, ServerOptions(poll_seconds=0.5))
    recommender.start()
    client = RecommenderClient(f"127.0.0.1:{port}", timeout=10)
    client.wait_until_serving(60)
    yield recommender, port
    client.close()
    recommender.stop(1).wait()


@pytest.fixture(scope="session")
def served_backend(running_server):
    """The running server's in-process backend, its models loaded: for offline pipelines to compare with."""
    return running_server[0].backend


@pytest.fixture()
def client(running_server):
    from recsys.client import RecommenderClient

    _, port = running_server
    with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as recommender_client:
        yield recommender_client


def publish(models_dir, source_dir, version, broken=False):
    """Add `version` to models_dir the way the exporter does: metadata, ranking, then retrieval by rename."""
    metadata = json.loads((source_dir / "metadata" / "1.json").read_text())
    metadata["model_version"] = version
    (models_dir / "metadata").mkdir(parents=True, exist_ok=True)
    (models_dir / "metadata" / f"{version}.json").write_text(json.dumps(metadata))
    for model in ("ranking", "retrieval"):
        staging = models_dir / model / f".staging-{version}"
        shutil.copytree(source_dir / model / "1", staging)
        if broken and model == "retrieval":
            (staging / "saved_model.pb").write_bytes(b"this is not a SavedModel")
        staging.rename(models_dir / model / str(version))


@pytest.fixture()
def fresh_models(models_dir, tmp_path):
    target = tmp_path / "models"
    publish(target, models_dir, 1)
    return target


def status_of(call) -> tuple[grpc.StatusCode, str]:
    """The status code and message a call fails with (it must fail)."""
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details()


def wait_for(predicate, seconds: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# Test servers with a store read it within this budget: what a test records is then seen by its next
# Recommend on a loaded machine too (the default 50 ms is not, at times). Tests of the budget set their own.
STORE_READ_SECONDS = 5.0


def start_server_process(models_dir: Path, *flags: str, read_log: bool = True) -> tuple[subprocess.Popen, int]:
    """`python -m recsys.server` on a free loopback port; returns the process and the port it reported.

    Its stderr is collected in `process.log_lines` (`process.log_drain` ends at its EOF), or,
    with `read_log=False`, not read past the line reporting the port: a log reader that stopped."""
    if not any(flag.startswith("--interactions-db") for flag in flags):
        flags = (*flags, "--interactions-db", "none")  # never the user's own store
    process = subprocess.Popen(
        [sys.executable, "-m", "recsys.server", "--models", str(models_dir), "--host", "127.0.0.1", "--port", "0", *flags],
        cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    process.log_lines = []
    for line in process.stderr:
        process.log_lines.append(line)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            if read_log:
                process.log_drain = threading.Thread(target=process.log_lines.extend, args=(process.stderr,),
                                                     daemon=True)
                process.log_drain.start()
            return process, int(match.group(1))
    process.kill()
    raise RuntimeError(f"server exited with {process.wait()} before reporting its port")


def start_tf_serving(model_config_file: Path, *flags: str, port: int = 0) -> tuple[subprocess.Popen, int]:
    """The TF Serving stand-in (`python -m tests.tf_serving`) as a process; returns it and its port
    once it reports serving (after its initial load, as tensorflow_model_server does).
    Its log is collected in `process.log_lines`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.tf_serving", f"--model_config_file={model_config_file}", f"--port={port}",
         "--file_system_poll_wait_seconds=0.2", *flags],
        cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    process.log_lines = []
    for line in process.stderr:
        process.log_lines.append(line)
        match = re.search(r"Running gRPC ModelServer at 127\.0\.0\.1:(\d+)", line)
        if match:
            threading.Thread(target=process.log_lines.extend, args=(process.stderr,), daemon=True).start()
            return process, int(match.group(1))
    raise RuntimeError(f"the TF Serving stand-in exited with {process.wait()}: {''.join(process.log_lines)[-3000:]}")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/postgres.py), emptied before each test that asks."""
    from tests.postgres import PostgresServer

    server_ = PostgresServer()
    server_.start()
    yield server_
    try:
        server_.stop()
    finally:
        server_.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request, tmp_path):
    """Where an interaction store lives: an SQLite file, or a real PostgreSQL database (emptied)."""
    if request.param == "sqlite":
        return str(tmp_path / "interactions.sqlite3")
    postgres = request.getfixturevalue("postgres")
    postgres.clear()
    return postgres.url


@pytest.fixture()
def fake_models(tmp_path):
    """Metadata for the fake backend (tests/fake_backend.py): 60 movies, no TensorFlow."""
    from tests.fake_backend import write_fake_metadata

    return write_fake_metadata(tmp_path / "models", movies=60)


@pytest.fixture()
def fake_recommender(fake_models, tmp_path):
    """The real gRPC server on loopback, started, with the fake backend and an SQLite store:
    (server, port, store)."""
    from recsys.server.app import create_server
    from recsys.server.options import ServerOptions
    from recsys.server.store import open_store
    from tests.fake_backend import FakeBackend

    store = open_store(str(tmp_path / "interactions.sqlite3"))
    recommender, port = create_server("127.0.0.1:0", FakeBackend(fake_models), fake_models,
                                      ServerOptions(poll_seconds=0.2, store_read_seconds=STORE_READ_SECONDS),
                                      store=store)
    recommender.start()
    try:
        yield recommender, port, store
    finally:
        recommender.stop(0).wait(10)
        store.close()


@pytest.fixture()
def fake_server(fake_recommender):
    """A client of `fake_recommender`, and its store: (client, store)."""
    from recsys.client import RecommenderClient

    _, port, store = fake_recommender
    with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
        yield client, store
