"""The Flower App of bench_flower.py's SuperLink mode: Flower 1.42's Message API, run by ``flwr run``.

Runs in Flower's own virtual environment (numpy + flwr only). ``bench_flower.py`` copies this file into a temporary
app directory next to a generated ``pyproject.toml`` (components ``_flower_app:server_app`` and
``_flower_app:client_app``; run config ``weights``, ``out``, ``clients``, ``rounds``).

The ``ServerApp`` runs Flower's message-based ``FedAvg`` (``flwr.serverapp.strategy``) for ``rounds`` rounds on
``clients`` SuperNodes, starting from the fp32 arrays in ``weights`` (an ``.npz``), and records per round the time from
the end of node sampling (just before the train messages are pushed) to the end of ``FedAvg.aggregate_train``; it
writes ``{"round_seconds": [...]}`` to ``out``.

The ``ClientApp`` trains for zero steps and replies with the arrays it received, each element's lowest mantissa bits
XORed with its SuperNode's ``index`` + 1 (node config; at most 15 units in the last place for 8 clients). Without that
mark an unchanged reply would partly not cross the wire: Flower's object store is content-addressed (an array chunk's
id is its sha256), a SuperNode pushes only the chunks the SuperLink does not hold, and the SuperLink still holds the
chunks it has just sent unless every node has confirmed them. A trained update never matches, so the mark keeps the
upload honest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

server_app = ServerApp()
client_app = ClientApp()


class TimedFedAvg(FedAvg):  # type: ignore[misc]
    """FedAvg that times each round and fails on a missing or failed reply."""

    def __init__(self, clients: int) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
                         min_available_nodes=clients)
        self.clients = clients
        self.starts: dict[int, float] = {}
        self.ends: dict[int, float] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)  # waits for the nodes
        self.starts[server_round] = time.perf_counter()
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                     MetricRecord | None]:
        replies = list(replies)
        out = super().aggregate_train(server_round, replies)
        self.ends[server_round] = time.perf_counter()
        good = [m for m in replies if not m.has_error()]
        if len(good) != self.clients:
            raise RuntimeError(f"round {server_round}: {len(good)} of {self.clients} replies without error")
        return out


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    with np.load(str(config["weights"])) as data:
        arrays = ArrayRecord([data[k] for k in sorted(data.files)])
    strategy = TimedFedAvg(int(config["clients"]))
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=int(config["rounds"]))
    rounds = [strategy.ends[r] - strategy.starts[r] for r in sorted(strategy.starts) if r in strategy.ends]
    out = Path(str(config["out"]))
    out.with_suffix(".tmp").write_text(json.dumps({"round_seconds": rounds}))
    out.with_suffix(".tmp").replace(out)  # the bench waits for ``out`` to appear: it must appear whole


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Zero local steps, but a reply that differs from what was received (see the module docstring)."""
    mark = np.uint32(int(context.node_config["index"]) + 1)
    arrays = ArrayRecord({key: Array((array.numpy().view(np.uint32) ^ mark).view(np.float32))
                          for key, array in message.content["arrays"].items()})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=message)
