"""The committed stubs are exactly what grpcio-tools generates from the committed .proto."""
import shutil
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_generated_code_is_up_to_date(tmp_path):
    """Generated as `make protos` does: from the proto at its installed path, recsys/v1/."""
    (tmp_path / "recsys" / "v1").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "protos" / "recommender.proto", tmp_path / "recsys" / "v1")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
                    "--pyi_out=.", "recsys/v1/recommender.proto"], cwd=tmp_path, check=True)
    for name in ("recommender_pb2.py", "recommender_pb2_grpc.py", "recommender_pb2.pyi"):
        generated = (tmp_path / "recsys" / "v1" / name).read_text()
        committed = (REPO_ROOT / "protos" / name).read_text()
        assert generated == committed, f"protos/{name} is stale: run 'make protos'"
