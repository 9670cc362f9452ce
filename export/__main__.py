"""python -m recsys.export {train,evaluate,report,synth,sizes,index-bench,data-bench}: the offline half of the recommender."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import recsys.export  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from recsys.export.data import (
    CSV_ITEMS_HEADER,
    CSV_RATINGS_HEADER,
    DATASETS,
    DEFAULT_SHUFFLE_BUFFER,
    HOLDOUTS,
    PROTOCOLS,
    USER_HOLDOUTS,
    DataFormatError,
    DataSourceError,
)
from recsys.export.data_bench import MODES as DATA_BENCH_MODES
from recsys.export.data_bench import STORE_MODE as DATA_BENCH_STORE_MODE
from recsys.export.presets import PRESETS, STRATEGIES
from recsys.export.synth import FORMATS
from recsys.server import start_tensorflow

DATA_HELP = ("directory holding the data set's files (ML-100k: u.data, u.item, u.user). Default: "
             "$RECSYS_DATA_DIR, then ./data/<dataset>, then download <dataset>.zip from GroupLens into "
             "~/.cache/recsys ($RECSYS_CACHE_DIR) and verify its sha256")
DATASET_HELP = ("which data: ml-100k (default), ml-1m (::-separated .dat files), ml-20m or ml-25m "
                "(ratings.csv and movies.csv, half-star ratings), or csv: a catalog of your own in --ratings and "
                "--items")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help=DATA_HELP)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="ml-100k", help=DATASET_HELP)
    parser.add_argument("--ratings", type=Path, help=f"with --dataset csv: the ratings, a CSV file with the header "
                                                      f"'{CSV_RATINGS_HEADER}' (ids any string of 1 to 128 characters, "
                                                      f"0.5 to 5 stars in steps of 0.5, Unix seconds)")
    parser.add_argument("--items", type=Path, help=f"with --dataset csv: the movies, a CSV file with the header "
                                                    f"'{CSV_ITEMS_HEADER}' (genres separated by |)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys.export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train both stages and export them as the next model version")
    train.add_argument("--preset", choices=sorted(PRESETS), default="default", help="hyperparameter set (default: %(default)s)")
    train.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                       help="override one field of the preset, e.g. --set ensemble_size=1 (repeatable; tuples as "
                            "256,64); the export's metadata records the values trained with")
    add_data_arguments(train)
    train.add_argument("--interactions-db", metavar="PATH|URL",
                       help="also train on the ratings recorded through the service (RecordInteractions) in this "
                            "interaction store: an SQLite file or a postgresql:// URL, as given to the server. Users "
                            "new to the data set join the vocabulary; movies outside the catalog and rating-less "
                            "interactions are counted and skipped; the evaluation split stays the data set's own")
    train.add_argument("--out", required=True, type=Path, help="models directory (TF Serving layout); a new version is added")
    train.add_argument("--holdout", choices=HOLDOUTS, default="test",
                       help="'test' (default) trains on the fixed train split: the version to serve and report. "
                            "'validation' trains on train minus a validation split carved from it, for tuning; "
                            "'evaluate' then scores that version on the validation split, never on test. "
                            "'users' keeps 20%% of the users out of training entirely, for the fold-in protocol; "
                            "'users-validation' keeps out 20%% of the others as well and scores those, for tuning")
    train.add_argument("--strategy", choices=STRATEGIES, default="default",
                       help="tf.distribute strategy: 'multi-worker' trains with MultiWorkerMirroredStrategy on the "
                            "cluster in $TF_CONFIG (start the same command on every worker); only the chief "
                            "writes the export (default: %(default)s)")
    train.add_argument("--synthetic-items", type=int, default=0, metavar="N",
                       help="benchmarks only: pad the retrieval index with N synthetic movies (ids 'synthetic-<n>', "
                            "random embeddings, no titles) to measure retrieval cost at catalog scale")
    train.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                       help="read the ratings through tf.data from the file, block by block, instead of loading "
                            "them into memory: for data larger than memory. Same split, same export. "
                            "Default: on for ml-20m and ml-25m, off otherwise")
    train.add_argument("--shuffle-buffer", type=int, default=DEFAULT_SHUFFLE_BUFFER, metavar="ROWS",
                       help="with --stream: rows held in the shuffle buffer; MovieLens files are sorted by user, "
                            "so larger mixes better (default: %(default)s)")

    evaluate = commands.add_parser("evaluate", help="score the newest exported version with the baselines, on the test "
                                                    "split (or the validation split, for a --holdout validation export)")
    evaluate.add_argument("--models", required=True, type=Path, help="models directory written by 'train'")
    add_data_arguments(evaluate)
    evaluate.add_argument("--protocol", choices=PROTOCOLS,
                          help="random: the row split's test pairs; fold-in: users held out of training, 80%% of "
                               "their ratings sent as interactions, the rest the targets (an export trained with "
                               "--holdout users); recent: the earliest half of each test user's test ratings sent "
                               "as interactions, scored on the rest, against the same requests without them. "
                               "Default: fold-in for a --holdout users export, else random")
    evaluate.add_argument("--json", type=Path, help="also write the metrics as JSON to this path")
    evaluate.add_argument("--plot", type=Path, help="also write a PNG of HR@k, k = 1..100, for every system")

    report = commands.add_parser("report", help="train presets into fresh model dirs, evaluate each with the "
                                                "baselines, print the README's results table")
    report.add_argument("--out", required=True, type=Path, help="directory for one models dir per preset")
    report.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["seed", "default"])
    report.add_argument("--data-dir", help=DATA_HELP)
    report.add_argument("--plot", type=Path, help="also write a PNG of HR@k, k = 1..100, for every system")

    synth = commands.add_parser("synth", help="write a synthetic data set with planted structure (tastes, genres, "
                                              "popularity, sessions) at any size, to measure training at scale")
    synth.add_argument("--users", type=int, required=True, help="users (each rates at least 20 movies)")
    synth.add_argument("--items", type=int, required=True, help="movies")
    synth.add_argument("--ratings", type=int, required=True, help="ratings in all (about; each user rates a movie once)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    synth.add_argument("--format", choices=FORMATS, default="csv", dest="data_format",
                       help="csv: the documented CSV format with string ids (ratings.csv, items.csv; train with "
                            "--dataset csv); ml-25m: MovieLens 25M's files with integer ids (train with --dataset ml-25m "
                            "--data-dir OUT) (default: %(default)s)")
    synth.add_argument("--out", type=Path, required=True, help="directory to write into")

    sizes = commands.add_parser("sizes", help="what an export's tables cost in memory (the server holds them, twice "
                                              "during a hot swap): per user, per movie, per rating, per model")
    sizes.add_argument("--models", type=Path, required=True, help="the export's directory")
    sizes.add_argument("--model-version", type=int, help="default: the newest complete version")

    index_bench = commands.add_parser("index-bench", help="brute force against the partitioned retrieval index by "
                                                          "catalog size, on synthetic embeddings: latency and recall")
    index_bench.add_argument("--movies", default="20000,50000,100000,300000,1000000", metavar="N,N,...",
                             help="catalog sizes to measure (default: %(default)s)")
    index_bench.add_argument("--unstructured", action="store_true",
                             help="movies drawn independently, no planted tastes: the worst case for the partitioned index")

    bench = commands.add_parser("data-bench", help="measure reading the ratings for training, streamed (--stream) "
                                                   "and in memory: prepare time, one epoch, peak RSS, each mode in "
                                                   "its own process")
    bench.add_argument("--data-dir", help=DATA_HELP)
    bench.add_argument("--dataset", choices=sorted(DATASETS), default="ml-100k", help=DATASET_HELP)
    bench.add_argument("--synthetic-rows", type=int, default=0, metavar="N",
                       help="instead of --data-dir, write N synthetic ratings in ML-25M's format to a temporary "
                            "directory and measure those")
    bench.add_argument("--batch-size", type=int, default=8192, help="rows per batch (default: %(default)s)")
    bench.add_argument("--interactions-db", metavar="PATH|URL",
                       help="also measure the data in memory with this interaction store's ratings added, as "
                            "'train --interactions-db' reads them")
    bench.add_argument("--measure", choices=(*DATA_BENCH_MODES, DATA_BENCH_STORE_MODE), help=argparse.SUPPRESS)

    args = parser.parse_args(argv)
    if args.command == "synth":
        from recsys.export.synth import synthesize

        try:
            synthesize(args.users, args.items, args.ratings, args.out, args.seed, args.data_format)
        except ValueError as error:
            parser.error(str(error))
        return 0
    if args.command == "train":
        try:
            preset = PRESETS[args.preset].with_overrides(args.overrides)
        except ValueError as error:
            parser.error(str(error))
        if args.holdout in USER_HOLDOUTS and (args.stream or args.stream is None and DATASETS[args.dataset].stream_by_default):
            parser.error(f"--holdout {args.holdout} splits users, which needs the ratings in memory: add --no-stream")
    if args.command == "data-bench":
        return data_bench(args)
    start_tensorflow()
    if args.command == "index-bench":
        from recsys.export import index_bench

        try:
            sizes = [int(size) for size in args.movies.split(",")]
        except ValueError:
            print(f"error: --movies takes comma-separated counts; got {args.movies!r}", file=sys.stderr)
            return 2
        print(index_bench.format_results(index_bench.run(sizes, structured=not args.unstructured)))
        return 0
    if args.command == "sizes":
        from recsys.export.sizes import format_sizes, model_sizes

        try:
            print(format_sizes(model_sizes(args.models, args.model_version)))
        except FileNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    from recsys.export.data import load_csv, load_movielens

    dataset = getattr(args, "dataset", "ml-100k")
    if (dataset == "csv") != bool(getattr(args, "ratings", None) and getattr(args, "items", None)):
        parser.error("--dataset csv takes --ratings FILE and --items FILE, and they need --dataset csv")
    stream = args.command == "train" and (DATASETS[dataset].stream_by_default if args.stream is None else args.stream)
    if args.command == "train" and args.interactions_db and stream:
        parser.error("--interactions-db needs the ratings in memory: add --no-stream")
    try:
        data = load_csv(args.ratings, args.items) if dataset == "csv" else load_movielens(args.data_dir, dataset,
                                                                                         with_ratings=not stream)
    except (DataSourceError, DataFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command == "train":
        from recsys.export.stored import stored_ratings
        from recsys.export.train import train_and_export
        from recsys.server.errors import StoreUnavailable

        if args.interactions_db == "none":
            parser.error("--interactions-db none: name the store to read (a path or a postgresql:// URL)")
        try:
            stored = stored_ratings(args.interactions_db, data) if args.interactions_db else None
            train_and_export(data, preset, args.out, args.holdout, args.synthetic_items, args.strategy,
                             args.shuffle_buffer, stored, frozenset(field.partition("=")[0] for field in args.overrides))
        except (DataFormatError, StoreUnavailable) as error:  # a streamed file is checked as it is read
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    if args.command == "report":
        from recsys.export.report import run_report

        print(run_report(data, args.presets, args.out, args.plot))
        return 0
    from recsys.export.evaluate import evaluate_export, format_table, write_json, write_plot
    from recsys.server.errors import ModelsUnavailable

    try:
        metrics = evaluate_export(args.models, data, args.protocol)
    except ModelsUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    if args.json:
        write_json(metrics, args.json)
    if args.plot:
        write_plot(metrics["hr_curve"], args.plot, f"model version {metrics['model_version']} ({metrics['preset']}), "
                                                   f"{metrics['protocol']} protocol, {metrics['holdout']} holdout")
    return 0


def data_bench(args: argparse.Namespace) -> int:
    from recsys.export import data_bench as bench

    try:
        if args.measure:  # one mode, in the child process `run` starts
            print(json.dumps(bench.measure(args.measure, args.data_dir, args.dataset, args.batch_size,
                                           args.interactions_db)))
        else:
            print(bench.format_results(bench.run(args.data_dir, args.dataset, args.synthetic_rows, args.batch_size,
                                                 args.interactions_db)))
    except (DataSourceError, DataFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
