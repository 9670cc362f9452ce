"""server/deploy/ cannot run here (no Docker, no cluster): check it parses and agrees with the code."""
import yaml

from server.__main__ import EXIT_SLACK_SECONDS, build_parser
from server.app import LIVENESS_SERVICE, SERVICE_NAME
from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "server" / "deploy"


def _by_kind_and_name(documents):
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}


def test_kubernetes_manifest_matches_the_server():
    objects = _by_kind_and_name(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    recommender = objects[("Deployment", "recommender")]["spec"]["template"]["spec"]
    container = recommender["containers"][0]
    args = build_parser().parse_args(container["args"])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert args.port == ports["grpc"] and args.metrics_port == ports["metrics"]
    assert container["readinessProbe"]["grpc"] == {"port": args.port, "service": SERVICE_NAME}
    assert container["livenessProbe"]["grpc"] == {"port": args.port, "service": LIVENESS_SERVICE}
    assert recommender["terminationGracePeriodSeconds"] >= args.grace_seconds + EXIT_SLACK_SECONDS
    assert container["imagePullPolicy"] == "IfNotPresent", "a local recsys:latest is never pulled"
    claim = objects[("PersistentVolumeClaim", "recsys-models")]["spec"]
    assert claim["accessModes"] == ["ReadWriteMany"], "written by training, read by every pod"
    tf_host, tf_port = args.tf_serving.split(":")
    tf_service = objects[("Service", tf_host)]
    assert int(tf_port) in [port["port"] for port in tf_service["spec"]["ports"]]
    tf_container = objects[("Deployment", tf_host)]["spec"]["template"]["spec"]["containers"][0]
    assert int(tf_port) in [port["containerPort"] for port in tf_container["ports"]]
    assert f"--model_config_file={args.models}/models.config" in tf_container["args"]
    headless = objects[("Service", "recommender")]["spec"]
    assert headless["clusterIP"] == "None" and headless["selector"] == {"app": "recommender"}
    assert args.interactions_db.startswith("postgresql://"), "replicas share one interaction store"
    user = args.interactions_db.split("://")[1].split("@")[0]
    assert ":" not in user and "PGPASSWORD" in {variable["name"] for variable in container["env"]}, \
        "the password comes from a Secret, never in the arguments"


def test_compose_matches_the_server():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    args = build_parser().parse_args(compose["recommender"]["command"])
    assert args.tf_serving == "tf-serving:8500" and "8500:8500" in compose["tf-serving"]["ports"]
    assert f"{args.port}:{args.port}" in compose["recommender"]["ports"]
    host = args.interactions_db.split("@")[1].split(":")[0]
    assert args.interactions_db.startswith("postgresql://") and host in compose, "the store is one of the services"
    assert "PGPASSWORD" in compose["recommender"]["environment"]
    build = compose["recommender"]["build"]
    # The image is built from the repository root (the Dockerfile copies pyproject.toml and the packages).
    assert (DEPLOY / build["context"]).resolve() == REPO_ROOT.resolve()
    assert (REPO_ROOT / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
    assert (DEPLOY / "Dockerfile").read_text().count('ENTRYPOINT ["python", "-m", "server"]') == 1


def test_the_image_installs_the_serve_extra():
    import tomllib

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    serve = " ".join(extras["serve"])
    assert "tensorflow==" in serve and "tensorflow-serving-api" in serve and "tensorflow-recommenders" not in serve
    assert 'pip install --no-cache-dir ".[serve]"' in (DEPLOY / "Dockerfile").read_text()
