"""server/deploy/ cannot run here (no Docker, no cluster): check it parses and agrees with the code."""
import yaml

from recsys.server.__main__ import EXIT_SLACK_SECONDS, build_parser
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
    assert args.tls_cert and args.tls_key, "TLS on both ports"
    assert container["readinessProbe"]["httpGet"] == {"path": "/v1/health", "port": args.http_port, "scheme": "HTTPS"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v1/health/live", "port": args.http_port,
                                                     "scheme": "HTTPS"}, "the kubelet's grpc probes cannot speak TLS"
    assert ports["https"] == args.http_port
    tls_mount = next(mount for mount in container["volumeMounts"] if str(args.tls_cert).startswith(mount["mountPath"]))
    assert str(args.tls_key).startswith(tls_mount["mountPath"]) and {args.tls_cert.name, args.tls_key.name} == {
        "tls.crt", "tls.key"}, "the keys of a kubernetes.io/tls Secret"
    assert next(volume for volume in recommender["volumes"] if volume["name"] == tls_mount["name"])["secret"]
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
    assert [port["name"] for port in headless["ports"]] == ["grpc"], "metrics are not published beyond the pod"
    key_mount = next(mount for mount in container["volumeMounts"] if str(args.auth_jwt_key).startswith(mount["mountPath"]))
    secret = next(volume for volume in recommender["volumes"] if volume["name"] == key_mount["name"])["secret"]
    assert secret["items"][0]["path"] == args.auth_jwt_key.name, "the token key comes from a Secret"
    user = args.interactions_db.split("://")[1].split("@")[0]
    assert ":" not in user and "PGPASSWORD" in {variable["name"] for variable in container["env"]}, \
        "the password comes from a Secret, never in the arguments"


def test_compose_matches_the_server():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    args = build_parser().parse_args(compose["recommender"]["command"])
    assert args.tf_serving == "tf-serving:8500" and "ports" not in compose["tf-serving"], "TF Serving stays inside"
    assert compose["recommender"]["ports"] == [f"127.0.0.1:{args.port}:{args.port}"], "gRPC on loopback, nothing else"
    assert args.tls_cert and args.tls_key and args.auth_jwt_key, "TLS and scoped tokens"
    secrets = {volume.rsplit(":", 2)[1] for volume in compose["recommender"]["volumes"]}
    assert all(str(path.parent) in secrets for path in (args.tls_cert, args.tls_key, args.auth_jwt_key))
    host = args.interactions_db.split("@")[1].split(":")[0]
    assert args.interactions_db.startswith("postgresql://") and host in compose, "the store is one of the services"
    assert "PGPASSWORD" in compose["recommender"]["environment"]
    build = compose["recommender"]["build"]
    # The image is built from the repository root (the Dockerfile copies pyproject.toml and the packages).
    assert (DEPLOY / build["context"]).resolve() == REPO_ROOT.resolve()
    assert (REPO_ROOT / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
    assert (DEPLOY / "Dockerfile").read_text().count('ENTRYPOINT ["python", "-m", "recsys.server"]') == 1


def test_the_image_installs_the_serve_extra():
    import tomllib

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    serve = " ".join(extras["serve"])
    assert "tensorflow==" in serve and "tensorflow-serving-api" in serve and "tensorflow-recommenders" not in serve
    assert 'pip install --no-cache-dir ".[serve]"' in (DEPLOY / "Dockerfile").read_text()
