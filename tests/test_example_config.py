"""The example config shipped in deploy/ stays valid."""

import dataclasses
import re
from pathlib import Path

from canvaswatch.server import config as sections
from canvaswatch.server.config import DEFAULT_MONITORS, load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "sidecar.example.toml"


def test_deploy_example_config_loads_with_every_default_monitor():
    # A file that names monitors runs only those: the example a new user starts from must name all seven.
    config = load_config(Path(__file__).resolve().parents[1] / "deploy" / "sidecar.example.toml")
    assert [m.name for m in config.build_monitors()] == list(DEFAULT_MONITORS)
    assert config.server.grpc_port == 50051 and config.logging.log_content is False


def test_the_example_config_shows_every_key_of_every_section():
    # The README sends users there "for every key": a key added to a section must be shown in it too.
    text = EXAMPLE.read_text()
    for name, section in (("server", sections.ServerSection), ("vocab", sections.VocabSection),
                          ("dense", sections.DenseSection), ("logging", sections.LoggingSection)):
        body = re.search(rf"^\[{name}\][^\n]*\n(.*?)(?=^\[|\Z)", text, re.S | re.M).group(1)
        missing = [f.name for f in dataclasses.fields(section) if not re.search(rf"^#?\s*{f.name}\s*=", body, re.M)]
        assert not missing, f"[{name}] in {EXAMPLE.name} lacks {missing}"
