"""The Flower side of bench_flower.py. Runs in Flower's own virtual environment (numpy + flwr only, no torch).

    python _flower_side.py server --port P --rounds R --clients N --weights W.npz --out times.json
    python _flower_side.py client --server 127.0.0.1:P --weights W.npz

Flower's legacy gRPC transport (``flwr.server.start_server`` / ``start_client``, deprecated since flwr 1.13 but still
shipped in 1.42): the server pushes the global parameters to every client, the client returns them unchanged (zero
local training), and FedAvg aggregates. The server records, per round, the time from the end of client sampling to the
end of aggregation, i.e. serialization, transport both ways and aggregation.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def load_weights(path: str) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[k] for k in sorted(data.files)]


def serve(args: argparse.Namespace) -> None:
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig, start_server
    from flwr.server.strategy import FedAvg

    starts: dict[int, float] = {}
    ends: dict[int, float] = {}

    class TimedFedAvg(FedAvg):  # type: ignore[misc]
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            instructions = super().configure_fit(server_round, parameters, client_manager)  # waits for N clients
            starts[server_round] = time.perf_counter()
            return instructions

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            ends[server_round] = time.perf_counter()
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} client failures: {failures[:1]}")
            return out

    strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.clients,
                           min_evaluate_clients=0, min_available_clients=args.clients,
                           initial_parameters=ndarrays_to_parameters(load_weights(args.weights)))
    start_server(server_address=f"127.0.0.1:{args.port}", config=ServerConfig(num_rounds=args.rounds),
                 strategy=strategy)
    rounds = [ends[r] - starts[r] for r in sorted(starts) if r in ends]
    Path(args.out).write_text(json.dumps({"round_seconds": rounds}))


def client(args: argparse.Namespace) -> None:
    from flwr.client import NumPyClient
    from flwr.compat.client.app import start_client

    weights = load_weights(args.weights)

    class NoTrainClient(NumPyClient):  # type: ignore[misc]
        def get_parameters(self, config: Any) -> list[np.ndarray]:
            return weights

        def fit(self, parameters: list[np.ndarray], config: Any) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            return parameters, 1, {}  # zero local steps: the received model goes back unchanged

    start_client(server_address=args.server, client=NoTrainClient().to_client(), insecure=True)


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--rounds", type=int, required=True)
    s.add_argument("--clients", type=int, required=True)
    s.add_argument("--weights", required=True)
    s.add_argument("--out", required=True)
    c = sub.add_parser("client")
    c.add_argument("--server", required=True)
    c.add_argument("--weights", required=True)
    args = parser.parse_args()
    serve(args) if args.role == "server" else client(args)


if __name__ == "__main__":
    main()
