"""Agent configuration: command-line flags, an optional TOML/YAML file, and ``RAFFM_AGENT_*`` environment variables.

Precedence, highest first: flags, environment, config file, built-in defaults. Every setting has the same name in
all three places: flag ``--memory-mb`` = environment ``RAFFM_AGENT_MEMORY_MB`` = file key ``memory_mb`` (dashes are
accepted in file keys too). Validation raises ``ValueError`` naming the offending setting.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from raffm.data import LABEL_COLUMN_HELP, TEXT_COLUMN_HELP
from raffm.profile import TIERS

ENV_PREFIX = "RAFFM_AGENT_"
# Default service addresses: the ports `raffm registry|extractor|aggregator serve` listen on by default.
DEFAULT_REGISTRY = "127.0.0.1:50051"
DEFAULT_EXTRACTOR = "127.0.0.1:50052"
DEFAULT_AGGREGATOR = "127.0.0.1:50053"


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``raffm agent run`` needs. Units: MiB, GFLOP/s, Mbit/s, seconds."""

    # services
    registry: str = DEFAULT_REGISTRY
    aggregator: str = DEFAULT_AGGREGATOR
    extractor: str = DEFAULT_EXTRACTOR
    enroll_key: str = ""
    # identity and local files
    name: str = field(default_factory=socket.gethostname)
    state_dir: str = "~/.raffm-agent"
    data: str = ""
    text_column: str = ""  # empty: found by name (raffm.data.load_text_file)
    label_column: str = ""
    # where the tokenizer (text jobs) and, for servers that do not ship it, the global model config come from
    model: str = "minilm"
    # TLS: a CA turns TLS on; cert + key add a client certificate (mTLS)
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""
    # resource profile
    profile: str = "manual"  # "manual" or "auto"
    tier: str = "laptop"
    memory_mb: int = 0
    infer_memory_mb: int = 0
    gflops: float = 0.0
    up_mbps: float = 0.0
    down_mbps: float = 0.0
    # simulation only: the device's real compute and links, when they differ from what it declares (0: as declared;
    # the agent throttles itself to them, see edge_agent.throttle)
    true_gflops: float = 0.0
    true_up_mbps: float = 0.0
    true_down_mbps: float = 0.0
    # behaviour
    rpc_timeout_s: float = 15.0
    transfer_timeout_s: float = 3600.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_transfer_retries: int = 8
    chunk_bytes: int = 0
    max_rounds: int = 0  # 0: run until stopped
    threads: int = 0  # torch threads; 0: torch's default
    progress: str = "auto"  # auto | on | off
    log_format: str = "auto"  # auto | text | json
    log_level: str = "info"

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser()

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def validate(self) -> AgentConfig:
        """Raise ``ValueError`` naming the bad setting; return self when every setting is usable."""
        for key in ("registry", "aggregator", "extractor"):
            value = getattr(self, key)
            if not value or ":" not in value:
                raise ValueError(f"--{_flag(key)} is {value!r}; expected host:port")
        if not self.name.strip() or len(self.name) > 128:
            raise ValueError(f"--name {self.name!r} must be 1 to 128 characters")
        if self.profile not in ("manual", "auto"):
            raise ValueError(f"--profile is {self.profile!r}; use 'manual' or 'auto'")
        if self.tier not in TIERS:
            raise ValueError(f"--tier is {self.tier!r}; use one of {', '.join(TIERS)}")
        if self.profile == "manual":
            for key in ("memory_mb", "gflops", "up_mbps", "down_mbps"):
                if not getattr(self, key) > 0:
                    raise ValueError(
                        f"--{_flag(key)} is {getattr(self, key)}; give a positive value or use --profile auto"
                    )
        for key in ("memory_mb", "infer_memory_mb", "gflops", "up_mbps", "down_mbps", "chunk_bytes", "max_rounds",
                    "threads", "true_gflops", "true_up_mbps", "true_down_mbps"):
            if getattr(self, key) < 0:
                raise ValueError(f"--{_flag(key)} is {getattr(self, key)}; it must not be negative")
        for key in ("rpc_timeout_s", "transfer_timeout_s", "backoff_initial_s", "backoff_max_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"--{_flag(key)} is {getattr(self, key)}; it must be positive")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("--backoff-max-s must be at least --backoff-initial-s")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key must be given together (client certificate for mTLS)")
        for key in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, key)
            if path and not Path(path).expanduser().is_file():
                raise ValueError(f"--{_flag(key)}: no such file {path!r}")
        if self.progress not in ("auto", "on", "off"):
            raise ValueError(f"--progress is {self.progress!r}; use auto, on or off")
        if self.log_format not in ("auto", "text", "json"):
            raise ValueError(f"--log-format is {self.log_format!r}; use auto, text or json")
        return self

    def public_dict(self) -> dict[str, Any]:
        """Settings for logs: the enrollment key is masked."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if values["enroll_key"]:
            values["enroll_key"] = "***"
        return values


def _flag(key: str) -> str:
    return key.replace("_", "-")


_FIELDS = {f.name: f for f in fields(AgentConfig)}


def _coerce(key: str, value: Any) -> Any:
    """Convert a file or environment value to the field's type."""
    default = getattr(AgentConfig(name="x"), key)
    try:
        if isinstance(default, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"setting {key} is {value!r}; expected a {type(default).__name__}") from None


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Settings from a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON file; unknown keys are an error."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"--config: no such file {str(p)!r}")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".toml":
        import tomllib

        raw: Any = tomllib.loads(text)
    elif p.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    elif p.suffix == ".json":
        raw = json.loads(text)
    else:
        raise ValueError(f"--config {p}: use a .toml, .yaml or .json file")
    if isinstance(raw, dict) and isinstance(raw.get("agent"), dict):  # allow an [agent] table
        raw = raw["agent"]
    if not isinstance(raw, dict):
        raise ValueError(f"--config {p}: expected a table of settings")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        norm = str(key).replace("-", "_")
        if norm not in _FIELDS:
            raise ValueError(f"--config {p}: unknown setting {key!r}; known: {', '.join(sorted(_FIELDS))}")
        out[norm] = _coerce(norm, value)
    return out


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _FIELDS:
        name = ENV_PREFIX + key.upper()
        if name in environ and environ[name] != "":
            out[key] = _coerce(key, environ[name])
    return out


def resolve(
    flags: Mapping[str, Any], *, config_file: str | None = None, environ: Mapping[str, str] | None = None
) -> AgentConfig:
    """Merge defaults < file < environment < flags (flags that were not given are None) and validate."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    if config_file:
        values.update(load_file(config_file))
    values.update(from_env(environ))
    values.update({k: v for k, v in flags.items() if k in _FIELDS and v is not None})
    return replace(AgentConfig(), **values).validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``raffm agent run`` flags. Defaults are None here so that file/environment values are not overridden."""
    d = AgentConfig(name="<hostname>")
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML/YAML/JSON file with any of the settings below (keys like memory_mb); "
                             f"also ${ENV_PREFIX}CONFIG")
    g = parser.add_argument_group("services")
    g.add_argument("--registry", metavar="HOST:PORT", help=f"registry address (default: {d.registry})")
    g.add_argument("--aggregator", metavar="HOST:PORT", help=f"aggregator address (default: {d.aggregator})")
    g.add_argument("--extractor", metavar="HOST:PORT",
                   help=f"extractor address, unless an assignment names another (default: {d.extractor})")
    g.add_argument("--enroll-key", help="the fleet's enrollment key (needed for the first registration only)")
    g = parser.add_argument_group("identity and data")
    g.add_argument("--name", help="device name, unique in the fleet (default: the host name)")
    g.add_argument("--state-dir", metavar="DIR",
                   help=f"where the device id and token are kept across restarts (default: {d.state_dir})")
    g.add_argument("--data", metavar="PATH",
                   help="local training data: a CSV/TSV/JSON/Parquet file of texts (or sentence pairs) and labels, "
                        "a .pt/.npz file with 'images' [N,C,H,W] and 'labels', a folder of images in one subfolder "
                        "per label, or a built-in set: rotten_tomatoes, mnist")
    g.add_argument("--text-column", help=TEXT_COLUMN_HELP)
    g.add_argument("--label-column", help=LABEL_COLUMN_HELP)
    g.add_argument("--model", metavar="ID_OR_PATH",
                   help="HF model id or folder for the tokenizer (and the model config when the server does not send "
                        "one); 'minilm' is the shipped all-MiniLM-L6-v2, 'smollm2' the shipped SmolLM2-135M-Instruct "
                        f"(default: {d.model})")
    g = parser.add_argument_group("TLS (plaintext when none is given)")
    g.add_argument("--tls-ca", metavar="PEM", help="CA bundle that signed the servers' certificates (enables TLS)")
    g.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    g.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    g.add_argument("--tls-server-name", help="expected server name in the certificates (default: the host part)")
    g = parser.add_argument_group("resource profile (what this device can afford)")
    g.add_argument("--profile", choices=("manual", "auto"),
                   help="'auto' measures total memory and a short matmul benchmark for any value not given; "
                        "'manual' needs --memory-mb, --gflops, --up-mbps and --down-mbps (default: manual)")
    g.add_argument("--tier", choices=TIERS, help=f"device class, used in fleet metrics (default: {d.tier})")
    g.add_argument("--memory-mb", type=int,
                   help="memory one training step may use (weights, gradients, optimizer, activations), MiB; "
                        "assignments predicted to need more are refused")
    g.add_argument("--infer-memory-mb", type=int, help="memory for inference-only deployment, MiB (0: as training)")
    g.add_argument("--gflops", type=float, help="sustained compute, GFLOP/s")
    g.add_argument("--up-mbps", type=float, help="uplink bandwidth, Mbit/s")
    g.add_argument("--down-mbps", type=float, help="downlink bandwidth, Mbit/s")
    g = parser.add_argument_group("simulation (a device whose real resources differ from its declared profile)")
    g.add_argument("--true-gflops", type=float, help="train no faster than this many GFLOP/s (0: unthrottled)")
    g.add_argument("--true-up-mbps", type=float, help="upload no faster than this, Mbit/s (0: unthrottled)")
    g.add_argument("--true-down-mbps", type=float, help="download no faster than this, Mbit/s (0: unthrottled)")
    g = parser.add_argument_group("behaviour")
    g.add_argument("--rpc-timeout-s", type=float, help=f"deadline of every unary call (default: {d.rpc_timeout_s})")
    g.add_argument("--transfer-timeout-s", type=float,
                   help=f"deadline of one download or upload stream (default: {d.transfer_timeout_s})")
    g.add_argument("--backoff-initial-s", type=float,
                   help=f"first retry delay when a service is unreachable (default: {d.backoff_initial_s})")
    g.add_argument("--backoff-max-s", type=float,
                   help=f"retry delays double (with jitter) up to this (default: {d.backoff_max_s})")
    g.add_argument("--max-transfer-retries", type=int,
                   help=f"resumes of one broken download/upload before giving up the round "
                        f"(default: {d.max_transfer_retries})")
    g.add_argument("--chunk-bytes", type=int, help="requested download chunk size, bytes (0: server default)")
    g.add_argument("--max-rounds", type=int, help="exit after this many finished assignments (0: run until stopped)")
    g.add_argument("--threads", type=int, help="torch CPU threads for training (0: torch's default)")
    g.add_argument("--progress", choices=("auto", "on", "off"),
                   help="progress bars: auto shows them only on a terminal (default: auto)")
    g.add_argument("--log-format", choices=("auto", "text", "json"),
                   help="auto: text on a terminal, one JSON object per line otherwise (default: auto)")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="(default: info)")
