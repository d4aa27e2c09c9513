"""The deployment files (deploy/Dockerfile, deploy/kustomization.yaml, deploy/k8s/): they parse, every RaFFM container's
arguments are accepted by the real `raffm` command line (after Kubernetes' $(VAR) substitution), every environment
variable a container gets is one its command reads (or one its arguments substitute), the probes, container ports,
Services and Prometheus annotations name the ports the services listen on, every Secret and ConfigMap reference
resolves, and the in-cluster Prometheus configuration passes promtool and labels the jobs the dashboard queries."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from raffm.objectstore import S3_ENV_VARS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
SERVICES = {"registry": (50051, 9101), "extractor": (50052, 9102), "aggregator": (50053, 9103)}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
SUBST = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def kustomization() -> dict[str, Any]:
    return yaml.safe_load(KUSTOMIZATION.read_text())


def documents() -> list[dict[str, Any]]:
    docs = []
    for resource in kustomization()["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / resource).read_text()):
            if doc is not None:
                docs.append(doc)
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def config_maps() -> dict[str, dict[str, str]]:
    out = {d["metadata"]["name"]: dict(d.get("data", {})) for d in by_kind("ConfigMap")}
    for gen in kustomization().get("configMapGenerator", []):
        out[gen["name"]] = {Path(f).name: (DEPLOY / f).read_text() for f in gen.get("files", [])}
    return out


def secrets() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {})) for d in by_kind("Secret")}


def raffm_containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container that runs the raffm image."""
    for w in documents():
        if w["kind"] in WORKLOADS:
            for c in w["spec"]["template"]["spec"]["containers"]:
                if c["image"].split(":")[0] == "raffm":
                    yield w, c


def parse(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[argparse.Namespace, dict[str, str]]:
    """The container's arguments as `raffm` parses them, with each env var set to a sentinel value of its own."""
    from raffm_app.cli import build_parser

    env = {e["name"]: f"sentinel-{e['name'].lower()}" for e in container.get("env", [])}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = []
    for arg in container.get("command", [])[1:] + container["args"]:
        for ref in SUBST.findall(arg):
            assert ref in env, f"{container['name']}: argument {arg!r} substitutes ${ref}, which it does not define"
        argv.append(SUBST.sub(lambda m: env[m.group(1)], arg))
    parser = build_parser()  # built now: the defaults read the environment set above
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{container['name']}: `raffm {' '.join(argv)}` is refused by the CLI") from exc
    return args, env


def test_every_file_parses_and_names_itself() -> None:
    assert documents(), "no manifests"
    for d in documents():
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d
    for gen in kustomization().get("configMapGenerator", []):
        for f in gen.get("files", []):
            assert (DEPLOY / f).is_file(), f
    assert {d["metadata"]["name"] for d in by_kind("Namespace")} == {kustomization()["namespace"]}


def test_workloads_select_their_pods_and_request_resources() -> None:
    for w in documents():
        if w["kind"] not in WORKLOADS:
            continue
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), w["metadata"]["name"]
        for c in w["spec"]["template"]["spec"]["containers"]:
            requests = c.get("resources", {}).get("requests", {})
            assert "cpu" in requests and "memory" in requests, f"{c['name']} has no resource requests"
            assert c.get("readinessProbe") and c.get("livenessProbe") or w["kind"] == "Deployment" and \
                c["args"][:2] == ["agent", "simulate"], f"{c['name']} has no readiness/liveness probe"


def test_services_are_configured_with_flags_and_variables_their_command_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = set()
    for w, c in raffm_containers():
        with monkeypatch.context() as m:
            args, env = parse(c, m)
        used_by_args = {ref for a in c["args"] for ref in SUBST.findall(a)}
        values = {str(v) for v in vars(args).values()}
        store = str(getattr(args, "store", "") or "")
        for name, sentinel in env.items():
            if name in used_by_args or sentinel in values:
                continue  # substituted into the arguments, or read by the command (a flag's default)
            assert name in S3_ENV_VARS and store.startswith("sentinel-raffm_store"), \
                f"{c['name']}: environment variable {name} is read by nothing in `raffm {' '.join(c['args'][:2])}`"
        if args.command in SERVICES:
            seen.add(args.command)
            grpc_port, metrics_port = args.port, args.metrics_port
            assert (grpc_port, metrics_port) == SERVICES[args.command], (args.command, grpc_port, metrics_port)
            assert args.host == "0.0.0.0" and args.metrics_host == "0.0.0.0", "a pod must listen beyond loopback"
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports == {"grpc": grpc_port, "metrics": metrics_port}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in c:
                    assert c[probe]["grpc"]["port"] == grpc_port, f"{c['name']} {probe} probes another port"
            annotations = w["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            assert int(annotations["prometheus.io/port"]) == metrics_port
    assert seen == set(SERVICES)


def test_service_addresses_resolve_to_services_on_the_ports_the_pods_listen(monkeypatch: pytest.MonkeyPatch) -> None:
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    pods = {w["metadata"]["name"]: (w, c) for w, c in raffm_containers()}
    for s in services.values():
        matching = [w for w in documents() if w["kind"] in WORKLOADS
                    and s["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert matching, f"Service {s['metadata']['name']} selects no pods"
        names = {p["name"]: p["containerPort"] for w in matching for c in w["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in s["spec"]["ports"]:
            target = port["targetPort"]
            assert target in names or target in names.values(), f"{s['metadata']['name']}: no pod port {target}"
            if isinstance(target, str):
                assert names[target] == port["port"], f"{s['metadata']['name']} {target}: port != containerPort"
    for name, (_, c) in pods.items():
        with monkeypatch.context() as m:
            args, _ = parse(c, m)
        for flag in ("registry", "aggregator", "extractor"):
            address = getattr(args, flag, "")
            if not address or args.command == "aggregator" and flag == "extractor":
                continue
            host, _, port = address.rpartition(":")
            assert host in services, f"{name}: --{flag} {address} names no Service"
            assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, f"{name}: --{flag} {address}"
            assert int(port) == SERVICES[flag][0], f"{name}: --{flag} {address} is not the {flag}'s gRPC port"


def test_secret_and_config_references_resolve() -> None:
    cms, secs = config_maps(), secrets()
    for w in documents():
        if w["kind"] not in WORKLOADS:
            continue
        spec = w["spec"]["template"]["spec"]
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    r = ref["secretKeyRef"]
                    assert r["key"] in secs.get(r["name"], set()), f"{c['name']}: secret {r['name']}/{r['key']}"
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    assert r["key"] in cms.get(r["name"], {}), f"{c['name']}: config map {r['name']}/{r['key']}"
        for v in spec.get("volumes", []):
            sources = [v] + [s for s in v.get("projected", {}).get("sources", [])]
            for src in sources:
                if "configMap" in src:
                    cm = src["configMap"]
                    assert cm["name"] in cms, f"volume {v['name']}: no config map {cm['name']}"
                    for item in cm.get("items", []):
                        assert item["key"] in cms[cm["name"]], f"volume {v['name']}: {cm['name']}/{item['key']}"
    # The enrollment key, the operator token and the ticket secret come from the Secret.
    assert {"enroll-key", "operator-token", "ticket-secret"} <= secs["raffm-secrets"]


def test_the_job_in_the_config_map_is_a_valid_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.aggregator.config import job_from_args

    (tmp_path / "job.toml").write_text(config_maps()["raffm-config"]["job.toml"])
    [(_, c)] = [(w, c) for w, c in raffm_containers() if c["args"][:2] == ["aggregator", "serve"]]
    args, _ = parse(c, monkeypatch)
    assert args.job == "/etc/raffm/job.toml"
    args.job = str(tmp_path / "job.toml")
    job = job_from_args(args)
    assert job.quorum <= job.clients_per_round and job.model == "minilm"


def test_in_cluster_prometheus_config_passes_promtool_and_labels_the_dashboards_jobs(tmp_path: Path) -> None:
    text = config_maps()["raffm-prometheus"]["prometheus.yml"]
    config = yaml.safe_load(text)
    (tmp_path / "rules").mkdir()
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "rules" / "alerts.yml")
    assert config["rule_files"] == ["rules/alerts.yml"]
    (tmp_path / "prometheus.yml").write_text(text)
    # The pods Prometheus keeps are labelled job=<app.kubernetes.io/name>: the job names of the shipped static
    # configuration, which the dashboard and the alerts query.
    static = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    wanted = {j["job_name"] for j in static["scrape_configs"]}
    scraped = {w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] for w in documents()
               if w["kind"] in WORKLOADS
               and w["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/scrape") == "true"}
    assert scraped == wanted
    relabel = config["scrape_configs"][0]["relabel_configs"]
    assert any(r.get("target_label") == "job" and r["source_labels"] == [
        "__meta_kubernetes_pod_label_app_kubernetes_io_name"] for r in relabel)
    [sd] = config["scrape_configs"][0]["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == [kustomization()["namespace"]]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    # Debian's Prometheus is built without Kubernetes discovery, so promtool checks everything else (globals, rule
    # files and their rules, the relabelling) with the discovery block swapped for a static target.
    checked = dict(config, scrape_configs=[{k: v for k, v in job.items() if k != "kubernetes_sd_configs"}
                                           | {"static_configs": [{"targets": ["127.0.0.1:9101"]}]}
                                           for job in config["scrape_configs"]])
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(checked))
    proc = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_provisions_the_dashboard_with_its_datasource() -> None:
    cms = config_maps()
    assert "raffm-dashboard.json" in cms["raffm-grafana-dashboard"]
    provisioning = cms["raffm-grafana-provisioning"]
    datasource = yaml.safe_load(provisioning["datasource.yml"])["datasources"][0]
    local = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "raffm-prometheus.yml").read_text())
    assert datasource["uid"] == local["datasources"][0]["uid"] and datasource["type"] == "prometheus"
    assert datasource["url"] == "http://raffm-prometheus:9090"
    provider = yaml.safe_load(provisioning["dashboards.yml"])["providers"][0]
    [grafana] = [w for w in by_kind("Deployment") if w["metadata"]["name"] == "raffm-grafana"]
    mounts = {m["mountPath"] for m in grafana["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert provider["options"]["path"] in mounts


def test_the_container_image_runs_every_command_and_exposes_their_ports() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert 'ENTRYPOINT ["raffm"]' in lines
    for line in lines:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    exposed = {int(p) for line in lines if line.startswith("EXPOSE ") for p in line.split()[1:]}
    assert exposed == {p for pair in SERVICES.values() for p in pair}
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"(torch==[^"]+)"', pyproject)
    assert torch_pin is not None and torch_pin.group(1) in DOCKERFILE.read_text()
    assert '".[s3' in DOCKERFILE.read_text()  # the object-store client is in the image
    from services.aggregator.cli import DEFAULT_METRICS_PORT as AGG_METRICS, DEFAULT_PORT as AGG
    from services.extractor.cli import DEFAULT_METRICS_PORT as EXT_METRICS, DEFAULT_PORT as EXT
    from services.registry.cli import DEFAULT_METRICS_PORT as REG_METRICS, DEFAULT_PORT as REG

    assert SERVICES == {"registry": (REG, REG_METRICS), "extractor": (EXT, EXT_METRICS),
                        "aggregator": (AGG, AGG_METRICS)}
