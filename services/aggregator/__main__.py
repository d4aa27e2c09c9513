"""`python -m services.aggregator serve ...`: the aggregator alone (same flags as `raffm aggregator serve`)."""

import argparse
import sys

from services.aggregator import cli

parser = argparse.ArgumentParser(prog="python -m services.aggregator")
sub = parser.add_subparsers(dest="command")
cli.register(sub)
args = parser.parse_args(["aggregator", *sys.argv[1:]])
sys.exit(int(args.func(args) or 0))
