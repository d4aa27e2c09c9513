"""raffm_app.processes.free_port: ports for services started on a chosen port, out of the way of outgoing connections."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from raffm_app import processes


def test_a_chosen_port_is_free_and_below_the_ephemeral_range() -> None:
    """Outgoing connections get ports from the kernel's ephemeral range; a port chosen below it cannot be taken by
    one of them before the service binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {processes.free_port() for _ in range(5)}
    assert all(10_000 <= p < low for p in ports) and len(ports) > 1
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # nobody holds it


def test_a_port_in_use_is_never_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        monkeypatch.setattr(processes.random, "sample", lambda population, k: [taken] * k)  # every candidate taken
        port = processes.free_port()
        assert port != taken  # the kernel's choice instead
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
