"""Write one trained pair as TF Serving SavedModels plus the metadata the server needs.

Layout (one integer version names one pair):
    DIR/retrieval/<v>/   SavedModel, signatures `serving_default`, `include_rated`, `similar_items`,
                         `rated_items` (who rated what lives in the graphs only)
    DIR/ranking/<v>/     SavedModel, signatures `serving_default` (scores), `explain` (reasons)
    DIR/metadata/<v>.json  titles, genres, popularity, the ids of the users trained on, preset
    DIR/models.config    ModelServerConfig for `tensorflow_model_server --model_config_file`
Each SavedModel has assets.extra/tf_serving_warmup_requests for --enable_model_warmup.
Metadata and ranking are written before retrieval: a version is complete once retrieval/<v> exists.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from recsys.export.serving import RankingServing, RetrievalServing
from recsys.server.layout import (
    DEFAULT_SIGNATURE,
    EXPLAIN_SIGNATURE,
    INCLUDE_RATED_SIGNATURE,
    INTERACTION_ITEMS_INPUT,
    INTERACTION_RATINGS_INPUT,
    ITEM_ID_INPUT,
    ITEM_IDS_INPUT,
    METADATA_DIR,
    RANKING_MODEL,
    RATED_ITEMS_SIGNATURE,
    RETRIEVAL_MODEL,
    SIMILAR_ITEMS_SIGNATURE,
    USER_ID_INPUT,
    WARMUP_FILE,
)


def next_version(out_dir: Path) -> int:
    """The next integer version unused by any model or metadata in out_dir (never overwrite a served one)."""
    used = [int(p.name) for name in (RETRIEVAL_MODEL, RANKING_MODEL) if (out_dir / name).is_dir()
            for p in (out_dir / name).iterdir() if p.name.isdigit()]
    metadata_dir = out_dir / METADATA_DIR
    if metadata_dir.is_dir():
        used += [int(p.stem) for p in metadata_dir.glob("*.json") if p.stem.isdigit()]
    return max(used, default=0) + 1


def warmup_requests(model_name: str, signature_name: str, inputs: list[dict[str, list]]) -> list[bytes]:
    """PredictionLog records for assets.extra: one Predict request per `inputs` entry (lists of strings,
    or of floats for ratings)."""
    records = []
    for request_inputs in inputs:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature_name))
        for key, values in request_inputs.items():
            dtype = tf.float32 if key == INTERACTION_RATINGS_INPUT else tf.string
            request.inputs[key].CopyFrom(tf.make_tensor_proto(values, dtype=dtype))
        log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        records.append(log.SerializeToString())
    return records


def warmup_inputs(user_ids: list[str], item_ids: list[str]) -> list[dict[str, list]]:
    """Requests for the user-side inputs: each user alone, all together, a user with interactions
    (one rated, one not), and an unknown user with interactions only."""
    def request(users: list[str], interactions: list[tuple[str, float]]) -> dict[str, list]:
        return {USER_ID_INPUT: users, INTERACTION_ITEMS_INPUT: [[item for item, _ in interactions]] * len(users),
                INTERACTION_RATINGS_INPUT: [[stars for _, stars in interactions]] * len(users)}

    recent = [(item_ids[0], 4.0), (item_ids[-1], 0.0)]
    return ([request([user], []) for user in user_ids] + [request(user_ids, [])]
            + [request(user_ids[:1], recent), request(["\x00warmup-unknown-user"], recent)])


def _save(module: tf.Module, signatures: dict, target: Path, warmup: list[bytes]) -> None:
    """Save into a hidden sibling, then rename: TF Serving never sees a half-written version."""
    staging = target.parent / f".staging-{target.name}"
    shutil.rmtree(staging, ignore_errors=True)
    # Keras warns that subclassed models have no get_config; SavedModel does not need one.
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")
    try:
        tf.saved_model.save(module, str(staging), signatures=signatures)
    finally:
        logger.setLevel(level)
    extra = staging / "assets.extra"
    extra.mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(extra / WARMUP_FILE)) as writer:
        for record in warmup:
            writer.write(record)
    staging.rename(target)


def write_models_config(out_dir: Path) -> Path:
    config = model_server_config_pb2.ModelServerConfig()
    for name in (RETRIEVAL_MODEL, RANKING_MODEL):
        entry = config.model_config_list.config.add()
        entry.name = name
        entry.base_path = str((out_dir / name).resolve())
        entry.model_platform = "tensorflow"
        # Keep two versions so a client pinned to the previous pair still resolves during a rollout.
        entry.model_version_policy.latest.num_versions = 2
    path = out_dir / "models.config"
    path.write_text(text_format.MessageToString(config))
    return path


def write_export(out_dir: Path, retrieval: RetrievalServing, ranking: RankingServing, metadata: dict,
                 warmup_user_ids: list[str]) -> int:
    """Write retrieval, ranking and metadata under the next free version; return it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (RETRIEVAL_MODEL, RANKING_MODEL, METADATA_DIR):
        (out_dir / name).mkdir(exist_ok=True)
    version = next_version(out_dir)
    popular = metadata["popular_item_ids"]
    user_requests = warmup_inputs(warmup_user_ids, popular[:8])
    retrieval_warmup = warmup_requests(RETRIEVAL_MODEL, DEFAULT_SIGNATURE, user_requests)
    retrieval_warmup += warmup_requests(RETRIEVAL_MODEL, INCLUDE_RATED_SIGNATURE, user_requests[-2:])
    retrieval_warmup += warmup_requests(RETRIEVAL_MODEL, SIMILAR_ITEMS_SIGNATURE,
                                        [{**inputs, ITEM_ID_INPUT: popular[:len(inputs[USER_ID_INPUT])]}
                                         for inputs in user_requests[-3:]])
    retrieval_warmup += warmup_requests(RETRIEVAL_MODEL, RATED_ITEMS_SIGNATURE,
                                        [{USER_ID_INPUT: inputs[USER_ID_INPUT]} for inputs in user_requests[-3:]])
    with_candidates = [{**inputs, ITEM_IDS_INPUT: [popular[:8]] * len(inputs[USER_ID_INPUT])} for inputs in user_requests]
    ranking_warmup = warmup_requests(RANKING_MODEL, DEFAULT_SIGNATURE, with_candidates)
    ranking_warmup += warmup_requests(RANKING_MODEL, EXPLAIN_SIGNATURE, with_candidates[-3:])
    # Metadata, then ranking, then retrieval: whoever sees retrieval/<v> finds the rest of the pair.
    metadata = {**metadata, "model_version": version}
    staging = out_dir / METADATA_DIR / f".{version}.json.tmp"
    staging.write_text(json.dumps(metadata))
    staging.rename(out_dir / METADATA_DIR / f"{version}.json")
    _save(ranking, {DEFAULT_SIGNATURE: ranking.rank, EXPLAIN_SIGNATURE: ranking.explain},
          out_dir / RANKING_MODEL / str(version), ranking_warmup)
    _save(retrieval, {DEFAULT_SIGNATURE: retrieval.retrieve, INCLUDE_RATED_SIGNATURE: retrieval.retrieve_including_rated,
                      SIMILAR_ITEMS_SIGNATURE: retrieval.similar_items, RATED_ITEMS_SIGNATURE: retrieval.rated_items},
          out_dir / RETRIEVAL_MODEL / str(version), retrieval_warmup)
    write_models_config(out_dir)
    return version
