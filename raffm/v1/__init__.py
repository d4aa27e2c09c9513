"""Generated protobuf and gRPC stubs for package raffm.v1 (see raffm/protogen.py)."""
