from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecordInteractionsRequest(_message.Message):
    __slots__ = ("user_id", "interactions")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    interactions: _containers.RepeatedCompositeFieldContainer[Interaction]
    def __init__(self, user_id: _Optional[str] = ..., interactions: _Optional[_Iterable[_Union[Interaction, _Mapping]]] = ...) -> None: ...

class RecordInteractionsResponse(_message.Message):
    __slots__ = ("recorded",)
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    recorded: int
    def __init__(self, recorded: _Optional[int] = ...) -> None: ...

class ForgetUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class ForgetUserResponse(_message.Message):
    __slots__ = ("forgotten",)
    FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    forgotten: int
    def __init__(self, forgotten: _Optional[int] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "k", "exclude_item_ids", "include_rated", "recent_interactions")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RATED_FIELD_NUMBER: _ClassVar[int]
    RECENT_INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    include_rated: bool
    recent_interactions: _containers.RepeatedCompositeFieldContainer[Interaction]
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., include_rated: _Optional[bool] = ..., recent_interactions: _Optional[_Iterable[_Union[Interaction, _Mapping]]] = ...) -> None: ...

class Interaction(_message.Message):
    __slots__ = ("item_id", "rating", "timestamp_seconds")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    rating: float
    timestamp_seconds: int
    def __init__(self, item_id: _Optional[str] = ..., rating: _Optional[float] = ..., timestamp_seconds: _Optional[int] = ...) -> None: ...

class RankedItem(_message.Message):
    __slots__ = ("rank", "item_id", "title", "genres", "score", "retrieval_score", "predicted_rating", "model_version", "fallback", "because_item_ids", "because_titles")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    GENRES_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_RATING_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    BECAUSE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    BECAUSE_TITLES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    item_id: str
    title: str
    genres: _containers.RepeatedScalarFieldContainer[str]
    score: float
    retrieval_score: float
    predicted_rating: float
    model_version: str
    fallback: bool
    because_item_ids: _containers.RepeatedScalarFieldContainer[str]
    because_titles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rank: _Optional[int] = ..., item_id: _Optional[str] = ..., title: _Optional[str] = ..., genres: _Optional[_Iterable[str]] = ..., score: _Optional[float] = ..., retrieval_score: _Optional[float] = ..., predicted_rating: _Optional[float] = ..., model_version: _Optional[str] = ..., fallback: _Optional[bool] = ..., because_item_ids: _Optional[_Iterable[str]] = ..., because_titles: _Optional[_Iterable[str]] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("item_id", "k", "exclude_item_ids", "user_id")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    k: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    user_id: str
    def __init__(self, item_id: _Optional[str] = ..., k: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., user_id: _Optional[str] = ...) -> None: ...

class RecommendBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RecommendRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RecommendRequest, _Mapping]]] = ...) -> None: ...

class Recommendations(_message.Message):
    __slots__ = ("user_id", "items", "unknown_interactions")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    items: _containers.RepeatedCompositeFieldContainer[RankedItem]
    unknown_interactions: int
    def __init__(self, user_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[RankedItem, _Mapping]]] = ..., unknown_interactions: _Optional[int] = ...) -> None: ...

class RecommendBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Recommendations]
    def __init__(self, results: _Optional[_Iterable[_Union[Recommendations, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_version", "backend", "candidate_count", "preset", "default_k", "max_k", "max_exclude_item_ids", "max_batch_requests", "max_user_id_length", "max_item_id_length", "max_recent_interactions", "interaction_store", "stored_interactions", "retrieval_index", "index_movies", "index_cells", "index_probes", "index_recall")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_K_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_USER_ID_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEM_ID_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_RECENT_INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    INTERACTION_STORE_FIELD_NUMBER: _ClassVar[int]
    STORED_INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_INDEX_FIELD_NUMBER: _ClassVar[int]
    INDEX_MOVIES_FIELD_NUMBER: _ClassVar[int]
    INDEX_CELLS_FIELD_NUMBER: _ClassVar[int]
    INDEX_PROBES_FIELD_NUMBER: _ClassVar[int]
    INDEX_RECALL_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    backend: str
    candidate_count: int
    preset: str
    default_k: int
    max_k: int
    max_exclude_item_ids: int
    max_batch_requests: int
    max_user_id_length: int
    max_item_id_length: int
    max_recent_interactions: int
    interaction_store: str
    stored_interactions: int
    retrieval_index: str
    index_movies: int
    index_cells: int
    index_probes: int
    index_recall: float
    def __init__(self, model_version: _Optional[str] = ..., backend: _Optional[str] = ..., candidate_count: _Optional[int] = ..., preset: _Optional[str] = ..., default_k: _Optional[int] = ..., max_k: _Optional[int] = ..., max_exclude_item_ids: _Optional[int] = ..., max_batch_requests: _Optional[int] = ..., max_user_id_length: _Optional[int] = ..., max_item_id_length: _Optional[int] = ..., max_recent_interactions: _Optional[int] = ..., interaction_store: _Optional[str] = ..., stored_interactions: _Optional[int] = ..., retrieval_index: _Optional[str] = ..., index_movies: _Optional[int] = ..., index_cells: _Optional[int] = ..., index_probes: _Optional[int] = ..., index_recall: _Optional[float] = ...) -> None: ...
