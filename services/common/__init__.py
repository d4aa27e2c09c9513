"""The chassis every RaFFM gRPC service stands on: server builder, auth, TLS, metrics, and the error table."""
