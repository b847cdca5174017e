"""The deployment files name what the code expects: services, images, ports, settings, commands,
metrics. Pure parsing (no Docker, no cluster): docker-compose.yml, ops/prometheus, ops/grafana and
ops/k8s against dreamq.settings.Settings and dreamq.cli.parser()."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from dreamq import lanes
from dreamq.cli import parser
from dreamq.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
K8S = OPS / "k8s"

# The metric names the API and the workers export (README "Operations").
API_METRICS = {
    "dreamq_http_requests_total",
    "dreamq_http_request_duration_seconds",
    "dreamq_queue_depth",
    "dreamq_jobs",
    "dreamq_worker_heartbeat_age_seconds",
}
WORKER_METRICS = {
    "dreamq_job_duration_seconds",
    "dreamq_jobs_finished_total",
    "dreamq_model_load_seconds",
    "dreamq_model_loads_total",
    "dreamq_pipeline_cache_total",
    "dreamq_webhook_attempts_total",
    "dreamq_gpu_memory_bytes",
}
HISTOGRAMS = {
    "dreamq_http_request_duration_seconds",
    "dreamq_job_duration_seconds",
    "dreamq_model_load_seconds",
}
API_PORT = 8000
METRICS_PORT = 9100
IMAGE_DOCKERFILES = {"dreamq-api": "ops/Dockerfile.api", "dreamq-worker": "ops/Dockerfile.worker"}

SETTING_ENV_NAMES = {f"DREAMQ_{name.upper()}" for name in Settings.model_fields}


# ---- loading ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every object in ops/k8s except the kustomization."""
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                objects.append((path.name, doc))
    return objects


def by_kind(objects: list[tuple[str, dict[str, Any]]], kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for _, obj in objects if obj["kind"] == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(workload)["containers"]
    return container


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def dreamq_argv(command: str | list[str]) -> list[str] | None:
    """The `dreamq ...` part of a command: an argv list, or a shell line (`sh -c`, CMD-SHELL,
    `test ... || dreamq ...`) with `$(hostname)` standing for some host name."""
    if isinstance(command, list):
        if command and command[0] == "dreamq":
            return command[1:]
        if len(command) >= 3 and command[0] == "sh" and command[1] == "-c":
            command = command[2]
        elif command and command[0] == "CMD-SHELL":
            command = command[1]
        else:
            return None
    line = command.replace("$$(hostname)", "host-1").replace("$(hostname)", "host-1")
    for part in re.split(r"&&|\|\||;", line):
        words = shlex.split(part)
        if words and words[0] == "dreamq":
            return words[1:]
    return None


def assert_real_subcommand(argv: list[str]) -> None:
    try:
        parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown command or option
        pytest.fail(f"`dreamq {' '.join(argv)}` is not a dreamq command ({exc})")


# ---- docker-compose.yml ----------------------------------------------------------------------


def test_compose_names_every_service(services: dict[str, dict[str, Any]]) -> None:
    expected = {"redis", "minio", "minio-init", "api", "gpu-worker", "dispatcher"}
    expected |= {"flower", "prometheus", "grafana"}
    assert expected <= set(services)


def test_compose_publishes_the_ports_the_code_uses(services: dict[str, dict[str, Any]]) -> None:
    assert f"{API_PORT}:{API_PORT}" in services["api"]["ports"]
    assert "5555:5555" in services["flower"]["ports"]
    assert "9090:9090" in services["prometheus"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]
    api = parser().parse_args(services["api"]["command"][1:])
    assert api.port == API_PORT
    for name in ("gpu-worker", "dispatcher"):
        assert service_env(services[name])["DREAMQ_METRICS_PORT"] == str(METRICS_PORT)
        assert str(METRICS_PORT) in [str(port) for port in services[name]["expose"]]


def test_compose_uses_only_real_settings(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        unknown = {key for key in service_env(service) if key.startswith("DREAMQ_")}
        unknown -= SETTING_ENV_NAMES
        assert not unknown, f"{name}: {sorted(unknown)} are not fields of Settings"


def test_compose_settings_validate(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("api", "gpu-worker", "dispatcher"):
        with monkeypatch.context() as env:
            for key, value in service_env(services[name]).items():
                if key.startswith("DREAMQ_"):
                    env.setenv(key, value)
            settings = Settings()
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.storage_url.startswith("s3://")


def test_compose_commands_are_dreamq_subcommands(services: dict[str, dict[str, Any]]) -> None:
    commands = []
    for service in services.values():
        if "command" in service:
            commands.append(service["command"])
        if "healthcheck" in service:
            commands.append(service["healthcheck"]["test"])
    argvs = [argv for argv in map(dreamq_argv, commands) if argv is not None]
    assert {argv[0] for argv in argvs} >= {"api", "worker", "dispatcher", "tiny-model", "workers"}
    for argv in argvs:
        assert_real_subcommand(argv)


def test_compose_worker_liveness_checks_its_own_worker(
    services: dict[str, dict[str, Any]],
) -> None:
    # Worker names are <role>-<pid>@<host>; ROLE@HOST names this container's newest one.
    for name, role in (("gpu-worker", "generate"), ("dispatcher", "webhooks")):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        assert f"dreamq workers --check {role}@$$(hostname)" in test[1]


def test_compose_gpu_worker_reserves_a_gpu_and_finishes_its_job(
    services: dict[str, dict[str, Any]],
) -> None:
    worker = services["gpu-worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    grace = worker["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) >= Settings().job_time_limit


def test_compose_redis_keeps_an_append_only_file(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "healthcheck" in redis


def test_compose_flower_watches_the_dreamq_broker(services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]
    broker = service_env(services["api"]).get(
        "DREAMQ_BROKER_URL", service_env(services["api"])["DREAMQ_REDIS_URL"]
    )
    assert f"--broker={broker}" in flower["command"]
    assert service_env(flower)["CELERY_BROKER_URL"] == broker
    assert "--port=5555" in flower["command"]


def test_compose_images_match_the_dockerfiles_purposes(
    services: dict[str, dict[str, Any]],
) -> None:
    expected = {
        "api": "ops/Dockerfile.api",
        "dispatcher": "ops/Dockerfile.api",
        "gpu-worker": "ops/Dockerfile.worker",
        "models-init": "ops/Dockerfile.worker",
    }
    for name, dockerfile in expected.items():
        assert services[name]["build"]["dockerfile"] == dockerfile
    # The API image is the base install (no torch); the worker image adds the `worker` extra.
    assert "[worker]" not in (ROOT / "ops/Dockerfile.api").read_text()
    assert "'.[worker]'" in (ROOT / "ops/Dockerfile.worker").read_text()


# ---- Prometheus and Grafana ------------------------------------------------------------------


def prometheus_targets() -> set[tuple[str, int]]:
    config = yaml.safe_load((OPS / "prometheus/prometheus.yml").read_text())
    targets = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job.get("dns_sd_configs", []):
            targets |= {(name, int(sd["port"])) for name in sd["names"]}
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets.add((host, int(port)))
    return targets


def test_prometheus_scrapes_the_compose_services(services: dict[str, dict[str, Any]]) -> None:
    targets = prometheus_targets()
    assert targets == {("api", API_PORT), ("gpu-worker", METRICS_PORT), ("dispatcher", 9100)}
    assert {host for host, _ in targets} <= set(services)
    mount = "./ops/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    assert mount in services["prometheus"]["volumes"]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((OPS / "grafana/dashboards/dreamq.json").read_text())
    exprs = []
    for panel in dashboard["panels"]:
        exprs += [target["expr"] for target in panel.get("targets", [])]
    return exprs


def test_dashboard_queries_only_exported_metrics() -> None:
    exprs = dashboard_exprs()
    assert exprs
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bdreamq_[a-z0-9_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base in HISTOGRAMS:
                name = base
            assert name in API_METRICS | WORKER_METRICS, f"{name} is not exported: {expr}"
            used.add(name)
    assert used == API_METRICS | WORKER_METRICS, "every exported metric has a panel"


def test_dashboard_latency_panels_use_histogram_buckets() -> None:
    for expr in dashboard_exprs():
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and " le)" in expr


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in grafana["volumes"]}
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    (datasources_file,) = (OPS / "grafana/provisioning/datasources").glob("*.yml")
    (datasource,) = yaml.safe_load(datasources_file.read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (providers_file,) = (OPS / "grafana/provisioning/dashboards").glob("*.yml")
    (provider,) = yaml.safe_load(providers_file.read_text())["providers"]
    assert mounts["./ops/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads((OPS / "grafana/dashboards/dreamq.json").read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"]
    env = service_env(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


# ---- Kubernetes ------------------------------------------------------------------------------


def test_k8s_objects_are_well_formed(k8s_objects: list[tuple[str, dict[str, Any]]]) -> None:
    assert k8s_objects
    for file, obj in k8s_objects:
        assert obj.get("apiVersion") and obj.get("kind"), file
        assert obj.get("metadata", {}).get("name"), file
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "dreamq", file


def test_kustomization_lists_every_file() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {path.name for path in K8S.iterdir() if path.name != "kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert {image["name"] for image in kustomization["images"]} == set(IMAGE_DOCKERFILES)


def k8s_env_names(objects: list[tuple[str, dict[str, Any]]]) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for file, obj in objects:
        keys: set[str] = set()
        if obj["kind"] == "ConfigMap":
            keys = set(obj.get("data", {}))
        elif obj["kind"] == "Secret":
            keys = set(obj.get("stringData", {})) | set(obj.get("data", {}))
        elif obj["kind"] in ("Deployment", "Job"):
            for container in pod_spec(obj)["containers"]:
                keys |= {item["name"] for item in container.get("env", [])}
        names[f"{file}/{obj['kind']}/{obj['metadata']['name']}"] = keys
    return names


def test_k8s_uses_only_real_settings(k8s_objects: list[tuple[str, dict[str, Any]]]) -> None:
    seen = set()
    for where, keys in k8s_env_names(k8s_objects).items():
        dreamq_keys = {key for key in keys if key.startswith("DREAMQ_")}
        assert not dreamq_keys - SETTING_ENV_NAMES, f"{where}: {dreamq_keys - SETTING_ENV_NAMES}"
        seen |= dreamq_keys
    assert {"DREAMQ_REDIS_URL", "DREAMQ_MODELS_FILE", "DREAMQ_METRICS_PORT"} <= seen


def shared_env(objects: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    config = by_kind(objects, "ConfigMap")["dreamq-config"]["data"]
    secret = by_kind(objects, "Secret")["dreamq-secrets"]["stringData"]
    return {**config, **secret}


def test_k8s_settings_validate(
    k8s_objects: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in shared_env(k8s_objects).items():
        if key.startswith("DREAMQ_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert str(settings.models_file) == "/etc/dreamq/models.yaml"


def test_k8s_secret_is_a_template(k8s_objects: list[tuple[str, dict[str, Any]]]) -> None:
    for name, secret in by_kind(k8s_objects, "Secret").items():
        assert "data" not in secret, f"{name}: placeholders go in stringData"
        for key, value in secret["stringData"].items():
            if "PASSWORD" in value.upper() or "KEY" in key or key == "password":
                assert "CHANGE_ME" in value, f"{name}/{key} holds a value, not a placeholder"


def test_k8s_registry_configmap_is_mounted_at_the_models_file(
    k8s_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    registry = by_kind(k8s_objects, "ConfigMap")["dreamq-models"]
    models = yaml.safe_load(registry["data"]["models.yaml"])
    assert "demo" in models["models"]
    models_file = shared_env(k8s_objects)["DREAMQ_MODELS_FILE"]
    for name, deployment in by_kind(k8s_objects, "Deployment").items():
        volumes = {volume["name"]: volume for volume in pod_spec(deployment).get("volumes", [])}
        mounts = {mount["mountPath"]: mount for mount in only_container(deployment)["volumeMounts"]}
        mount = mounts[models_file]
        assert volumes[mount["name"]]["configMap"]["name"] == "dreamq-models", name
        assert mount["subPath"] == "models.yaml"


def test_k8s_references_resolve(k8s_objects: list[tuple[str, dict[str, Any]]]) -> None:
    config_maps = set(by_kind(k8s_objects, "ConfigMap"))
    secrets = set(by_kind(k8s_objects, "Secret"))
    claims = set(by_kind(k8s_objects, "PersistentVolumeClaim"))
    for kind in ("Deployment", "Job"):
        for name, workload in by_kind(k8s_objects, kind).items():
            for source in only_container(workload).get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, name
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, name
            for volume in pod_spec(workload).get("volumes", []):
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps, name
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, name


def test_k8s_commands_are_dreamq_subcommands(
    k8s_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    seen = set()
    for kind in ("Deployment", "Job"):
        for workload in by_kind(k8s_objects, kind).values():
            container = only_container(workload)
            commands = [container["command"]]
            if "exec" in container.get("livenessProbe", {}):
                commands.append(container["livenessProbe"]["exec"]["command"])
            for command in commands:
                argv = dreamq_argv(command)
                assert argv is not None, command
                assert_real_subcommand(argv)
                seen.add(argv[0])
    assert seen == {"api", "worker", "dispatcher", "workers", "tiny-model"}


def test_k8s_images_match_the_dockerfiles_purposes(
    k8s_objects: list[tuple[str, dict[str, Any]]], services: dict[str, dict[str, Any]]
) -> None:
    expected = {
        "dreamq-api": "dreamq-api",
        "dreamq-dispatcher": "dreamq-api",
        "dreamq-gpu-worker": "dreamq-worker",
        "dreamq-models-init": "dreamq-worker",
    }
    workloads = {**by_kind(k8s_objects, "Deployment"), **by_kind(k8s_objects, "Job")}
    assert set(workloads) == set(expected)
    for name, image in expected.items():
        assert only_container(workloads[name])["image"] == image, name
    # ... and compose builds the same images from the same Dockerfiles.
    compose_services = {
        "dreamq-api": "api",
        "dreamq-dispatcher": "dispatcher",
        "dreamq-gpu-worker": "gpu-worker",
        "dreamq-models-init": "models-init",
    }
    for name, service in compose_services.items():
        dockerfile = services[service]["build"]["dockerfile"]
        assert dockerfile == IMAGE_DOCKERFILES[expected[name]]


def test_k8s_api_deployment(k8s_objects: list[tuple[str, dict[str, Any]]]) -> None:
    api = by_kind(k8s_objects, "Deployment")["dreamq-api"]
    assert api["spec"]["replicas"] >= 2
    container = only_container(api)
    (port,) = container["ports"]
    assert port["containerPort"] == API_PORT
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["requests"]["cpu"]
    assert pod_spec(api)["securityContext"]["runAsNonRoot"] is True
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(API_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    service = by_kind(k8s_objects, "Service")["dreamq-api"]
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    hpa = by_kind(k8s_objects, "HorizontalPodAutoscaler")["dreamq-api"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "dreamq-api"
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_k8s_worker_deployments_export_metrics_and_check_liveness(
    k8s_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    deployments = by_kind(k8s_objects, "Deployment")
    for name, role in (("dreamq-gpu-worker", "generate"), ("dreamq-dispatcher", "webhooks")):
        deployment = deployments[name]
        container = only_container(deployment)
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env["DREAMQ_METRICS_PORT"] == str(METRICS_PORT)
        assert container["ports"][0]["containerPort"] == METRICS_PORT
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(METRICS_PORT)
        probe = container["livenessProbe"]["exec"]["command"]
        assert probe[-1] == f"dreamq workers --check {role}@$(hostname)"
        assert pod_spec(deployment)["securityContext"]["runAsNonRoot"] is True


def test_k8s_gpu_worker_requests_a_gpu_and_finishes_its_job(
    k8s_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    worker = by_kind(k8s_objects, "Deployment")["dreamq-gpu-worker"]
    assert "replicas" not in worker["spec"], "KEDA owns the replica count"
    assert int(only_container(worker)["resources"]["limits"]["nvidia.com/gpu"]) == 1
    spec = pod_spec(worker)
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    time_limit = float(shared_env(k8s_objects).get("DREAMQ_JOB_TIME_LIMIT", 0)) or (
        Settings().job_time_limit
    )
    assert spec["terminationGracePeriodSeconds"] >= time_limit


def test_keda_scales_the_gpu_worker_on_every_priority_list_of_the_generate_queue(
    k8s_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    (scaled,) = by_kind(k8s_objects, "ScaledObject").values()
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] in by_kind(k8s_objects, "Deployment")
    assert target["name"] == "dreamq-gpu-worker"
    queue = shared_env(k8s_objects)["DREAMQ_GENERATE_QUEUE"]
    assert queue == Settings().generate_queue
    triggers = scaled["spec"]["triggers"]
    lists = [lanes.list_name(queue, level) for level in range(lanes.LEVELS)]
    assert [trigger["metadata"]["listName"] for trigger in triggers] == lists
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    secrets = by_kind(k8s_objects, "Secret")
    for trigger in triggers:
        assert trigger["type"] == "redis"
        assert int(trigger["metadata"]["listLength"]) >= 1
        auths = by_kind(k8s_objects, "TriggerAuthentication")
        auth = auths[trigger["authenticationRef"]["name"]]
        parameters = set()
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets[ref["name"]]["stringData"]
            parameters.add(ref["parameter"])
        assert parameters == {"address", "password"}


def test_each_deployment_has_a_matching_disruption_budget(
    k8s_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    deployments = by_kind(k8s_objects, "Deployment")
    budgets = by_kind(k8s_objects, "PodDisruptionBudget")
    assert (
        set(budgets)
        == set(deployments)
        == {
            "dreamq-api",
            "dreamq-gpu-worker",
            "dreamq-dispatcher",
        }
    )
    for name, budget in budgets.items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        selector = budget["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), name
        assert deployments[name]["spec"]["selector"]["matchLabels"] == selector, name
