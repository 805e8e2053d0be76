"""server.large_canvas_nice: in-process, a stream of LARGE_CANVAS positions or more runs on a step
thread with a lower OS priority, and that thread is not reused for other streams.

A test monitor reports, in a flag, the niceness and the native id of the thread its on_step runs on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from canvaswatch.monitors.compiled import LARGE_CANVAS
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc
from tests.conftest import info_for, install_plugin_source, start_sidecar, topk_step

pytestmark = pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities need os.setpriority (Linux)")

WHERE = '''
import os, threading
from dataclasses import dataclass
from canvaswatch.monitors.base import Flag, Severity

@dataclass(frozen=True)
class Params:
    pass

class Where:
    name = "where"
    description = "flags the niceness and native id of the thread its on_step runs on (test plugin)"
    Params = Params

    def __init__(self, params):
        pass

    def start(self, request):
        return None

    def on_step(self, state, step):
        tid = threading.get_native_id()
        return [Flag(self.name, Severity.INFO, "where", attributes={
            "nice": str(os.getpriority(os.PRIO_PROCESS, tid)), "tid": str(tid)})]

    def on_finish(self, state, final):
        return []
'''


@pytest.fixture
def where_plugin(tmp_path: Path, monkeypatch):
    yield from install_plugin_source(tmp_path, monkeypatch, "cw_where_plugin", WHERE, {"where": "Where"})


def _settled(running) -> None:
    """The last stream's runner is back in the idle pool (or exited): a call's end reaches the client
    before the loop takes its runner back."""
    threads = running.thread.sidecar.threads
    deadline = time.monotonic() + 10
    while threads.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not threads.busy


def _where(running, request_id: str, length: int) -> tuple[int, int]:
    """(niceness, native thread id) of the step thread that ran one request of `length` positions."""
    ids = torch.full((length, 2), 3000, dtype=torch.int32) + torch.arange(2, dtype=torch.int32)
    steps = [topk_step(ids, torch.tensor([[0.7, 0.2]]).expand(length, 2), step=s,
                       info=info_for(request_id, length) if s == 0 else None) for s in range(2)]
    with running.channel() as channel:
        events = list(pb_grpc.CanvasMonitorStub(channel).Watch(
            iter([*steps, pb.StepState(final=True, output_ids=[3000])]), timeout=60))
    _settled(running)
    flags = [e.flag for e in events if e.HasField("flag") and e.flag.monitor == "where"]
    assert len(flags) == 2 and len({f.attributes["tid"] for f in flags}) == 1  # one stream, one thread
    return int(flags[0].attributes["nice"]), int(flags[0].attributes["tid"])


@pytest.mark.parametrize("nice", [0, 5])
def test_a_large_canvas_runs_on_a_nicer_thread_that_is_not_reused(vocab, tmp_path, where_plugin, nice):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base + nice > 19:
        pytest.skip(f"this process already runs at nice {base}")
    running = start_sidecar(vocab, tmp_path, {"server": {"large_canvas_nice": nice, "max_message_bytes": 16 << 20},
                                              "monitors": {"where": {}}})
    try:
        small_nice, small_tid = _where(running, "small-1", 64)
        again_nice, again_tid = _where(running, "small-2", 64)
        large_nice, large_tid = _where(running, "large-1", LARGE_CANVAS)
        after_nice, after_tid = _where(running, "small-3", 64)
    finally:
        running.thread.stop()
    assert small_nice == again_nice == after_nice == base
    assert again_tid == small_tid  # an ordinary runner goes back to the idle pool and serves the next stream
    assert large_nice == base + nice
    # Runners are reused last-in first-out: the large stream took the idle one, and the next stream gets
    # it back unless it was lowered (then it exited with its stream and a fresh one serves).
    assert large_tid == small_tid
    assert (after_tid != large_tid) if nice else (after_tid == large_tid)


def test_the_key_is_validated_naming_it():
    from canvaswatch.server.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"server.large_canvas_nice: must be in \[0, 19\] \(0: off\), got 20"):
        parse_config({"server": {"large_canvas_nice": 20}})


def test_only_a_streams_first_message_can_make_it_a_large_canvas(vocab):
    """The hook fires on the message that opens the request, not on an `info` a later message carries."""
    from canvaswatch.server.config import default_config
    from canvaswatch.server.pipeline.engine import Engine
    from canvaswatch.server.workers.protocol import Frame
    from canvaswatch.server.workers.streams import StreamTable

    engine = Engine(default_config(), vocab, monitors=[])
    calls = []
    for first_length, later_length, expected in ((64, LARGE_CANVAS, 0), (LARGE_CANVAS, LARGE_CANVAS, 1)):
        table = StreamTable(engine)
        table.on_large_canvas = lambda: calls.append(1)
        table.handle(Frame.OPEN, 1, b"")
        ids = torch.full((first_length, 2), 3000, dtype=torch.int32)
        table.handle(Frame.MESSAGE, 1, topk_step(ids, torch.tensor([[0.7, 0.2]]).expand(first_length, 2),
                                                  info=info_for("r", first_length)).SerializeToString())
        later = pb.StepState(step=1, info=info_for("r", later_length))
        table.handle(Frame.MESSAGE, 1, later.SerializeToString())  # refused or not, it must not lower
        assert len(calls) == expected
        calls.clear()
    engine.close()
