"""Multi-worker training: two worker processes on 127.0.0.1 train the seed preset with
MultiWorkerMirroredStrategy; the chief's export must be a normal export, as good as a
single-process run."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from recsys.export.data import fit_and_held_out
from recsys.export.evaluate import held_out_by_user, ranking_metrics, two_stage_lists
from recsys.export.presets import PRESETS
from recsys.export.train import train_and_export
from recsys.server.catalog import CatalogStore
from recsys.server.in_process import InProcessBackend
from recsys.server.layout import complete_versions
from recsys.server.pipeline import Pipeline
from tests.conftest import REPO_ROOT
from tests.export.test_savedmodel import cpp_run, numpy_inputs, user_side

# Two seed-preset trainings on the real data (two workers, then one process for comparison).
pytestmark = pytest.mark.slow
# Fewer epochs than the seed preset's (both runs alike): the comparison, not the quality, is the point.
SHORTER = ["retrieval_epochs=2", "ranking_epochs=10"]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for probe in sockets:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in sockets]
    for probe in sockets:
        probe.close()
    return ports


@pytest.fixture(scope="module")
def two_worker_export(tmp_path_factory, ml100k_dir):
    out = tmp_path_factory.mktemp("multi_worker_models")
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    started = time.monotonic()
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "recsys.export", "train", "--preset", "seed", *(f"--set={field}" for field in SHORTER),
             "--strategy", "multi-worker",
             "--data-dir", str(ml100k_dir), "--out", str(out)],
            cwd=REPO_ROOT, env={**os.environ, "TF_CONFIG": json.dumps(config)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    assert "exported version 1" in outputs[0] and "the chief writes the export" in outputs[1]
    return out, time.monotonic() - started


def test_only_the_chief_writes_a_complete_export(two_worker_export):
    out, _ = two_worker_export
    assert complete_versions(out) == [1]
    metadata = json.loads((out / "metadata" / "1.json").read_text())
    assert metadata["strategy"] == {"name": "multi-worker", "replicas": 2}
    assert metadata["preset"]["name"] == "seed"


def test_the_chief_export_serves_like_any_export(two_worker_export, ml100k_split):
    out, _ = two_worker_export
    users, counts = np.unique(ml100k_split[0][:, 0], return_counts=True)
    heaviest_user = str(users[np.argmax(counts)])
    retrieval = tf.saved_model.load(str(out / "retrieval" / "1"))
    assert set(retrieval.signatures) == {"serving_default", "include_rated", "similar_items", "rated_items"}
    result = cpp_run(out / "retrieval" / "1", numpy_inputs(user_side([heaviest_user])), ["item_ids", "scores"])
    rated = {str(item) for user, item in ml100k_split[0][:, :2] if str(user) == heaviest_user}
    assert not set(result["item_ids"][0].astype(str)) & rated
    ranked = cpp_run(out / "ranking" / "1", {**numpy_inputs(user_side(["42"])), "item_ids": [["1", "2"]]},
                     ["predicted_rating", "score"])
    assert np.all((ranked["predicted_rating"] > 0) & (ranked["predicted_rating"] < 6))


def two_stage_hr_at_10(models_dir, data) -> float:
    """HR@10 of the served lists on the test rows, as `evaluate` scores them (its baselines left out:
    only the two exports are compared)."""
    backend, catalogs = InProcessBackend(models_dir), CatalogStore(models_dir)
    assert backend.refresh(catalogs.get)
    held_out = held_out_by_user(fit_and_held_out(data.ratings, "test")[1], data.names)
    return ranking_metrics(two_stage_lists(Pipeline(backend, catalogs), sorted(held_out)), held_out)["hr@10"]


def test_quality_matches_a_single_process_run(two_worker_export, ml100k, tmp_path):
    out, _ = two_worker_export
    train_and_export(ml100k, PRESETS["seed"].with_overrides(SHORTER), tmp_path)
    single, distributed = two_stage_hr_at_10(tmp_path, ml100k), two_stage_hr_at_10(out, ml100k)
    assert abs(distributed - single) <= 0.01, (distributed, single)
