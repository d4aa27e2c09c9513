"""The aggregator service: runs one federated job as rounds: assignments, durable uploads, sliced FedAvg, versions."""
