"""RaFFM services: registry, extractor and aggregator, each in its own package on the shared chassis in ``common``.

A service depends on the contract (``raffm.v1``), the core library (``raffm``) and ``services.common``; never on
another service. They talk to each other over gRPC only."""
