"""python -m export {train,evaluate}: the offline half of the recommender."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import export  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from export.data import DataFormatError, DataSourceError
from export.presets import PRESETS

DATA_HELP = ("MovieLens 100k directory (u.data, u.item, u.user). Default: $RECSYS_DATA_DIR, "
             "then ./data/ml-100k, then download ml-100k.zip from GroupLens into ~/.cache/recsys "
             "($RECSYS_CACHE_DIR) and verify its sha256")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train both stages and export them as the next model version")
    train.add_argument("--preset", choices=sorted(PRESETS), default="default", help="hyperparameter set (default: %(default)s)")
    train.add_argument("--data-dir", help=DATA_HELP)
    train.add_argument("--out", required=True, type=Path, help="models directory (TF Serving layout); a new version is added")

    evaluate = commands.add_parser("evaluate", help="score the newest exported version on the test split, with baselines")
    evaluate.add_argument("--models", required=True, type=Path, help="models directory written by 'train'")
    evaluate.add_argument("--data-dir", help=DATA_HELP)
    evaluate.add_argument("--json", type=Path, help="also write the metrics as JSON to this path")

    args = parser.parse_args(argv)
    from export.data import load_movielens

    try:
        data = load_movielens(args.data_dir)
    except (DataSourceError, DataFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command == "train":
        from export.train import train_and_export

        train_and_export(data, PRESETS[args.preset], args.out)
        return 0
    from export.evaluate import evaluate_export, format_table, write_json

    metrics = evaluate_export(args.models, data)
    print(format_table(metrics))
    if args.json:
        write_json(metrics, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
