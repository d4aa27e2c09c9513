"""`raffm agent run|simulate`: the edge agent's command line (heavy imports happen inside the commands).

The same commands run without the rest of `raffm` as ``python -m edge_agent run|simulate``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

RUN_EPILOG = """\
Every flag can also come from a config file (--config agent.toml, keys like memory_mb) or from an environment
variable RAFFM_AGENT_<FLAG> (e.g. RAFFM_AGENT_MEMORY_MB=900). Precedence: flags, environment, file, defaults.

The agent registers once and keeps its device id and token in --state-dir (mode 0600); a restart re-uses them.
It polls for rounds, backs off with jitter while services are unreachable, refuses assignments predicted to need
more than --memory-mb, and reports every failure to the aggregator instead of exiting. SIGTERM/SIGINT/SIGHUP finish
the current training step, report the abandoned round, and exit 0; so does the death of the process that started
the agent, when that one named itself in $RAFFM_PARENT_PID (as `raffm agent simulate` does).

example:
  raffm agent run --enroll-key $KEY --name pi-kitchen --data reviews.csv \\
      --memory-mb 900 --gflops 12 --up-mbps 10 --down-mbps 50 --tier sbc
"""

SIM_EPILOG = """\
tiers file (TOML), one table per tier; devices are spread over the tiers in proportion to `share` (default 1):

  [tiers.phone]
  memory_mb = 600
  gflops = 5
  up_mbps = 5
  down_mbps = 20
  share = 2

  [tiers.laptop]
  memory_mb = 1500
  gflops = 50
  up_mbps = 50
  down_mbps = 200
"""


def register(subparsers: Any) -> None:
    """Add the ``agent`` sub-command with ``run`` and ``simulate``."""
    parser = subparsers.add_parser("agent", help="edge agent: register, poll, download, train, upload",
                                   description="The program every device runs.")
    add_commands(parser)


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Add ``run`` and ``simulate`` to ``parser`` (which prints its help when neither is given)."""
    from edge_agent.config import add_arguments
    from edge_agent.simulate import add_arguments as add_sim_arguments

    commands = parser.add_subparsers(dest="agent_command", metavar="COMMAND")

    def print_help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=print_help)

    run = commands.add_parser("run", help="run one device agent until stopped",
                              description="Run the edge agent for this device.", epilog=RUN_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(run)
    run.set_defaults(func=_run)

    sim = commands.add_parser("simulate", help="run many agents on this machine (non-IID data shares)",
                              description="Simulate a heterogeneous fleet: N agents, each with its own resource "
                                          "profile from a tiers file and its own Dirichlet non-IID share of the data.",
                              epilog=SIM_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sim_arguments(sim)
    sim.set_defaults(func=_simulate)


def _run(args: argparse.Namespace) -> int:
    import signal

    from edge_agent.agent import Agent
    from edge_agent.config import resolve
    from edge_agent.progress import setup_logging
    from raffm.lifeline import watch_parent

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "agent_command", "config")}
    config = resolve(flags, config_file=args.config)
    setup_logging(config.log_format, config.log_level)
    agent = Agent(config)

    def on_signal(signum: int, _frame: Any) -> None:
        agent.stop(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    watch_parent(lambda: agent.stop("parent process exited"))  # started by `raffm agent simulate`, which died
    return agent.run()


def _simulate(args: argparse.Namespace) -> int:
    from edge_agent.simulate import main

    return main(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_agent COMMAND ...``: the ``agent`` commands on their own."""
    parser = argparse.ArgumentParser(prog="python -m edge_agent", description="The program every device runs.")
    add_commands(parser)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
