"""The canvaswatch command: simulate, check, replay, serve, demo (each run as a user would)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from canvaswatch.client.trace import TraceFileError, read_traces
from canvaswatch.server.cli import main

CLI = [sys.executable, "-m", "canvaswatch.server.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory, vocab) -> Path:
    path = tmp_path_factory.mktemp("traces") / "sim.cwtrace"
    assert main(["simulate", str(path), "--requests", "4", "--seed", "7"]) == 0
    return path


def test_simulate_writes_readable_labelled_traces(trace_file):
    traces = list(read_traces(trace_file))
    assert [t.info.attributes["scenario"] for t in traces] == ["clean", "transient_phrase", "surviving_phrase", "self_correction"]
    assert all(t.info.attributes["simulated"] == "true" and t.steps[-1].final for t in traces)
    assert {t.info.attributes["profile"] for t in traces} == {"default_noise_drafts"}


def test_simulate_takes_a_calibrated_profile(vocab, tmp_path, capsys):
    path = tmp_path / "hot.cwtrace"
    assert main(["simulate", str(path), "--requests", "2", "--profile", "hot"]) == 0
    traces = list(read_traces(path))
    assert [t.info.attributes["profile"] for t in traces] == ["hot", "hot"]
    assert all(t.info.total_steps == 64 for t in traces)  # the hot sampler's length unless --steps says otherwise
    assert main(["simulate", str(path), "--requests", "1", "--profile", "hot", "--steps", "30"]) == 0
    assert [t.info.total_steps for t in read_traces(path)] == [30]
    assert main(["simulate", str(path), "--profile", "tepid"]) == 2
    assert "--profile: unknown 'tepid'" in capsys.readouterr().err


def test_check_prints_a_verdict_per_trace(trace_file, capsys):
    assert main(["check", str(trace_file), "--json"]) == 0
    verdicts = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(verdicts) == 4
    by_id = {v["request_id"]: v for v in verdicts}
    surviving = next(v for k, v in by_id.items() if k.endswith("0002"))
    assert surviving["max_severity"] == "CRITICAL"
    assert "flags" not in next(v for k, v in by_id.items() if k.endswith("0000"))


def test_offline_commands_never_write_the_audit_log_of_served_traffic(trace_file, tmp_path, capsys):
    audit = tmp_path / "audit" / "audit.jsonl"
    config = tmp_path / "sidecar.toml"
    config.write_text(f'[logging]\naudit_log = "{audit}"\n')
    assert main(["check", str(trace_file), "--config", str(config)]) == 0
    assert "CRITICAL" in capsys.readouterr().out  # flags were raised, and none reached the audit log
    assert main(["eval", str(trace_file), "--config", str(config)]) in (0, 2)
    assert not audit.exists()


def test_replay_to_an_address_where_nothing_listens_says_what_to_check(trace_file, capsys):
    with socket.socket() as probe:  # a port just freed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["replay", str(trace_file), "--target", f"127.0.0.1:{port}"]) == 1
    assert f"(is a sidecar serving at 127.0.0.1:{port}?)" in capsys.readouterr().err


def test_check_reports_a_corrupt_file(tmp_path):
    path = tmp_path / "bad.cwtrace"
    path.write_bytes(b"\x05abc")
    with pytest.raises(TraceFileError, match="record 0 is truncated .*is it a .cwtrace"):
        list(read_traces(path))
    path.write_text("hello\n")  # a text file: its first byte reads as a length the rest cannot fill
    with pytest.raises(TraceFileError, match="record 0 is truncated .*`canvaswatch import`"):
        list(read_traces(path))


def test_config_errors_exit_2_naming_the_key(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('[monitors.lexicon]\nregex = ["(oops"]\n')
    assert main(["check", "nothing.cwtrace", "--config", str(config)]) == 2
    assert "monitors.lexicon.regex[0]: invalid regular expression" in capsys.readouterr().err


def test_serve_then_replay_over_real_processes(trace_file, tmp_path):
    grpc_port, metrics_port = _free_port(), _free_port()
    config = tmp_path / "sidecar.toml"
    audit = tmp_path / "audit.jsonl"
    config.write_text(f'[logging]\naudit_log = "{audit}"\n[monitors.lexicon]\n[monitors.self_correction]\n')
    server = subprocess.Popen(CLI + ["serve", "--config", str(config), "--grpc-port", str(grpc_port),
                                     "--metrics-port", str(metrics_port)],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                assert time.monotonic() < deadline, "sidecar did not start"
                time.sleep(0.3)
        replayed = subprocess.run(CLI + ["replay", str(trace_file), "--target", f"127.0.0.1:{grpc_port}", "--json"],
                                  capture_output=True, text=True, timeout=120)
        assert replayed.returncode == 0, replayed.stderr
        verdicts = [json.loads(line) for line in replayed.stdout.splitlines()]
        assert [v.get("max_severity", "NONE") for v in verdicts] == ["NONE", "WARNING", "CRITICAL", "WARNING"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'canvaswatch_requests_total{model="simulated/diffusion",outcome="ok"} 4.0' in metrics
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "sidecar_started" in events and "flag_raised" in events and "sidecar_stopped" in events
    assert len(audit.read_text().splitlines()) >= 5


def test_demo_runs_traffic_and_shows_flags_and_metrics():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(CLI + ["demo", "--requests", "4", "--grpc-port", str(_free_port()),
                                 "--metrics-port", str(_free_port())],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "SIMULATED" in out
    assert "FLAG lexicon CRITICAL" in out and "FLAG self_correction WARNING" in out
    assert 'canvaswatch_flags_total{model="simulated/diffusion",monitor="lexicon",severity="CRITICAL"} 1.0' in out
    assert not [line for line in done.stderr.splitlines() if line.startswith("{")], "JSON log lines among the demo's"


def test_human_logs_are_one_plain_line_each_and_json_stays_the_default(capsys):
    import structlog

    from canvaswatch.server.ops.logs import configure_logging

    try:
        configure_logging("warning", human=True)
        structlog.get_logger("t").warning("monitor_overrun", monitor="self_correction", seconds=0.12)
        structlog.get_logger("t").info("request_started")  # below the level: not shown
        [line] = capsys.readouterr().err.splitlines()
        assert "[warning" in line and "monitor_overrun" in line and "monitor=self_correction seconds=0.12" in line
        configure_logging("warning")
        structlog.get_logger("t").warning("monitor_overrun", monitor="self_correction")
        assert json.loads(capsys.readouterr().err)["event"] == "monitor_overrun"
    finally:
        structlog.reset_defaults()


def test_a_port_in_use_is_a_clear_error_not_a_traceback(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--grpc-port", "0", "--metrics-port", str(port)]) == 1
        assert main(["serve", "--grpc-port", str(port), "--metrics-port", "-1"]) == 1
    err = capsys.readouterr().err
    assert f"server.metrics_port: cannot bind 127.0.0.1:{port}" in err
    assert f"server.grpc_port: cannot bind 127.0.0.1:{port}" in err and "Traceback" not in err


def test_a_host_not_of_this_machine_names_the_host_and_the_reason(capsys):
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: it said "server.grpc_port ... (in use?)", after a
    # line of gRPC's C core
    assert main(["serve", "--host", "192.0.2.1", "--grpc-port", str(_free_port()), "--metrics-port", "-1"]) == 1
    [line] = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("{")]  # (JSON: the log)
    assert line.startswith("canvaswatch: server.host: cannot bind 192.0.2.1:") and "in use" not in line
    assert "assign requested address" in line


def test_a_missing_trace_file_is_a_clear_error(capsys, tmp_path):
    assert main(["check", str(tmp_path / "absent.cwtrace")]) == 2  # a usage error, like a file that is no trace
    assert capsys.readouterr().err.strip() == f"canvaswatch: {tmp_path / 'absent.cwtrace'}: no such file"
    out = tmp_path / "new" / "folder" / "sim.cwtrace"  # an output's folder is made, as inspect -o makes it
    assert main(["simulate", str(out), "--requests", "1"]) == 0 and len(list(read_traces(out))) == 1


def test_an_empty_trace_file_is_refused_not_passed(capsys, tmp_path):
    empty = tmp_path / "empty.cwtrace"
    empty.write_bytes(b"")
    for command in (["check", str(empty)], ["eval", str(empty)], ["inspect", str(empty), "-o", str(tmp_path / "r.html")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "empty.cwtrace: holds no trace" in err


def test_a_port_in_use_with_monitor_workers_leaves_no_worker_behind(capsys):
    import multiprocessing

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--grpc-port", str(port), "--metrics-port", "-1", "--monitor-processes", "1"]) == 1
    assert f"server.grpc_port: cannot bind 127.0.0.1:{port}" in capsys.readouterr().err
    assert multiprocessing.active_children() == []  # the started worker was stopped, not orphaned


def test_an_unloadable_vocabulary_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    config = tmp_path / "sidecar.toml"
    config.write_text(f'[vocab]\ntokenizer = "{tmp_path / "absent"}"\n')
    assert main(["serve", "--config", str(config), "--grpc-port", "0", "--metrics-port", "-1"]) == 1
    err = capsys.readouterr().err
    assert "cannot start: vocab.tokenizer" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the config is valid here")
def test_a_cuda_device_without_cuda_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    config = tmp_path / "sidecar.toml"
    config.write_text('[dense]\ndevice = "cuda"\n')
    assert main(["serve", "--config", str(config), "--grpc-port", "0", "--metrics-port", "-1"]) == 1
    err = capsys.readouterr().err
    assert "cannot start: dense.device: 'cuda', but this torch has no CUDA device" in err and "Traceback" not in err


def test_a_file_that_is_not_a_trace_gets_one_line_not_a_traceback(tmp_path, capsys):
    junk = tmp_path / "notes.txt"
    junk.write_text("these are notes, not a .cwtrace file\n" * 4)
    for command in (["check", str(junk)], ["inspect", str(junk), "-o", str(tmp_path / "r.html")],
                    ["replay", str(junk), "--target", "127.0.0.1:9"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "notes.txt: record 0 is not a canvaswatch.v1.Trace" in err
        assert "canvaswatch import" in err and "Traceback" not in err


def test_a_target_without_a_port_is_refused_instead_of_dialling_443(trace_file, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["replay", str(trace_file), "--target", "localhost"])
    assert exited.value.code == 2 and "expected HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["demo", "--concurrency", "0"], ["demo", "--requests", "-1"],
                                  ["simulate", "x.cwtrace", "--requests", "0"], ["simulate", "x.cwtrace", "--requests", "2.5"]])
def test_counts_below_one_are_refused_before_anything_starts(argv, capsys):
    # demo --concurrency 0 started a sidecar, then died with a traceback; simulate --requests -1 wrote nothing, exit 0
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and "expected a whole number >= 1" in capsys.readouterr().err


def test_check_says_simulated_for_simulated_traces(trace_file, capsys):
    assert main(["check", str(trace_file)]) == 0
    verdict_lines = [line for line in capsys.readouterr().out.splitlines() if " max=" in line]
    assert len(verdict_lines) == 4 and all(line.endswith("(SIMULATED trace)") for line in verdict_lines)


def test_inspect_writes_what_was_asked_for_a_file_of_several_requests(trace_file, tmp_path, capsys):
    report = tmp_path / "report.html"
    assert main(["inspect", str(trace_file), "-o", str(report)]) == 2  # several requests: which one?
    assert "--request ID" in capsys.readouterr().err and not report.exists()
    ids = [t.info.request_id for t in read_traces(trace_file)]
    assert main(["inspect", str(trace_file), "-o", str(report), "--request", ids[1]]) == 0
    assert report.exists() and ids[1] in report.read_text()
    assert main(["inspect", str(trace_file), "-o", str(report), "--request", "nope"]) == 2
    assert main(["inspect", str(trace_file), "-o", str(tmp_path / "all.html"), "--all"]) == 0
    assert sorted(p.name for p in tmp_path.glob("all-*.html")) == sorted(f"all-{i}.html" for i in ids)


def test_version_names_the_installed_package(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("canvaswatch 0.")


def test_a_config_that_enables_no_monitor_says_so(trace_file, tmp_path, capsys):
    # "[monitors.lexicon] enabled = false" alone runs no monitor at all: a sidecar that watches nothing
    config = tmp_path / "off.toml"
    config.write_text("[monitors.lexicon]\nenabled = false\n")
    assert main(["check", str(trace_file), "--config", str(config)]) == 0
    assert "no monitor is enabled" in capsys.readouterr().err
