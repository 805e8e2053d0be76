"""The vLLM plugin's settings: environment variables or a TOML file, checked at start-up with the key named."""

from __future__ import annotations

import pytest

from canvaswatch.client.vllm_config import PluginConfig, PluginConfigError, load_config


def test_off_without_a_target_and_defaults_otherwise():
    assert load_config({}) == PluginConfig() and not PluginConfig().enabled
    config = load_config({"CANVASWATCH_VLLM_TARGET": "10.0.0.5:50051"})
    assert config.enabled and config.k == 8 and config.top_p is None and config.drop_policy == "oldest"
    assert config.gate == "off" and config.metadata() == []


def test_file_then_environment_which_wins(tmp_path):
    path = tmp_path / "canvaswatch-vllm.toml"
    path.write_text('target = "sidecar:50051"\nk = 4\ntop_p = 0.9\nsend_canvas = false\nauth_token = "s3cret"\n')
    config = load_config({"CANVASWATCH_VLLM_CONFIG": str(path), "CANVASWATCH_VLLM_K": "16",
                          "CANVASWATCH_VLLM_DROP_POLICY": "newest"})
    assert (config.target, config.k, config.top_p, config.send_canvas, config.drop_policy) == \
        ("sidecar:50051", 16, 0.9, False, "newest")
    assert config.metadata() == [("authorization", "Bearer s3cret")]
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize("environ, names", [
    ({"CANVASWATCH_VLLM_K": "0"}, "CANVASWATCH_VLLM_K"),
    ({"CANVASWATCH_VLLM_K": "eight"}, "CANVASWATCH_VLLM_K"),
    ({"CANVASWATCH_VLLM_TOP_P": "1.5"}, "CANVASWATCH_VLLM_TOP_P"),
    ({"CANVASWATCH_VLLM_DROP_POLICY": "block"}, "CANVASWATCH_VLLM_DROP_POLICY"),
    ({"CANVASWATCH_VLLM_TARGET": "no-port"}, "CANVASWATCH_VLLM_TARGET"),
    ({"CANVASWATCH_VLLM_SEND_CANVAS": "maybe"}, "CANVASWATCH_VLLM_SEND_CANVAS"),
    ({"CANVASWATCH_VLLM_VERDICT_TIMEOUT_S": "nan"}, "CANVASWATCH_VLLM_VERDICT_TIMEOUT_S"),
    ({"CANVASWATCH_VLLM_GATE_FAIL": "sometimes"}, "CANVASWATCH_VLLM_GATE_FAIL"),
])
def test_bad_values_name_the_variable(environ, names):
    with pytest.raises(PluginConfigError, match=names):
        load_config(environ)


def test_gate_modes_and_their_keys():
    config = load_config({"CANVASWATCH_VLLM_TARGET": "h:1", "CANVASWATCH_VLLM_GATE": "abort",
                          "CANVASWATCH_VLLM_GATE_SEVERITY": "warning", "CANVASWATCH_VLLM_GATE_FAIL": "closed"})
    assert (config.gate, config.gate_severity, config.gate_fail) == ("abort", "WARNING", "closed")
    config = load_config({"CANVASWATCH_VLLM_TARGET": "h:1", "CANVASWATCH_VLLM_GATE": "hold",
                          "CANVASWATCH_VLLM_GATE_BLOCK_AT": "warning", "CANVASWATCH_VLLM_GATE_BUDGET_S": "0.5",
                          "CANVASWATCH_VLLM_GATE_ON_TIMEOUT": "closed"})
    assert (config.gate, config.gate_block_at, config.gate_budget_s, config.gate_on_timeout) == \
        ("hold", "WARNING", 0.5, "closed")
    held = load_config({"CANVASWATCH_VLLM_TARGET": "h:1", "CANVASWATCH_VLLM_GATE": "hold"})
    assert (held.gate_block_at, held.gate_budget_s, held.gate_on_timeout) == ("CRITICAL", 2.0, "open")
    # gate = off ignores either mode's keys, so the gate can be switched off without editing the file
    assert load_config({"CANVASWATCH_VLLM_GATE_BUDGET_S": "1", "CANVASWATCH_VLLM_GATE_SEVERITY": "INFO"}).gate == "off"
    with pytest.raises(PluginConfigError, match="CANVASWATCH_VLLM_GATE: must be one of off, abort, hold"):
        load_config({"CANVASWATCH_VLLM_TARGET": "h:1", "CANVASWATCH_VLLM_GATE": "block"})


@pytest.mark.parametrize("environ, line", [
    ({"CANVASWATCH_VLLM_GATE": "abort", "CANVASWATCH_VLLM_GATE_BUDGET_S": "1"},
     "CANVASWATCH_VLLM_GATE_BUDGET_S: only used with gate = 'hold', but gate is 'abort'"),
    ({"CANVASWATCH_VLLM_GATE": "hold", "CANVASWATCH_VLLM_GATE_FAIL": "closed"},
     "CANVASWATCH_VLLM_GATE_FAIL: only used with gate = 'abort', but gate is 'hold'"),
    ({"CANVASWATCH_VLLM_GATE": "hold", "CANVASWATCH_VLLM_GATE_BUDGET_S": "0"},
     r"CANVASWATCH_VLLM_GATE_BUDGET_S: must be seconds in \(0, 30\], got 0.0"),
    ({"CANVASWATCH_VLLM_GATE": "hold", "CANVASWATCH_VLLM_GATE_BUDGET_S": "inf"}, "CANVASWATCH_VLLM_GATE_BUDGET_S: must be"),
    ({"CANVASWATCH_VLLM_GATE": "hold", "CANVASWATCH_VLLM_GATE_BUDGET_S": "20", "CANVASWATCH_VLLM_VERDICT_TIMEOUT_S": "10"},
     r"CANVASWATCH_VLLM_GATE_BUDGET_S: must not exceed verdict_timeout_s \(10\)"),
    ({"CANVASWATCH_VLLM_GATE": "hold", "CANVASWATCH_VLLM_GATE_BLOCK_AT": "severe"},
     "CANVASWATCH_VLLM_GATE_BLOCK_AT: must be one of INFO, WARNING, CRITICAL"),
    ({"CANVASWATCH_VLLM_GATE": "hold", "CANVASWATCH_VLLM_GATE_ON_TIMEOUT": "maybe"},
     "CANVASWATCH_VLLM_GATE_ON_TIMEOUT: must be 'open' or 'closed'"),
])
def test_bad_gate_combinations_are_refused_in_one_line_naming_the_key(environ, line):
    with pytest.raises(PluginConfigError, match=line) as refused:
        load_config({"CANVASWATCH_VLLM_TARGET": "h:1", **environ})
    assert "\n" not in str(refused.value)


def test_file_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("targte = 'h:1'\n")
    with pytest.raises(PluginConfigError, match=r"bad.toml: unknown key 'targte'"):
        load_config({"CANVASWATCH_VLLM_CONFIG": str(path)})
    path.write_text("k = 2.5\n")
    with pytest.raises(PluginConfigError, match=r"bad.toml: k: expected int"):
        load_config({"CANVASWATCH_VLLM_CONFIG": str(path)})
    with pytest.raises(PluginConfigError, match="cannot read it"):
        load_config({"CANVASWATCH_VLLM_CONFIG": str(tmp_path / "missing.toml")})


def test_plugin_module_imports_without_vllm_and_stays_off_without_a_target(monkeypatch):
    import sys

    import canvaswatch.client.vllm as plugin

    monkeypatch.delenv("CANVASWATCH_VLLM_TARGET", raising=False)
    monkeypatch.delenv("CANVASWATCH_VLLM_CONFIG", raising=False)
    plugin.register()  # nothing set: attaches nothing, imports no vLLM
    assert "vllm" not in sys.modules and not plugin._installed.get("hooked")
