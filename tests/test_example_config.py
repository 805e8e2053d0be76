"""The example config shipped in deploy/ stays valid."""

from pathlib import Path

from canvaswatch.server.config import load_config


def test_deploy_example_config_loads_with_both_monitors():
    config = load_config(Path(__file__).resolve().parents[1] / "deploy" / "sidecar.example.toml")
    assert [m.name for m in config.build_monitors()] == ["lexicon", "self_correction"]
    assert config.server.grpc_port == 50051 and config.logging.log_content is False
