"""Alert and recording rules under promtool, and end to end with a real Prometheus scraping a real sidecar."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from canvaswatch.client import simulate
from canvaswatch.client.replay import replay
from tests.conftest import start_sidecar

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs Debian's prometheus package (installed by .ci/run)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus package (installed by .ci/run)")


@needs_promtool
def test_rules_are_valid_and_every_alert_has_a_unit_test():
    check = subprocess.run([PROMTOOL, "check", "rules", str(DEPLOY / "rules.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tested = subprocess.run([PROMTOOL, "test", "rules", str(DEPLOY / "tests.yml")], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = subprocess.run([PROMTOOL, "check", "config", str(DEPLOY / "scrape.yml")], capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr
    import yaml

    alerts = {r["alert"] for g in yaml.safe_load((DEPLOY / "rules.yml").read_text())["groups"] for r in g["rules"] if "alert" in r}
    covered = {t["alertname"] for test in yaml.safe_load((DEPLOY / "tests.yml").read_text())["tests"]
               for t in test.get("alert_rule_test", [])}
    assert alerts == covered and len(alerts) == 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(port: int, path: str, **query: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


def _until(deadline: float, probe, what: str):
    while True:
        try:
            result = probe()
            if result:
                return result
        except OSError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@needs_prometheus
def test_real_prometheus_scrapes_flags_and_fires_the_critical_alert(vocab, dense, tmp_path: Path):
    running = start_sidecar(vocab, tmp_path, dense=dense)
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{DEPLOY / 'rules.yml'}']\n"
        "scrape_configs:\n"
        "  - job_name: canvaswatch\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{running.thread.sidecar.metrics_port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        _until(deadline, lambda: _api(port, "query", query='up{job="canvaswatch"}')["data"]["result"], "the first scrape")
        with running.channel() as channel:
            verdict = replay(simulate.scenario("surviving_phrase", vocab.encode, vocab.size, request_id="prom-1", seed=2), channel)
        assert any(f.monitor == "lexicon" and f.severity == 3 for f in verdict.flags)

        series = _until(deadline, lambda: _api(port, "query", query='canvaswatch_flags_total{monitor="lexicon",severity="CRITICAL"}')["data"]["result"],
                        "the flag counter in Prometheus")
        assert float(series[0]["value"][1]) >= 1 and series[0]["metric"]["model"] == "simulated/diffusion"

        def alert():
            alerts = _api(port, "alerts")["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "CanvaswatchCriticalFlag" and a["state"] in ("pending", "firing")]

        [fired] = _until(deadline, alert, "CanvaswatchCriticalFlag")
        assert fired["labels"]["monitor"] == "lexicon" and fired["labels"]["severity"] == "page"
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        running.thread.stop()
