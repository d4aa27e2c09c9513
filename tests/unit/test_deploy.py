"""The shipped operations files (deploy/): the Grafana dashboard only queries metrics the services export, with labels
those metrics carry; the dashboard is well formed; the Prometheus config (and its alert rules) pass ``promtool``."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.aggregator.metrics import build_aggregator_metrics
from services.common.metrics import build_rpc_metrics
from services.extractor.metrics import build_extractor_metrics
from services.registry.metrics import build_registry_metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "raffm-dashboard.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# Series Prometheus itself attaches to every scrape target; the services do not export them.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling",
                 "scrape_series_added"}
# Labels Prometheus adds to every scraped series (target labels of deploy/prometheus/prometheus.yml included).
TARGET_LABELS = {"job", "instance", "service", "system"}

# PromQL words that look like identifiers but are not metric names (functions are recognised by a following "(").
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "atan2", "inf", "nan"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE)
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^{}]*)\}")
MATCHER_LABEL = re.compile(r"(?:^|,)\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*")
TOKEN = re.compile(r"(?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)[a-zA-Z]*)"
                   r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)(?P<call>\s*\()?")
LABEL_VALUES = re.compile(r"^\s*label_values\s*\((?:(?P<expr>.*),)?\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.S)


# ------------------------------------------------------------------------------------------------ PromQL helpers

def _blank_strings(expr: str) -> str:
    """``expr`` with string literals emptied (label values may contain anything, '{' and '(' included)."""
    return STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords, label names (inside
    ``{...}`` or a grouping clause), range durations or Grafana variables."""
    text = _blank_strings(expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries: [5m], [$window], [1h:1m]
    text = GROUPING.sub(" ", text)  # by (tier), on (), group_left (x)
    text = re.sub(r"\boffset\s+-?\S+", " ", text, flags=re.IGNORECASE)
    text = GRAFANA_VAR.sub(" ", text)
    names = set()
    for m in TOKEN.finditer(text):
        ident = m.group("ident")
        if ident is None or m.group("call") or ident.lower() in PROMQL_KEYWORDS:
            continue
        names.add(ident)
    return names


def selector_labels(expr: str) -> dict[str, set[str]]:
    """Label names each ``metric{...}`` selector in ``expr`` matches on."""
    out: dict[str, set[str]] = {}
    for m in SELECTOR.finditer(_blank_strings(expr)):
        out.setdefault(m.group(1), set()).update(MATCHER_LABEL.findall(m.group(2)))
    return out


def grouping_labels(expr: str) -> set[str]:
    """Label names in ``by``/``without``/``on``/``ignoring``/``group_*`` clauses."""
    return {label.strip() for m in GROUPING.finditer(_blank_strings(expr)) for label in m.group(2).split(",")
            if label.strip()}


# ------------------------------------------------------------------------------------------------ the dashboard

def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """``(where, PromQL)`` for every panel target and every query variable of the dashboard."""
    queries = [(f"panel {p['id']} {p.get('title')!r} target {t.get('refId')}", t["expr"])
               for p in all_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = LABEL_VALUES.match(query)
        if m is None:  # e.g. query_result(...): treat it as PromQL
            queries.append((f"variable {var['name']}", query))
        elif m.group("expr"):
            queries.append((f"variable {var['name']}", m.group("expr")))
    return queries


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(f"alert {r.get('alert') or r.get('record')}", r["expr"]) for g in rules["groups"] for r in g["rules"]]


# ------------------------------------------------------------------------------------------------ what is exported

def _exercise(metrics: object) -> None:
    """Touch every metric of a builder's dataclass once so labelled metrics expose their series."""
    for f in dataclasses.fields(metrics):  # type: ignore[arg-type]
        metric = getattr(metrics, f.name)
        # prometheus_client keeps the declared label names here; labelled metrics show no series until used.
        labelnames = getattr(metric, "_labelnames", ())
        child = metric.labels(*["x"] * len(labelnames)) if labelnames else metric
        if isinstance(metric, Counter):
            child.inc()
        elif isinstance(metric, Gauge):
            child.set(1)
        elif isinstance(metric, Histogram):
            child.observe(1)
        else:  # pragma: no cover - a new metric kind: extend this test
            raise AssertionError(f"unexpected metric type {type(metric).__name__} in {type(metrics).__name__}")


def exported_series() -> dict[str, set[str]]:
    """Every series name the three services export (as Prometheus stores it: ``_total``, ``_bucket``, ...), with
    its label names; built from each service's metric builders on fresh registries."""
    registries = []
    for build in (
        lambda r: build_registry_metrics(r, device_counts=lambda: {}),
        build_extractor_metrics,
        build_aggregator_metrics,
    ):
        registry = CollectorRegistry()
        _exercise(build(registry))
        _exercise(build_rpc_metrics(registry))  # every service's chassis adds the RPC metrics
        registries.append(registry)
    series: dict[str, set[str]] = {}
    for registry in registries:
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for sample in family.samples:
                series.setdefault(sample.name, set()).update(sample.labels)
    return series


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    return exported_series()


# ------------------------------------------------------------------------------------------------ tests

def test_metric_name_extractor() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, grpc_method) (rate(raffm_grpc_server_handling_seconds_bucket'
            '{grpc_code!="OK", job=~"raffm-(a|b)"}[$__rate_interval]))) / on (job) group_left (tier) '
            'scalar(clamp_min(sum(increase(raffm_aggregator_rounds_total[${window}] offset 5m)), 1e3)) '
            'or vector(0) and bool raffm_registry_devices{tier=~"$tier"} > 0.5')
    assert metric_names(expr) == {"raffm_grpc_server_handling_seconds_bucket", "raffm_aggregator_rounds_total",
                                  "raffm_registry_devices"}
    assert selector_labels(expr) == {"raffm_grpc_server_handling_seconds_bucket": {"grpc_code", "job"},
                                     "raffm_registry_devices": {"tier"}}
    assert grouping_labels(expr) == {"le", "grpc_method", "job", "tier"}
    assert metric_names("sum(rate(foo_total[5m])) by (tier)") == {"foo_total"}
    assert metric_names('up{job="x"} == 0') == {"up"}


def test_unknown_metric_is_detected(exported: dict[str, set[str]]) -> None:
    """The check the dashboard test makes catches a misspelt name, a counter without ``_total`` and a wrong label."""
    for wrong in ("sum(rate(raffm_aggregator_upload_byte_total[5m]))",  # misspelt
                  "sum(rate(raffm_aggregator_upload_bytes[5m]))",  # counters are stored with _total
                  "raffm_aggregator_round_duration_seconds"):  # a histogram is only _bucket/_sum/_count
        assert _problems([("wrong", wrong)], exported), wrong
    assert _problems([("wrong", 'sum(raffm_registry_devices{devcie_tier="phone"})')], exported)
    assert _problems([("wrong", "sum by (reason) (raffm_aggregator_upload_bytes_total)")], exported)
    assert not _problems([("right", 'sum by (tier) (rate(raffm_aggregator_upload_bytes_total{tier="phone"}[5m]))')],
                         exported)


def _problems(queries: list[tuple[str, str]], exported: dict[str, set[str]]) -> list[str]:
    problems = []
    for where, expr in queries:
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: no metric in {expr!r}")
        known_labels = set(TARGET_LABELS)
        for name in sorted(names):
            if name in SCRAPE_SERIES:
                continue
            if name not in exported:
                problems.append(f"{where}: {name} is not exported by any service")
            else:
                known_labels |= exported[name]
        for name, labels in selector_labels(expr).items():
            if name in exported and (unknown := labels - exported[name] - TARGET_LABELS):
                problems.append(f"{where}: {name} has no label(s) {sorted(unknown)}")
        if unknown := grouping_labels(expr) - known_labels:
            problems.append(f"{where}: groups by label(s) {sorted(unknown)} that none of {sorted(names)} has")
    return problems


def test_dashboard_queries_only_exported_metrics(exported: dict[str, set[str]]) -> None:
    queries = dashboard_queries(load_dashboard())
    assert len(queries) >= 20
    assert _problems(queries, exported) == []


def test_alert_rules_query_only_exported_metrics(exported: dict[str, set[str]]) -> None:
    assert _problems(alert_queries(), exported) == []


def test_dashboard_covers_the_operations_brief() -> None:
    """Fleet, rounds, communication and errors each have their panels, and every service's metrics are shown."""
    used = {name for _, expr in dashboard_queries(load_dashboard()) for name in metric_names(expr)}
    for needed in ("raffm_registry_devices", "raffm_aggregator_round_duration_seconds_bucket",
                   "raffm_aggregator_round_participants", "raffm_aggregator_dropouts_total",
                   "raffm_extractor_download_bytes_total", "raffm_aggregator_download_bytes_total",
                   "raffm_aggregator_upload_bytes_total", "raffm_aggregator_full_model_fedavg_bytes_total",
                   "raffm_aggregator_updates_rejected_total", "raffm_grpc_server_handled_total"):
        assert needed in used, needed
    rows = [p["title"] for p in load_dashboard()["panels"] if p["type"] == "row"]
    assert rows == ["Fleet", "Rounds", "Communication", "Errors and RPCs"]


def test_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    used_vars: set[str] = set()
    for panel in all_panels(dashboard):
        where = f"panel {panel['id']} {panel.get('title')!r}"
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            assert not panel.get("targets"), where
            continue
        assert panel.get("datasource") == {"type": "prometheus", "uid": "${datasource}"}, where
        targets = panel.get("targets") or []
        assert targets, f"{where} has no target"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in targets:
            assert target.get("expr", "").strip(), f"{where} target {target['refId']} has no expression"
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], where
            used_vars |= {v.strip("${}") for v in GRAFANA_VAR.findall(target["expr"])}
    # Every dashboard variable a query uses exists (Grafana's own $__ variables aside).
    assert {v for v in used_vars if not v.startswith("__")} <= variables.keys()


def test_dashboard_jobs_match_the_scrape_config() -> None:
    """Job names the dashboard and alerts filter on are the ones prometheus.yml scrapes, which cover all services."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {c["job_name"]: c for c in config["scrape_configs"]}
    assert set(jobs) == {"raffm-registry", "raffm-extractor", "raffm-aggregator"}
    ports = {name: int(c["static_configs"][0]["targets"][0].rsplit(":", 1)[1]) for name, c in jobs.items()}
    assert ports == {"raffm-registry": 9101, "raffm-extractor": 9102, "raffm-aggregator": 9103}
    for where, expr in dashboard_queries(load_dashboard()) + alert_queries():
        for pattern in re.findall(r'\bjob\s*=~?\s*"([^"]*)"', expr):
            assert any(re.fullmatch(pattern, job) for job in jobs), f"{where}: job {pattern!r} matches no scrape job"
    from services.aggregator.cli import DEFAULT_METRICS_PORT as aggregator_port
    from services.extractor.cli import DEFAULT_METRICS_PORT as extractor_port
    from services.registry.cli import DEFAULT_METRICS_PORT as registry_port

    assert ports == {"raffm-registry": registry_port, "raffm-extractor": extractor_port,
                     "raffm-aggregator": aggregator_port}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    return path


def test_prometheus_config_passes_promtool() -> None:
    """``promtool check config`` also loads and checks the rule files the config names (alerts.yml)."""
    check = subprocess.run([_promtool(), "check", "config", str(PROMETHEUS)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "1 rule files found" in check.stdout + check.stderr


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """Every dashboard query, with Grafana's variables filled in, is valid PromQL (checked as recording rules)."""
    promtool = _promtool()
    fill = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h", "$window": "15m", "$tier": ".*",
            "${datasource}": "prometheus"}
    rules = []
    for i, (where, expr) in enumerate(dashboard_queries(load_dashboard())):
        for var, value in fill.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{where}: unfilled Grafana variable in {expr!r}"
        rules.append({"record": f"raffm:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_communication_panels_compute_the_right_figures(tmp_path: Path) -> None:
    """Bytes saved, saved fraction and bytes per round by tier evaluate to the expected numbers on synthetic series
    (``promtool test rules``): one hour, 60 rounds, full-model FedAvg 100 B/round, a phone 20 B down and 10 B up per
    round, a server 30 B down and 15 B up per round."""
    promtool = _promtool()
    panels = {p.get("title"): p for p in all_panels(load_dashboard())}

    def expr(title: str, ref: str = "A") -> str:
        text = next(t["expr"] for t in panels[title]["targets"] if t["refId"] == ref)
        for var, value in {"$__range": "1h", "$window": "15m", "$tier": ".*"}.items():
            text = text.replace(var, value)
        return text

    def series(name: str, labels: str, step: int) -> dict:
        return {"series": f'{name}{{job="raffm-aggregator",{labels}}}', "values": f"0+{step}x60"}

    agg = "raffm_aggregator_"
    test = {"interval": "1m", "input_series": [
        series(agg + "full_model_fedavg_bytes_total", 'wire_dtype="fp32"', 100),
        series(agg + "download_bytes_total", 'tier="phone",wire_dtype="fp32"', 20),
        series(agg + "download_bytes_total", 'tier="server",wire_dtype="fp32"', 30),
        series(agg + "upload_bytes_total", 'tier="phone",wire_dtype="fp32"', 10),
        series(agg + "upload_bytes_total", 'tier="server",wire_dtype="fp32"', 15),
        series(agg + "rounds_total", 'outcome="closed"', 1),
    ], "promql_expr_test": [
        {"expr": expr("Bytes saved vs full-model FedAvg"), "eval_time": "60m",
         "exp_samples": [{"labels": "{}", "value": 60 * (100 - 20 - 30 - 10 - 15)}]},
        {"expr": expr("Saved fraction"), "eval_time": "60m", "exp_samples": [{"labels": "{}", "value": 0.25}]},
        {"expr": expr("Bytes per round by tier", "A"), "eval_time": "60m",
         "exp_samples": [{"labels": '{tier="phone"}', "value": 20}, {"labels": '{tier="server"}', "value": 30}]},
        {"expr": expr("Bytes per round by tier", "B"), "eval_time": "60m",
         "exp_samples": [{"labels": '{tier="phone"}', "value": 10}, {"labels": '{tier="server"}', "value": 15}]},
    ]}
    path = tmp_path / "communication_test.yml"
    path.write_text(yaml.safe_dump({"evaluation_interval": "1m", "tests": [test]}))
    check = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
