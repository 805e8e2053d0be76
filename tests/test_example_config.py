"""The example config shipped in deploy/ stays valid."""

from pathlib import Path

from canvaswatch.server.config import DEFAULT_MONITORS, load_config


def test_deploy_example_config_loads_with_every_default_monitor():
    # A file that names monitors runs only those: the example a new user starts from must name all seven.
    config = load_config(Path(__file__).resolve().parents[1] / "deploy" / "sidecar.example.toml")
    assert [m.name for m in config.build_monitors()] == list(DEFAULT_MONITORS)
    assert config.server.grpc_port == 50051 and config.logging.log_content is False
