"""What one request may ask for: the limits the proto documents, in one place.

Every string field is bounded and every repeated field is counted, so what a request can cost
grows with its size and no further: at most MAX_EXCLUDED_ITEMS ids of MAX_ITEM_ID_LENGTH
characters per call, whether one Recommend or a RecommendBatch of many, and at most
MAX_BATCH_INTERACTIONS interactions.
"""
DEFAULT_K = 10
MAX_K = 100
MAX_EXCLUDED_ITEMS = 10_000  # per Recommend, and in total over a RecommendBatch
MAX_USER_ID_LENGTH = 128
MAX_ITEM_ID_LENGTH = 128
MAX_BATCH_USERS = 100
MAX_RECENT_INTERACTIONS = 1_000  # per Recommend; a RecommendBatch at most MAX_BATCH_INTERACTIONS in total
MAX_BATCH_INTERACTIONS = 10_000
MIN_RATING, MAX_RATING = 0.5, 5.0  # stars of an interaction; 0 means no rating
# An interaction's timestamp may run ahead of the server's clock by this much (clock skew), no more.
MAX_FUTURE_SECONDS = 600
