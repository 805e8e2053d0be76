"""One distribution, one import root: the built wheel works in a fresh virtual environment."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_protobuf_code_is_fresh():
    done = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_wheel_installs_and_imports_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = dist.glob("canvaswatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "canvaswatch/v1/monitor.proto" in names and "canvaswatch/client/data/texts.txt" in names
    assert not any(n.startswith(("server/", "client/", "monitors/", "tests/")) for n in names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # Dependencies come from this environment's site-packages via PYTHONPATH (it holds no canvaswatch
    # files of its own, only the editable hook, which PYTHONPATH does not run), so the import is the wheel's.
    site = sysconfig.get_paths()["purelib"]
    probe = (
        "import canvaswatch.server.app, canvaswatch.monitors.registry, canvaswatch.client, canvaswatch.v1.monitor_pb2 as pb;"
        "import canvaswatch.server, canvaswatch.client.simulate as s;"
        "print(canvaswatch.server.__file__); print(len(s.corpus())); print(pb.DESCRIPTOR.package)"
    )
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, env={"PYTHONPATH": site}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    server_file, texts, package = done.stdout.split()
    assert server_file.startswith(str(env_dir)) and int(texts) >= 5 and package == "canvaswatch.v1"
    entry = subprocess.run([env_dir / "bin" / "canvaswatch", "--help"], capture_output=True, text=True,
                           env={"PYTHONPATH": site})
    assert entry.returncode == 0 and "serve" in entry.stdout
