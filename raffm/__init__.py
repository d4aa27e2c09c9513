"""RaFFM core library, the layer everything else stands on: elastic specs, architecture adapters, SPP, slicing,
HF sub-models, the cost model and budget fitter, planning, aggregation maths, the wire codec and its protobuf
mapping, device profiles, tickets, checkpoints, data, training, and the generated stubs (``raffm.v1``).

Pure where it can be; no servers and no orchestration: it imports neither the services, the agent nor ``raffm_app``.
"""

__version__ = "0.1.0"
