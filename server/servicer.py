"""The gRPC servicer (grpc.aio): admit, validate, delegate to the pipeline, stream. Nothing else lives here.

Nothing that blocks runs on the event loop: the pipeline runs on the batcher's threads (or a
pool when batching is off), metadata is read and large batches are validated on worker
threads, and the loop only awaits them, so health checks and other calls never wait behind them.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from concurrent import futures
from typing import Iterator, Sequence

import grpc

from recsys.server.backend import Backend, Deadline
from recsys.server.batching import RequestBatcher, ThreadedPipeline
from recsys.server.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelsUnavailable,
    NotConfigured,
    Overloaded,
    StoreUnavailable,
)
from recsys.server.limits import (
    DEFAULT_K,
    MAX_BATCH_INTERACTIONS,
    MAX_BATCH_USERS,
    MAX_EXCLUDED_ITEMS,
    MAX_ITEM_ID_LENGTH,
    MAX_K,
    MAX_RECENT_INTERACTIONS,
    MAX_USER_ID_LENGTH,
)
from recsys.server.observability import CallRecord, Observer
from recsys.server.pipeline import RankedList, Recommendation
from recsys.server.security import Authenticator
from recsys.server.sending import UnsentBytes
from recsys.server.status import map_errors
from recsys.server.store import InteractionStore
from recsys.server.validation import (
    Interaction,
    Query,
    check_user_id,
    make_query,
    make_similar_query,
    validate_interactions,
)
from recsys.v1 import ITEM_TITLE_METADATA, UNKNOWN_INTERACTIONS_METADATA, recommender_pb2, recommender_pb2_grpc

# One line per erasure: who asked, for whom, when (kept apart from the request log).
audit = logging.getLogger("recsys.audit")

# A Recommend with more interactions than this is validated on a worker thread, not on the event loop.
LARGE_REQUEST_INTERACTIONS = 100
STORE_THREADS = 4
# Store calls (RecordInteractions, ForgetUser) waiting for those threads beyond this get UNAVAILABLE at
# once: a hung store (a frozen host answers nothing, and nothing times out) queues nothing more.
MAX_WAITING_STORE_CALLS = 32
# SimilarItems runs beside the batches on threads of its own: slow ones queue there, never in the
# worker pool that validation, metadata and large responses use.
SIMILAR_THREADS = 2


def _interactions(entries) -> list[Interaction]:
    return [Interaction(entry.item_id, entry.rating, entry.timestamp_seconds) for entry in entries]


def _query(request: recommender_pb2.RecommendRequest) -> Query:
    return make_query(request.user_id, request.k, request.exclude_item_ids, request.include_rated,
                      _interactions(request.recent_interactions))


def _batch_queries(request: recommender_pb2.RecommendBatchRequest) -> list[Query]:
    if len(request.requests) > MAX_BATCH_USERS:
        raise InvalidRequest(f"requests has {len(request.requests)} entries; the maximum is {MAX_BATCH_USERS}")
    excluded = sum(len(entry.exclude_item_ids) for entry in request.requests)
    if excluded > MAX_EXCLUDED_ITEMS:
        raise InvalidRequest(f"requests[*].exclude_item_ids hold {excluded} ids in all; the maximum over a batch is "
                             f"{MAX_EXCLUDED_ITEMS}")
    interactions = sum(len(entry.recent_interactions) for entry in request.requests)
    if interactions > MAX_BATCH_INTERACTIONS:
        raise InvalidRequest(f"requests[*].recent_interactions hold {interactions} entries in all; the maximum over "
                             f"a batch is {MAX_BATCH_INTERACTIONS}")
    queries = []
    for position, entry in enumerate(request.requests):
        try:
            queries.append(_query(entry))
        except InvalidRequest as error:
            raise InvalidRequest(f"requests[{position}]: {error}") from None
    return queries


def _batch_response(queries: list[Query],
                    results: list[RankedList]) -> tuple[recommender_pb2.RecommendBatchResponse, int]:
    """The response and its size in bytes (what it holds in memory until the client reads it)."""
    response = recommender_pb2.RecommendBatchResponse(results=[
        recommender_pb2.Recommendations(user_id=query.user_id, items=[to_proto(item) for item in result.items],
                                        unknown_interactions=result.unknown_interactions)
        for query, result in zip(queries, results)])
    return response, response.ByteSize()


def to_proto(item: Recommendation) -> recommender_pb2.RankedItem:
    return recommender_pb2.RankedItem(
        rank=item.rank, item_id=item.item_id, title=item.title, genres=item.genres, score=item.score,
        retrieval_score=item.retrieval_score, predicted_rating=item.predicted_rating,
        model_version=item.model_version, fallback=item.fallback, because_item_ids=item.because_item_ids,
        because_titles=item.because_titles)


def _note(record: CallRecord, queries: Sequence[Query], results: list[RankedList]) -> None:
    items = [item for result in results for item in result.items]
    record.item_count = len(items)
    record.fallback_count = sum(item.fallback for item in items)
    record.model_version = items[0].model_version if items else ""
    record.interaction_count = sum(len(query.recent_interactions) for query in queries)
    record.unknown_interaction_count = sum(result.unknown_interactions for result in results)
    record.stored_interaction_count = sum(result.stored_interactions for result in results)


def _recorded(request: recommender_pb2.RecordInteractionsRequest) -> tuple[str, list[Interaction]]:
    interactions = _interactions(request.interactions)
    validate_interactions(interactions, "interactions")
    return check_user_id(request.user_id), interactions


class RecommenderServicer(recommender_pb2_grpc.RecommenderServicer):
    def __init__(self, pipeline: RequestBatcher | ThreadedPipeline, backend: Backend, observer: Observer,
                 max_concurrent_rpcs: int, store: InteractionStore | None = None, stored_interactions: int = 0,
                 authenticator: Authenticator | None = None, send_stall_seconds: float = 10.0):
        """`authenticator`: who may call what (server/security.py); none: anyone, anything.
        `send_stall_seconds`: how long a stream may take to send what it has (server/sending.py)."""
        self.authenticator = authenticator or Authenticator()
        self.send_stall_seconds = send_stall_seconds
        self.unsent = UnsentBytes()
        self.pipeline = pipeline
        self.similar = pipeline.pipeline.similar
        self.backend = backend
        self.observer = observer
        self.store = store
        self.stored_interactions = stored_interactions if store is not None else 0
        # Writes have threads of their own: a slow store never holds up the pipeline or other work.
        self.store_threads = futures.ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="store")
        self.store_calls = 0  # store calls running or waiting for those threads (the event loop's own count)
        self.similar_threads = futures.ThreadPoolExecutor(SIMILAR_THREADS, thread_name_prefix="similar")
        # Admission control: calls at work beyond this are refused at once. Only this service's
        # calls count; health checks and Watch streams never do.
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.working = 0  # calls validating, in the pipeline or in the store (the event loop's own count)
        self.accepting = True  # false once shutdown starts: new calls get UNAVAILABLE

    @contextlib.contextmanager
    def _working(self, needs_models: bool = True) -> Iterator[None]:
        """Admission control around a call's work: counts calls validating, in the pipeline or in the
        store, not calls sending what they already have, so a client that never reads its stream holds
        a stream open but never a slot. Runs on the event loop only: no lock."""
        if not self.accepting:
            raise ModelsUnavailable("server is shutting down; retry (another replica)")
        if self.working >= self.max_concurrent_rpcs:
            raise Overloaded(f"the server is at its limit of {self.max_concurrent_rpcs} calls at work; retry later")
        if needs_models and not self.backend.is_ready():
            raise ModelsUnavailable(f"not serving: {self.backend.not_ready_reason()}; retry later")
        self.working += 1
        try:
            yield
        finally:
            self.working -= 1

    def _store(self) -> InteractionStore:
        if self.store is None:
            raise NotConfigured("this server keeps no interaction store (started with --interactions-db none)")
        return self.store

    async def _in_store(self, context: grpc.aio.ServicerContext, work, *args):
        """Run a store call on the store's threads, within the caller's deadline (a call still waiting
        for a thread then is dropped; one running may still apply, as the proto says)."""
        if self.store_calls >= STORE_THREADS + MAX_WAITING_STORE_CALLS:
            raise StoreUnavailable(f"the interaction store has {self.store_calls} calls in progress and is not "
                                   "answering them; retry later")
        self.store_calls += 1
        loop = asyncio.get_running_loop()
        call = self.store_threads.submit(work, *args)
        # Counted until the call itself ends (on a store thread), not when its caller stops waiting.
        call.add_done_callback(lambda _: self._store_call_done(loop))
        try:
            # On timeout the call is dropped if it has not started; one running goes on.
            return await asyncio.wait_for(asyncio.wrap_future(call), context.time_remaining())
        except asyncio.TimeoutError:
            raise DeadlineExceeded("deadline exceeded before the interaction store answered") from None

    def _store_call_done(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the thread that ran (or cancelled) the call: count it off on the event loop."""
        def count_off() -> None:
            self.store_calls -= 1
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped
            loop.call_soon_threadsafe(count_off)

    async def _recommend(self, queries: Sequence[Query], context: grpc.aio.ServicerContext,
                         record: CallRecord) -> list[RankedList]:
        """Run the pipeline within the caller's deadline; a caller that goes away is dropped from its batch."""
        gone = threading.Event()
        context.add_done_callback(lambda _: gone.set())
        timeout = context.time_remaining()
        future = self.pipeline.submit(queries, Deadline(timeout, gone.is_set, record.stage_seconds))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            future.cancel()
            raise DeadlineExceeded("deadline exceeded before the recommendation was complete") from None

    @map_errors
    async def Recommend(self, request, context, record: CallRecord):
        record.user_ids = [request.user_id[:MAX_USER_ID_LENGTH]]
        with self._working():
            if len(request.recent_interactions) > LARGE_REQUEST_INTERACTIONS:  # validating 1,000 is not for the loop
                query = await asyncio.to_thread(_query, request)
            else:
                query = _query(request)
            results = await self._recommend([query], context, record)
        _note(record, [query], results)
        if results[0].unknown_interactions:
            context.set_trailing_metadata(((UNKNOWN_INTERACTIONS_METADATA, str(results[0].unknown_interactions)),))
        streaming_started = time.perf_counter()
        for item in results[0].items:
            yield to_proto(item)
        # Each streamed item is a message of its own: what the stream costs is worth seeing.
        record.stage_seconds["stream"] = time.perf_counter() - streaming_started

    @map_errors
    async def RecommendBatch(self, request, context, record: CallRecord):
        record.user_ids = [entry.user_id[:MAX_USER_ID_LENGTH] for entry in request.requests[:MAX_BATCH_USERS]]
        with self._working():
            queries = await asyncio.to_thread(_batch_queries, request)
            results = await self._recommend(queries, context, record)
            _note(record, queries, results)
            response, size = await asyncio.to_thread(_batch_response, queries, results)  # 10,000 items: not on the loop
        self.unsent.hold(context, size)  # until it is sent: a client that never reads holds this memory
        return response

    @map_errors
    async def SimilarItems(self, request, context, record: CallRecord):
        record.user_ids = [request.user_id[:MAX_USER_ID_LENGTH]]
        with self._working():
            query = make_similar_query(request.item_id, request.k, request.exclude_item_ids, request.user_id)
            # A call of its own (not batched): run beside the batches, within the caller's deadline (one
            # still waiting for a thread then is dropped).
            gone = threading.Event()
            context.add_done_callback(lambda _: gone.set())
            timeout = context.time_remaining()
            similar = asyncio.get_running_loop().run_in_executor(
                self.similar_threads, self.similar, query, Deadline(timeout, gone.is_set, record.stage_seconds))
            try:
                items = await asyncio.wait_for(similar, timeout)
            except asyncio.TimeoutError:
                raise DeadlineExceeded("deadline exceeded before the similar items were found") from None
        record.item_count = len(items)
        record.model_version = items[0].model_version if items else ""
        if items:
            title = self.pipeline.pipeline.catalogs.get(items[0].model_version).titles.get(query.item_id, "")
            context.set_trailing_metadata(((ITEM_TITLE_METADATA, title.encode("utf-8")),))
        for item in items:
            yield to_proto(item)

    @map_errors
    async def RecordInteractions(self, request, context, record: CallRecord):
        record.user_ids = [request.user_id[:MAX_USER_ID_LENGTH]]
        with self._working(needs_models=False):
            store = self._store()
            user_id, interactions = await asyncio.to_thread(_recorded, request)
            record.interaction_count = len(interactions)
            recorded = await self._in_store(context, store.record, user_id, interactions)
        return recommender_pb2.RecordInteractionsResponse(recorded=recorded)

    @map_errors
    async def ForgetUser(self, request, context, record: CallRecord):
        record.user_ids = [request.user_id[:MAX_USER_ID_LENGTH]]
        with self._working(needs_models=False):
            store = self._store()
            forgotten = await self._in_store(context, store.forget, check_user_id(request.user_id))
        audit.info(json.dumps({"event": "erasure", "user_id": self.observer.logged_user_id(request.user_id),
                               "by": record.principal.name,
                               "request_id": record.request_id, "at": int(time.time()), "forgotten": forgotten}))
        record.interaction_count = forgotten
        return recommender_pb2.ForgetUserResponse(forgotten=forgotten)

    @map_errors
    async def GetModelInfo(self, request, context, record: CallRecord):
        with self._working():
            catalog = await asyncio.to_thread(self.pipeline.current_catalog)  # parsing metadata is not for the loop
        return recommender_pb2.ModelInfo(
            model_version=catalog.model_version, backend=self.backend.name, candidate_count=catalog.candidate_count,
            preset=catalog.preset.get("name", ""), default_k=DEFAULT_K, max_k=MAX_K,
            max_exclude_item_ids=MAX_EXCLUDED_ITEMS, max_batch_requests=MAX_BATCH_USERS,
            max_user_id_length=MAX_USER_ID_LENGTH, max_item_id_length=MAX_ITEM_ID_LENGTH,
            max_recent_interactions=MAX_RECENT_INTERACTIONS, interaction_store=self.store.kind if self.store else "",
            stored_interactions=self.stored_interactions, **catalog.index_summary())
