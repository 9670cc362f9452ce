"""Code generated from recommender.proto by grpcio-tools (see `make protos`); do not edit the *_pb2 files."""
