"""Code generated from recommender.proto by grpcio-tools (see `make protos`); do not edit the *_pb2 files.

What the contract carries outside its messages, named once for the server and the client:"""

# Recommend's trailing metadata: how many interactions (sent or stored) named movies the served
# models do not know (recommender.proto, rpc Recommend).
UNKNOWN_INTERACTIONS_METADATA = "unknown-interactions"
# SimilarItems' trailing metadata: the queried movie's title, UTF-8 (rpc SimilarItems).
ITEM_TITLE_METADATA = "item-title-bin"
