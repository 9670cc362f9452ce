"""Python client for the recsys.v1.Recommender gRPC service."""
from recsys.client.api import RecommenderClient

__all__ = ["RecommenderClient"]
