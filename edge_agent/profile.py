"""The device's resource profile (a :class:`raffm.profile.DeviceProfile`): declared by flags, or measured
(``--profile auto``).

Measured: total memory (the smaller of physical RAM and a cgroup limit, so containers report their own budget) and
sustained fp32 matmul throughput from a short benchmark. Bandwidth cannot be measured without a peer, so ``auto``
keeps any declared ``--up-mbps/--down-mbps`` and otherwise assumes a modest link (and says so in the log).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from edge_agent.config import AgentConfig
from raffm.profile import DeviceProfile

log = logging.getLogger("edge_agent.profile")

MiB = 1 << 20
# Share of total memory that auto mode offers to training: the OS, the agent itself and other programs need the rest.
AUTO_MEMORY_FRACTION = 0.5
ASSUMED_MBPS = 20.0


def total_memory_mb() -> int:
    """Physical memory, capped by a cgroup (v2 or v1) memory limit when one is set."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MiB
    for path in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            raw = path.read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw) // MiB)
    return int(total)


def matmul_gflops(seconds: float = 0.5, size: int = 512, threads: int | None = None) -> float:
    """Sustained fp32 GFLOP/s of ``size``x``size`` matmuls over about ``seconds`` (after a warm-up)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    for _ in range(3):  # warm-up: thread pool start, kernel selection
        torch.mm(a, b)
    flops_per = 2.0 * size**3
    n = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds or n < 5:
        torch.mm(a, b)
        n += 1
        elapsed = time.perf_counter() - start
    return n * flops_per / elapsed / 1e9


def resolve_profile(config: AgentConfig) -> DeviceProfile:
    """The declared profile; with ``--profile auto``, measured values fill in what was not declared."""
    memory = config.memory_mb
    gflops = config.gflops
    up, down = config.up_mbps, config.down_mbps
    if config.profile == "auto":
        if not memory:
            total = total_memory_mb()
            memory = max(64, int(total * AUTO_MEMORY_FRACTION))
            log.info("auto profile: %d MiB total memory, offering %d MiB for training", total, memory,
                     extra={"event": "profile_memory", "total_mb": total, "train_mb": memory})
        if not gflops:
            gflops = round(matmul_gflops(threads=config.threads or None), 1)
            log.info("auto profile: matmul benchmark %.1f GFLOP/s", gflops,
                     extra={"event": "profile_gflops", "gflops": gflops})
        if not up or not down:
            log.info("auto profile: link speed not declared; assuming %.0f Mbit/s (set --up-mbps/--down-mbps)",
                     ASSUMED_MBPS, extra={"event": "profile_link_assumed"})
            up, down = up or ASSUMED_MBPS, down or ASSUMED_MBPS
    profile = DeviceProfile(
        train_memory_mb=int(memory), infer_memory_mb=int(config.infer_memory_mb), gflops=float(gflops),
        up_mbps=float(up), down_mbps=float(down), tier=config.tier,
    )
    for name in ("train_memory_mb", "gflops", "up_mbps", "down_mbps"):
        if not getattr(profile, name) > 0:
            raise ValueError(f"profile {name} is {getattr(profile, name)}; declare it or use --profile auto")
    return profile


def with_memory(profile: DeviceProfile, memory_mb: int) -> DeviceProfile:
    return replace(profile, train_memory_mb=memory_mb)
