"""python -m recsys.server.bench: the load generator's request mix through the serving pipeline in this
process, one thread, no gRPC: what the models and the pipeline cost on this machine.

Compare with `python -m recsys.client bench` against the real server (what gRPC adds) and against
`python -m recsys.server.floor` (what gRPC alone costs). The figures print in the client bench's format.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from recsys.client import bench
from recsys.server import start_tensorflow
from recsys.server.options import DEFAULTS

if TYPE_CHECKING:  # imported where used, once start_tensorflow() has run
    from recsys.server.pipeline import Pipeline
    from recsys.server.validation import Query


def _pipeline(models_dir: Path, k: int, users: str, interactions: int) -> tuple[Pipeline, list[Query]]:
    """An export's serving pipeline, loaded as the server loads it, and its request mix."""
    from recsys.server.catalog import CatalogStore
    from recsys.server.in_process import InProcessBackend
    from recsys.server.pipeline import Pipeline
    from recsys.server.validation import Query

    backend, catalogs = InProcessBackend(models_dir), CatalogStore(models_dir)
    if not backend.refresh(catalogs.get):
        raise SystemExit(f"no loadable model version in {models_dir}")
    pipeline = Pipeline(backend, catalogs)
    catalog = pipeline.current_catalog()
    user_ids = bench.user_mix(users, sorted(catalog.user_ids, key=lambda user: (len(user), user)))
    mix = [tuple(entries) for entries in bench.interaction_mix(interactions, sorted(catalog.titles))]
    queries = [Query(user_id, k=k, recent_interactions=mix[n % len(mix)]) for n, user_id in enumerate(user_ids)]
    pipeline.recommend(queries[:1])  # the first call traces; not measured
    return pipeline, queries


def run_in_process(models_dirs: list[Path], duration: float, k: int, users: str,
                   interactions: int = 0) -> list[bench.Tally]:
    """The request mix through each export's pipeline, one call at a time, TensorFlow's pools sized as
    the server's. With several exports the calls take turns (one to each in order, then again), so
    that the machine's drift over the run falls on every export alike. Returns each export's tally
    (its latencies sum to the time its own calls took)."""
    from recsys.server.app import settle_heap
    from recsys.server.in_process import set_tensorflow_threads

    set_tensorflow_threads(DEFAULTS.tensorflow_intra_op_parallelism, DEFAULTS.tensorflow_inter_op_parallelism)
    runs = [_pipeline(models_dir, k, users, interactions) for models_dir in models_dirs]
    settle_heap()  # as the server does once a version and its catalog are loaded
    tallies = [bench.Tally() for _ in runs]
    stop_at = time.perf_counter() + duration
    n = 0
    while time.perf_counter() < stop_at:
        for turn, (pipeline, queries) in enumerate(runs):
            cpu_before, begun = bench.process_cpu_seconds(), time.perf_counter()
            pipeline.recommend([queries[n % len(queries)]])
            tallies[turn].latencies_ms.append((time.perf_counter() - begun) * 1000)
            tallies[turn].cpu_seconds += bench.process_cpu_seconds() - cpu_before
        n += 1
    return tallies


def _time_call(call, inputs: list, calls: int) -> tuple[float, float]:
    """Median ms a call, and CPU ms a call, over `calls` calls (the first run of a shape not counted)."""
    call(*inputs)
    times, cpu_before = [], bench.process_cpu_seconds()
    for _ in range(calls):
        begun = time.perf_counter()
        call(*inputs)["score"].numpy()
        times.append((time.perf_counter() - begun) * 1000)
    return sorted(times)[len(times) // 2], (bench.process_cpu_seconds() - cpu_before) * 1000 / calls


def model_call_costs(models_dir: Path, batch_sizes: list[int], k: int, calls: int = 60) -> list[str]:
    """The model call alone (retrieve and rank fused in one TensorFlow call, with the reasons of the
    best k explained in it, and without) for batches of known users, one TensorFlow thread as the
    server's: what every request costs before any Python or gRPC. One line per batch size."""
    import tensorflow as tf

    from recsys.server.backend import UserBatch
    from recsys.server.catalog import CatalogStore
    from recsys.server.in_process import InProcessBackend, _user_inputs, set_tensorflow_threads

    set_tensorflow_threads(DEFAULTS.tensorflow_intra_op_parallelism, DEFAULTS.tensorflow_inter_op_parallelism)
    backend, catalogs = InProcessBackend(models_dir, explains=True), CatalogStore(models_dir)
    if not backend.refresh(catalogs.get):
        raise SystemExit(f"no loadable model version in {models_dir}")
    users = sorted(catalogs.get(backend.current_version()).user_ids)
    call = backend.current.retrieve_and_rank[False]
    lines = []
    for size in batch_sizes:
        inputs = list(_user_inputs(UserBatch.of(users[:size])).values())
        explained = _time_call(call, [*inputs, tf.constant(k)], calls)
        unexplained = _time_call(call, [*inputs, tf.constant(0)], calls)
        lines.append(f"batch of {size:3d} users: with reasons {explained[0]:7.2f} ms a call, "
                     f"{explained[1] / size:.3f} CPU ms a user; without {unexplained[0]:7.2f} ms a call, "
                     f"{unexplained[1] / size:.3f} CPU ms a user")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys.server.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True, type=Path, nargs="+",
                        help="models directory written by 'python -m recsys.export train'; several: their calls "
                             "take turns, one figure block (and JSON object, in a list) each")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds to run (default: %(default)s)")
    parser.add_argument("-k", "--k", type=int, default=10, help="items per request (default: %(default)s)")
    parser.add_argument("--users", default="all",
                        help="'all' or N: draw user ids from the export's first N users; ~3%% are unknown ids "
                             "(cold start) (default: %(default)s)")
    parser.add_argument("--interactions", type=int, default=0, metavar="N",
                        help="N recent interactions with every request, as `python -m recsys.client bench --interactions` "
                             "(default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this path")
    parser.add_argument("--model-call", metavar="N,N,...",
                        help="instead: time the fused model call alone for batches of N known users, with and "
                             "without reasons, e.g. 1,8,16,32")
    args = parser.parse_args(argv)
    start_tensorflow()
    if args.model_call:
        try:
            sizes = [int(size) for size in args.model_call.split(",")]
        except ValueError:
            parser.error(f"--model-call takes comma-separated batch sizes; got {args.model_call!r}")
        if len(args.models) > 1:
            parser.error("--model-call times one export: give one --models")
        print("\n".join(model_call_costs(args.models[0], sizes, args.k)))
        return 0
    summaries = []
    for models_dir, tally in zip(args.models, run_in_process(args.models, args.duration, args.k, args.users,
                                                             args.interactions)):
        spent = sum(tally.latencies_ms) / 1000  # the time of this export's own calls
        summaries.append(bench.summarize(tally, spent, "in-process (no gRPC, 1 thread)", 1, args.k))
        if len(args.models) > 1:
            summaries[-1]["models"] = str(models_dir)
            print(f"== {models_dir}")
        print(bench.format_summary(summaries[-1]))
    if args.json:
        bench.write_json(summaries[0] if len(summaries) == 1 else summaries, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
