"""What one request may ask for: the limits the proto documents, in one place.

Every string field is bounded and every repeated field is counted, so what a request can cost
grows with its size and no further: at most MAX_EXCLUDED_ITEMS ids of MAX_ITEM_ID_LENGTH
characters per call, whether one Recommend or a RecommendBatch of many.
"""
DEFAULT_K = 10
MAX_K = 100
MAX_EXCLUDED_ITEMS = 10_000  # per Recommend, and in total over a RecommendBatch
MAX_USER_ID_LENGTH = 128
MAX_ITEM_ID_LENGTH = 128
MAX_BATCH_USERS = 100
