#!/usr/bin/env python3
"""Checks deploy/ without a Docker engine or a cluster. Run by deploy/check.sh, which
installs the packages (deploy/check-requirements.txt) and runs yamllint and
kubernetes-validate first.

* compose.yaml against the Compose Specification JSON schema (the copy vendored in
  the PyPI package check-jsonschema, validated with jsonschema: no network), then what
  a schema cannot see: depends_on targets, bind-mount sources, the build context, the
  INGEST_* names, and that every host:port the services point at is a service.
* The collector, Prometheus and Grafana files: pipelines name defined components,
  targets and datasources name compose services.
* The Dockerfile: stages, the build command CI runs, a non-root numeric USER matching
  the Kubernetes runAsUser, STOPSIGNAL, EXPOSE, HEALTHCHECK, ENV, and that every COPY
  source passes .dockerignore.
* Kubernetes: built-in kinds against the Kubernetes schemas (strict, offline, with
  kubernetes-validate's API; check.sh also runs its CLI on the files), the custom
  resources (RabbitmqCluster, Vhost, Policy, User, Permission), whose CRD schemas
  are not available offline, against strict schemas of the fields used here, written
  from the operators' API types; kustomization resource lists; the cross-references
  (selectors, named ports, ConfigMap, Secret, HPA target); and the drain and memory
  arithmetic. With kubectl on PATH, `kubectl kustomize` output is validated too.

Prints one line per check and every problem found; exits 1 if there is any.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
K8S = DEPLOY / "k8s"
# Kubernetes versions the manifests must validate against: an old supported one and
# the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]

problems: list[str] = []


def problem(where: str, message: str) -> None:
    problems.append(f"{where}: {message}")


def ok(message: str) -> None:
    print(f"  ok  {message}")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def load_all(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ---------------------------------------------------------------------------------
# Settings the service knows (src/config.rs), so deployments cannot set a typo.


def ingest_settings() -> set[str]:
    text = (REPO / "src" / "config.rs").read_text()
    names = set(re.findall(r'env\s*=\s*"(INGEST_[A-Z0-9_]+)"', text))
    if not names:
        problem("src/config.rs", "no `env = \"INGEST_...\"` settings found; the check is stale")
    return names


SETTINGS = ingest_settings()
# Read by the process besides the INGEST_* settings.
OTHER_ENV = re.compile(r"^(RUST_LOG|OTEL_[A-Z0-9_]+|POD_NAME|POD_NAMESPACE)$")


def check_env_names(where: str, names) -> None:
    for name in names:
        if name.startswith("INGEST_"):
            if name not in SETTINGS:
                problem(where, f"{name} is not a setting of ingest (src/config.rs)")
        elif not OTHER_ENV.match(name):
            problem(where, f"{name} is neither an INGEST_* setting nor RUST_LOG/OTEL_*")


def parse_size(raw: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*", raw)
    if not m:
        raise ValueError(raw)
    return int(m.group(1)) * {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[
        m.group(2)
    ]


def parse_seconds(raw: str) -> float:
    m = re.fullmatch(r"\s*(\d+)\s*(ms|s|m)\s*", raw)
    if not m:
        raise ValueError(raw)
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def k8s_quantity_bytes(raw: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|K|M|G)?", str(raw))
    if not m:
        raise ValueError(raw)
    units = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    return int(m.group(1)) * units[m.group(2)]


# ---------------------------------------------------------------------------------
# Compose


def compose_schema() -> dict:
    files = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((files / "compose-spec.json").read_text())


def host_port(url: str) -> tuple[str, int | None]:
    if "://" not in url:
        url = "//" + url
    parsed = urlparse(url)
    return parsed.hostname or "", parsed.port


def check_compose() -> dict:
    path = DEPLOY / "compose.yaml"
    where = rel(path)
    compose = load_all(path)[0]
    schema = compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose), key=lambda e: list(e.path))
    for e in errors:
        problem(where, f"{'/'.join(map(str, e.path)) or '(top)'}: {e.message}")
    if not errors:
        ok(f"{where} matches the Compose Specification schema ({schema.get('$schema')})")

    services = compose.get("services", {})
    for need in ("rabbitmq", "ingest", "otel-collector", "jaeger", "prometheus", "grafana"):
        if need not in services:
            problem(where, f"service {need!r} is missing")
    for name, svc in services.items():
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else deps.keys():
            if dep not in services:
                problem(where, f"{name}: depends_on {dep!r}, which is not a service")
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith((".", "/")):
                if not (DEPLOY / source).exists():
                    problem(where, f"{name}: bind-mount source {source} does not exist")
            elif source and source not in (compose.get("volumes") or {}):
                problem(where, f"{name}: volume {source!r} is not declared")
        build = svc.get("build")
        if build:
            context = DEPLOY / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / (
                "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            )
            if not dockerfile.is_file():
                problem(where, f"{name}: build uses {dockerfile}, which does not exist")
            if context.resolve() != REPO:
                problem(where, f"{name}: the build context must be the repository root")

    ingest = services.get("ingest", {})
    env = ingest.get("environment", {})
    env = dict(e.split("=", 1) for e in env) if isinstance(env, list) else env
    check_env_names(f"{where} ingest.environment", env)
    amqp_host, _ = host_port(env.get("INGEST_AMQP_URL", ""))
    if amqp_host not in services:
        problem(where, f"INGEST_AMQP_URL points at {amqp_host!r}, not at a service")
    otlp_host, otlp_port = host_port(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
    if otlp_host != "otel-collector" or otlp_port != 4317:
        problem(where, "OTEL_EXPORTER_OTLP_ENDPOINT must be http://otel-collector:4317")
    if env.get("OTEL_SERVICE_NAME") != "ingest":
        problem(where, "OTEL_SERVICE_NAME must be ingest")
    ports = {str(p).split(":")[-1] for p in ingest.get("ports", [])}
    if not {"50051", "9464"} <= ports:
        problem(where, "ingest must publish 50051 (gRPC) and 9464 (admin)")
    grace = parse_seconds(ingest.get("stop_grace_period", "10s"))
    if grace <= parse_seconds(env.get("INGEST_DRAIN_TIMEOUT", "25s")):
        problem(where, "ingest's stop_grace_period must exceed the drain timeout")
    rabbit_dep = (ingest.get("depends_on") or {}).get("rabbitmq", {})
    if not isinstance(rabbit_dep, dict) or rabbit_dep.get("condition") != "service_healthy":
        problem(where, "ingest must depend on rabbitmq with condition service_healthy")
    if "healthcheck" not in services.get("rabbitmq", {}):
        problem(where, "rabbitmq needs a healthcheck for service_healthy")
    ok(f"{where}: services, dependencies, mounts, build and ingest's environment agree")
    return compose


def check_compose_configs(compose: dict) -> None:
    services = compose.get("services", {})

    where = "deploy/otel-collector.yaml"
    otel = load_all(DEPLOY / "otel-collector.yaml")[0]
    for pipeline, spec in otel.get("service", {}).get("pipelines", {}).items():
        for section in ("receivers", "processors", "exporters"):
            for component in spec.get(section, []):
                if component not in (otel.get(section) or {}):
                    problem(where, f"pipeline {pipeline} uses undefined {section[:-1]} {component}")
    if "traces" not in otel.get("service", {}).get("pipelines", {}):
        problem(where, "no traces pipeline")
    grpc = otel.get("receivers", {}).get("otlp", {}).get("protocols", {}).get("grpc", {})
    if not str(grpc.get("endpoint", "")).endswith(":4317"):
        problem(where, "the OTLP receiver must listen for gRPC on :4317")
    for name, exporter in (otel.get("exporters") or {}).items():
        endpoint = (exporter or {}).get("endpoint")
        if endpoint and host_port(endpoint)[0] not in services:
            problem(where, f"exporter {name} points at {endpoint}, not at a compose service")
    if not any(
        (e or {}).get("endpoint", "").startswith("jaeger:")
        for e in (otel.get("exporters") or {}).values()
    ):
        problem(where, "no exporter forwards to jaeger")
    ok(f"{where}: pipelines use defined components; traces go to jaeger")

    where = "deploy/prometheus.yml"
    prom = load_all(DEPLOY / "prometheus.yml")[0]
    targets = [
        t
        for job in prom.get("scrape_configs", [])
        for sc in job.get("static_configs", [])
        for t in sc.get("targets", [])
    ]
    for t in targets:
        if host_port(t)[0] not in services:
            problem(where, f"target {t} is not a compose service")
    if "ingest:9464" not in targets:
        problem(where, "ingest:9464 (/metrics) is not scraped")
    ok(f"{where}: scrapes ingest:9464 and only compose services")

    where = "deploy/grafana/provisioning"
    prov = DEPLOY / "grafana" / "provisioning"
    datasources = load_all(prov / "datasources" / "prometheus.yaml")[0].get("datasources", [])
    if not any(
        d.get("type") == "prometheus" and host_port(d.get("url", ""))[0] == "prometheus"
        for d in datasources
    ):
        problem(where, "no Prometheus datasource pointing at the prometheus service")
    providers = load_all(prov / "dashboards" / "ingest.yaml")[0].get("providers", [])
    grafana_mounts = {
        v.split(":")[1]: v.split(":")[0] for v in services.get("grafana", {}).get("volumes", [])
    }
    for p in providers:
        path = p.get("options", {}).get("path")
        if grafana_mounts.get(path) != "./grafana/dashboards":
            problem(where, f"dashboard provider path {path} is not deploy/grafana/dashboards")
    if grafana_mounts.get("/etc/grafana/provisioning") != "./grafana/provisioning":
        problem(where, "grafana does not mount deploy/grafana/provisioning")
    dashboard = DEPLOY / "grafana" / "dashboards" / "ingest.json"
    if dashboard.exists():
        json.loads(dashboard.read_text())
        ok(f"{where}: Prometheus datasource and dashboard provider ({rel(dashboard)} parses)")
    else:
        ok(f"{where}: Prometheus datasource and dashboard provider ({rel(dashboard)} not there yet)")

    where = "deploy/rabbitmq/definitions.json"
    defs = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    user, password = host_port_user(services["ingest"]["environment"]["INGEST_AMQP_URL"])
    if not any(u["name"] == user for u in defs.get("users", [])):
        problem(where, f"INGEST_AMQP_URL's user {user} is not defined")
    exchange = services["ingest"]["environment"].get("INGEST_EXCHANGE", "events")
    if not any(e["name"] == exchange and e["type"] == "topic" for e in defs.get("exchanges", [])):
        problem(where, f"exchange {exchange} (topic) is not defined")
    ok(f"{where}: the user and the exchange ingest uses are defined")


def host_port_user(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    return parsed.username or "", parsed.password or ""


# ---------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def dockerignore_allows(source: str) -> bool:
    patterns = [
        p.strip()
        for p in (REPO / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.strip().startswith("#")
    ]
    if patterns[:1] != ["*"]:
        return True  # not an allowlist: nothing to check this simply
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    source = source.rstrip("/")
    return any(source == a or source.startswith(a + "/") for a in allowed)


def check_dockerfile() -> int | None:
    path = DEPLOY / "Dockerfile"
    where = rel(path)
    ins = dockerfile_instructions(path)
    froms = [i for i, (w, _) in enumerate(ins) if w == "FROM"]
    if len(froms) < 2:
        problem(where, "not multi-stage (needs a build and a runtime stage)")
        return None
    final = ins[froms[-1] :]
    builds = [a for w, a in ins if w == "RUN" and "cargo build --release --locked --bin ingest" in a]
    if len(builds) != 2:
        problem(
            where,
            "expected `cargo build --release --locked --bin ingest` twice "
            "(dependency layer, then the service)",
        )
    if not any(w == "RUN" and "touch" in a and "cargo build" in a for w, a in ins):
        problem(where, "the service build must touch src/ before building (stale placeholder)")
    # The dependency layer is built before src/ is copied.
    copy_src = next((i for i, (w, a) in enumerate(ins) if w == "COPY" and a.startswith("src")), None)
    first_build = next((i for i, (w, a) in enumerate(ins) if w == "RUN" and "cargo build" in a), None)
    if copy_src is None or first_build is None or first_build > copy_src:
        problem(where, "dependencies must be built (placeholder src/) before COPY src")
    base = final[0][1].split()[0]
    if not (base.startswith("debian:bookworm-slim") or base.startswith("gcr.io/distroless/cc")):
        problem(where, f"runtime image {base} is not debian:bookworm-slim or distroless/cc")
    users = [a for w, a in final if w == "USER"]
    uid = None
    if not users or not re.fullmatch(r"\d+(:\d+)?", users[-1]) or users[-1].startswith("0"):
        problem(where, "the runtime stage must end with a numeric non-root USER")
    else:
        uid = int(users[-1].split(":")[0])
    if ("STOPSIGNAL", "SIGTERM") not in final:
        problem(where, "STOPSIGNAL SIGTERM missing")
    exposed = {p for w, a in final if w == "EXPOSE" for p in a.split()}
    if not {"50051", "9464"} <= exposed:
        problem(where, "EXPOSE 50051 9464 missing")
    health = [a for w, a in final if w == "HEALTHCHECK"]
    if not health or "ingest-healthcheck" not in health[0]:
        problem(where, "HEALTHCHECK with deploy/healthcheck.sh missing")
    env = " ".join(a for w, a in final if w == "ENV")
    if "INGEST_LISTEN=0.0.0.0:50051" not in env:
        problem(where, "ENV INGEST_LISTEN=0.0.0.0:50051 missing")
    check_env_names(where, re.findall(r"([A-Z][A-Z0-9_]+)=", env))
    for w, a in ins:
        if w != "COPY" or "--from=" in a:
            continue
        args = [x for x in a.split() if not x.startswith("--")]
        for source in args[:-1]:
            if not dockerignore_allows(source):
                problem(where, f"COPY {source}: excluded by .dockerignore")
            if not (REPO / source).exists():
                problem(where, f"COPY {source}: not in the repository")
    ok(f"{where}: stages, build commands, user {users[-1] if users else '?'}, signal, ports, health check, COPY vs .dockerignore")
    return uid


# ---------------------------------------------------------------------------------
# Kubernetes: custom resources, strict schemas of the fields used here (from the
# operators' Go API types: rabbitmq/cluster-operator api/v1beta1,
# rabbitmq/messaging-topology-operator api/v1beta1).

DNS_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": DNS_NAME,
        "namespace": DNS_NAME,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
CLUSTER_REF = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": DNS_NAME, "namespace": DNS_NAME, "connectionSecret": {"type": "object"}},
    "additionalProperties": False,
}
QUANTITY = {"type": ["string", "integer"], "pattern": r"^\d+(\.\d+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$"}
RESOURCES = {
    "type": "object",
    "properties": {
        k: {"type": "object", "properties": {"cpu": QUANTITY, "memory": QUANTITY}, "additionalProperties": False}
        for k in ("requests", "limits")
    },
    "additionalProperties": False,
}


def crd(spec: dict, required: list[str]) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "rabbitmq.com/v1beta1"},
            "kind": {"type": "string"},
            "metadata": METADATA,
            "spec": {"type": "object", "required": required, "properties": spec, "additionalProperties": False},
        },
        "additionalProperties": False,
    }


CR_SCHEMAS = {
    "RabbitmqCluster": crd(
        {
            "replicas": {"type": "integer", "minimum": 0},
            "image": {"type": "string"},
            "imagePullSecrets": {"type": "array"},
            "service": {
                "type": "object",
                "properties": {
                    "type": {"enum": ["ClusterIP", "LoadBalancer", "NodePort"]},
                    "annotations": {"type": "object"},
                    "ipFamilyPolicy": {"type": "string"},
                },
                "additionalProperties": False,
            },
            "persistence": {
                "type": "object",
                "properties": {"storageClassName": {"type": "string"}, "storage": QUANTITY},
                "additionalProperties": False,
            },
            "resources": RESOURCES,
            # corev1.Affinity / Toleration: checked by the API server against the
            # embedded Kubernetes schema; here only the shape.
            "affinity": {"type": "object"},
            "tolerations": {"type": "array"},
            "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
            "skipPostDeploySteps": {"type": "boolean"},
            "rabbitmq": {
                "type": "object",
                "properties": {
                    "additionalPlugins": {
                        "type": "array",
                        "maxItems": 100,
                        "items": {"type": "string", "pattern": r"^\w+$", "maxLength": 100},
                    },
                    "additionalConfig": {"type": "string", "maxLength": 2000},
                    "advancedConfig": {"type": "string", "maxLength": 100000},
                    "envConfig": {"type": "string", "maxLength": 100000},
                },
                "additionalProperties": False,
            },
            "tls": {"type": "object"},
            "override": {"type": "object"},
        },
        ["replicas"],
    ),
    "Vhost": crd(
        {
            "name": {"type": "string", "minLength": 1},
            "tracing": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "defaultQueueType": {"enum": ["quorum", "classic", "stream"]},
            "rabbitmqClusterReference": CLUSTER_REF,
        },
        ["name", "rabbitmqClusterReference"],
    ),
    "Policy": crd(
        {
            "name": {"type": "string", "minLength": 1},
            "vhost": {"type": "string"},
            "pattern": {"type": "string"},
            "applyTo": {"enum": ["queues", "classic_queues", "quorum_queues", "exchanges", "all"]},
            "priority": {"type": "integer"},
            "definition": {
                "type": "object",
                "minProperties": 1,
                # Quorum-queue policy keys (https://www.rabbitmq.com/docs/quorum-queues).
                "propertyNames": {
                    "enum": [
                        "max-length",
                        "max-length-bytes",
                        "overflow",
                        "expires",
                        "message-ttl",
                        "dead-letter-exchange",
                        "dead-letter-routing-key",
                        "dead-letter-strategy",
                        "delivery-limit",
                        "queue-leader-locator",
                        "target-group-size",
                    ]
                },
                "properties": {"overflow": {"enum": ["drop-head", "reject-publish"]}},
            },
            "rabbitmqClusterReference": CLUSTER_REF,
        },
        ["name", "pattern", "definition", "rabbitmqClusterReference"],
    ),
    "User": crd(
        {
            "tags": {
                "type": "array",
                "items": {"enum": ["management", "policymaker", "monitoring", "administrator"]},
            },
            "importCredentialsSecret": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": DNS_NAME},
                "additionalProperties": False,
            },
            "rabbitmqClusterReference": CLUSTER_REF,
        },
        ["rabbitmqClusterReference"],
    ),
    "Permission": crd(
        {
            "user": {"type": "string"},
            "userReference": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": DNS_NAME},
                "additionalProperties": False,
            },
            "vhost": {"type": "string"},
            "permissions": {
                "type": "object",
                "properties": {k: {"type": "string"} for k in ("configure", "write", "read")},
                "additionalProperties": False,
            },
            "rabbitmqClusterReference": CLUSTER_REF,
        },
        ["vhost", "permissions", "rabbitmqClusterReference"],
    ),
}


def validate_builtin(where: str, doc: dict) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(map(str, e.path))
            problem(where, f"{doc.get('kind')} {path}: {e.message} (Kubernetes {version})")
        except Exception as e:  # SchemaNotFoundError, InvalidSchemaError
            problem(where, f"{doc.get('kind')}: {getattr(e, 'message', e)} (Kubernetes {version})")


def validate_custom(where: str, doc: dict) -> None:
    schema = CR_SCHEMAS.get(doc.get("kind"))
    if schema is None:
        problem(where, f"no schema for custom resource {doc.get('apiVersion')} {doc.get('kind')}")
        return
    for e in jsonschema.Draft202012Validator(schema).iter_errors(doc):
        problem(where, f"{doc['kind']} {'/'.join(map(str, e.path))}: {e.message}")


def check_kustomization(directory: Path) -> list[tuple[Path, dict]]:
    """Validates every resource a kustomization lists; returns (file, doc) pairs."""
    kpath = directory / "kustomization.yaml"
    where = rel(kpath)
    kust = load_all(kpath)[0]
    if kust.get("kind") != "Kustomization" or not str(kust.get("apiVersion", "")).startswith(
        "kustomize.config.k8s.io/"
    ):
        problem(where, "not a kustomize.config.k8s.io Kustomization")
    listed = kust.get("resources", [])
    present = sorted(
        p.name for p in directory.glob("*.y*ml") if p.name not in ("kustomization.yaml",)
    )
    for name in listed:
        if not (directory / name).is_file():
            problem(where, f"lists {name}, which does not exist")
    for name in present:
        if name not in listed:
            problem(where, f"{name} is in {rel(directory)} but not in resources")
    docs = []
    for name in listed:
        path = directory / name
        if not path.is_file():
            continue
        for doc in load_all(path):
            group = str(doc.get("apiVersion", "")).split("/")[0]
            if group == "rabbitmq.com":
                validate_custom(rel(path), doc)
            else:
                validate_builtin(rel(path), doc)
            docs.append((path, doc))
    kinds = ", ".join(sorted({d["kind"] for _, d in docs}))
    ok(f"{where}: {len(docs)} resources ({kinds}) valid (Kubernetes {' and '.join(K8S_VERSIONS)}; custom resources against their field schemas)")
    return docs


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_k8s_references(docs: list[tuple[Path, dict]], image_uid: int | None) -> None:
    where = "deploy/k8s"
    by_kind: dict[str, list[dict]] = {}
    for _, d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = by_kind.get("Deployment", [])
    if len(deployments) != 1:
        problem(where, "expected exactly one Deployment")
        return
    dep = deployments[0]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    container = spec["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if port_names.get("grpc") != 50051 or port_names.get("admin") != 9464:
        problem(where, "container ports must be grpc 50051 and admin 9464")
    if not matches(dep["spec"]["selector"]["matchLabels"], labels):
        problem(where, "Deployment selector does not match its pod labels")

    for svc in by_kind.get("Service", []):
        name = svc["metadata"]["name"]
        if not matches(svc["spec"].get("selector", {}), labels):
            problem(where, f"Service {name} selects no ingest pod")
        for p in svc["spec"]["ports"]:
            if isinstance(p.get("targetPort"), str) and p["targetPort"] not in port_names:
                problem(where, f"Service {name} targets unknown port {p['targetPort']}")
    if not any(s["spec"].get("clusterIP") == "None" for s in by_kind.get("Service", [])):
        problem(where, "no headless Service for client-side gRPC load balancing")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not matches(pdb["spec"]["selector"]["matchLabels"], labels):
            problem(where, "PodDisruptionBudget selects no ingest pod")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["kind"] != "Deployment" or ref["name"] != dep["metadata"]["name"]:
            problem(where, "HorizontalPodAutoscaler does not target the Deployment")
        if not any(m.get("resource", {}).get("name") == "cpu" for m in hpa["spec"]["metrics"]):
            problem(where, "HorizontalPodAutoscaler does not scale on CPU")
    if "replicas" in dep["spec"] and by_kind.get("HorizontalPodAutoscaler"):
        problem(where, "Deployment sets replicas while an HPA owns them (a re-apply resets them)")
    for np in by_kind.get("NetworkPolicy", []):
        if not matches(np["spec"]["podSelector"]["matchLabels"], labels):
            problem(where, "NetworkPolicy selects no ingest pod")
        ingress_ports = {p["port"] for r in np["spec"].get("ingress", []) for p in r.get("ports", [])}
        egress_ports = {p["port"] for r in np["spec"].get("egress", []) for p in r.get("ports", [])}
        for p in ingress_ports:
            if isinstance(p, str) and p not in port_names:
                problem(where, f"NetworkPolicy allows unknown named port {p}")
        if not {"grpc", "admin"} <= ingress_ports:
            problem(where, "NetworkPolicy ingress must allow grpc and admin")
        if not {5672, 5671, 53, 4317} <= egress_ports:
            problem(where, "NetworkPolicy egress must allow 5672, 5671, 53 and 4317")

    # Probes on the admin listener.
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("admin", 9464):
            problem(where, f"{probe} must GET {path} on the admin port")

    # Configuration: the ConfigMap it reads, the Secret for the URL, known names.
    configmaps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    data: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source.get("configMapRef", {}).get("name")
        if name not in configmaps:
            problem(where, f"envFrom ConfigMap {name} is not in the base")
        else:
            data.update(configmaps[name].get("data", {}))
    check_env_names("deploy/k8s/configmap.yaml", data)
    env = {e["name"]: e for e in container.get("env", [])}
    check_env_names("deploy/k8s/deployment.yaml env", env)
    url = env.get("INGEST_AMQP_URL", {})
    if "secretKeyRef" not in url.get("valueFrom", {}):
        problem(where, "INGEST_AMQP_URL (it holds a password) must come from a Secret")
    if "INGEST_AMQP_URL" in data:
        problem(where, "INGEST_AMQP_URL must not be in a ConfigMap")

    # Drain arithmetic: preStop sleep + drain timeout < grace period.
    grace = spec.get("terminationGracePeriodSeconds", 30)
    drain = parse_seconds(data.get("INGEST_DRAIN_TIMEOUT", "25s"))
    pre = container.get("lifecycle", {}).get("preStop", {})
    sleep = pre.get("sleep", {}).get("seconds")
    if sleep is None:
        cmd = pre.get("exec", {}).get("command", [])
        sleep = float(cmd[-1]) if cmd and cmd[0].endswith("sleep") else None
    if sleep is None:
        problem(where, "no preStop sleep (endpoints must drain before SIGTERM)")
        sleep = 0
    if not grace > sleep + drain:
        problem(where, f"terminationGracePeriodSeconds {grace} <= preStop {sleep}s + drain {drain}s")

    # Memory sized from the buffer: at least twice the buffer plus 64 MiB.
    resources = container.get("resources", {})
    buffer = parse_size(data.get("INGEST_BUFFER_BYTES", "64MiB"))
    for kind in ("requests", "limits"):
        memory = resources.get(kind, {}).get("memory")
        if memory is None or k8s_quantity_bytes(memory) < 2 * buffer + (64 << 20):
            problem(where, f"memory {kind} {memory} is below 2 x INGEST_BUFFER_BYTES + 64Mi")
    if "cpu" not in resources.get("requests", {}):
        problem(where, "no CPU request (the HPA's utilization is relative to it)")

    # Hardening.
    psc, csc = spec.get("securityContext", {}), container.get("securityContext", {})
    if not psc.get("runAsNonRoot"):
        problem(where, "runAsNonRoot must be true")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problem(where, "seccompProfile must be RuntimeDefault")
    if not csc.get("readOnlyRootFilesystem") or csc.get("allowPrivilegeEscalation") is not False:
        problem(where, "readOnlyRootFilesystem true and allowPrivilegeEscalation false required")
    if csc.get("capabilities", {}).get("drop") != ["ALL"]:
        problem(where, "capabilities must drop ALL")
    if image_uid is not None and psc.get("runAsUser") != image_uid:
        problem(where, f"runAsUser {psc.get('runAsUser')} is not the image's user {image_uid}")
    ok(f"{where}: selectors, ports, probes, ConfigMap/Secret, HPA, PDB, NetworkPolicy, drain ({sleep:g}s + {drain:g}s < {grace}s), memory vs buffer, security context")


def check_rabbitmq(docs: list[tuple[Path, dict]]) -> None:
    where = "deploy/k8s/rabbitmq"
    kinds = {d["kind"]: d for _, d in docs}
    cluster = kinds.get("RabbitmqCluster")
    if not cluster or cluster["spec"].get("replicas") != 3:
        problem(where, "a RabbitmqCluster with 3 replicas is required")
        return
    name = cluster["metadata"]["name"]
    for _, d in docs:
        ref = d.get("spec", {}).get("rabbitmqClusterReference")
        if ref is not None and ref.get("name") != name:
            problem(where, f"{d['kind']} {d['metadata']['name']} references cluster {ref.get('name')}")
    vhost = kinds.get("Vhost", {}).get("spec", {})
    policy = kinds.get("Policy", {}).get("spec", {})
    if vhost.get("defaultQueueType") != "quorum" and "default_queue_type = quorum" not in cluster[
        "spec"
    ].get("rabbitmq", {}).get("additionalConfig", ""):
        problem(where, "quorum queues are not made the default (Vhost defaultQueueType)")
    if policy.get("applyTo") != "quorum_queues" or policy.get("vhost") != vhost.get("name"):
        problem(where, "the Policy must apply to the quorum queues of ingest's vhost")
    ok(f"{where}: 3-replica cluster {name}, quorum default and policy on vhost {vhost.get('name')}")


def check_kubectl_render() -> None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        print("  --  kubectl not installed: `kubectl kustomize` rendering not checked")
        return
    for directory in (K8S, K8S / "rabbitmq"):
        where = f"kubectl kustomize {rel(directory)}"
        result = subprocess.run(
            [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            problem(where, result.stderr.strip())
            continue
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        for doc in docs:
            if str(doc.get("apiVersion", "")).startswith("rabbitmq.com/"):
                validate_custom(where, doc)
            else:
                validate_builtin(where, doc)
        images = {
            c["image"]
            for d in docs
            if d["kind"] == "Deployment"
            for c in d["spec"]["template"]["spec"]["containers"]
        }
        ok(f"{where}: renders {len(docs)} valid resources" + (f", image {', '.join(sorted(images))}" if images else ""))


def main() -> int:
    print("== deploy/compose.yaml and its configuration files")
    compose = check_compose()
    check_compose_configs(compose)
    print("== deploy/Dockerfile")
    uid = check_dockerfile()
    print("== deploy/k8s")
    docs = check_kustomization(K8S)
    check_k8s_references(docs, uid)
    check_rabbitmq(check_kustomization(K8S / "rabbitmq"))
    check_kubectl_render()
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("== deploy/ checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
