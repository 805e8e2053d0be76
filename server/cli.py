"""The `canvaswatch` command: serve, demo, check, replay, simulate, inspect, eval, import."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from canvaswatch.client.trace import TraceFileError
from canvaswatch.server.config import ConfigError, load_config
from canvaswatch.server.bottleneck.embedding import EmbeddingError
from canvaswatch.server.ops.logs import configure_logging
from canvaswatch.server.workers.pool import WorkerStartError
from canvaswatch.server.bottleneck.vocab import VocabularyError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="canvaswatch", description="Monitor sidecar for diffusion language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC sidecar")
    serve.add_argument("--config", help="TOML config (default: built-in monitors with their defaults)")
    serve.add_argument("--grpc-port", type=int, help="overrides server.grpc_port")
    serve.add_argument("--metrics-port", type=int, help="overrides server.metrics_port (-1: off)")
    serve.add_argument("--host", help="overrides server.host")
    serve.add_argument("--monitor-processes", type=int,
                       help="overrides server.monitor_processes (N > 0: decode and monitor in N worker processes)")
    serve.add_argument("--tls-cert", help="overrides server.tls_cert (PEM; serve TLS, with --tls-key)")
    serve.add_argument("--tls-key", help="overrides server.tls_key (PEM private key)")
    serve.add_argument("--tls-client-ca", help="overrides server.tls_client_ca (PEM; require client certificates)")

    demo = sub.add_parser("demo", help="a sidecar on its defaults plus simulated traffic, to see it work")
    demo.add_argument("--requests", type=_positive, default=None,
                      help="simulated requests to stream (default: every scenario once)")
    demo.add_argument("--concurrency", type=_positive, default=4, help="requests streamed at once (default: 4)")
    demo.add_argument("--grpc-port", type=int, default=50051, help="the demo sidecar's gRPC port (default: 50051)")
    demo.add_argument("--metrics-port", type=int, default=9464, help="its /metrics port (default: 9464)")
    demo.add_argument("--serve-after", action="store_true", help="keep the sidecar up after the traffic (Ctrl-C to stop)")
    demo.add_argument("--profile", default=None,
                      help="simulated dynamics: default, hot, high_entropy or default_noise_drafts "
                           "(default: default_noise_drafts, what the labelled corpus uses)")

    check = sub.add_parser("check", help="run a .cwtrace file through the monitors in-process")
    check.add_argument("trace", help="a .cwtrace file (canvaswatch simulate or import writes them)")
    check.add_argument("--config", help="TOML config whose monitors run (default: the built-in monitors)")
    check.add_argument("--json", action="store_true", help="print verdicts as JSON lines")

    replay = sub.add_parser("replay", help="stream a .cwtrace file to a running sidecar")
    replay.add_argument("trace", help="a .cwtrace file: each trace is streamed to the sidecar step by step")
    replay.add_argument("--target", required=True, type=_host_port, help="HOST:PORT of the sidecar")
    replay.add_argument("--token", help="bearer token, if the sidecar requires one")
    replay.add_argument("--tls-ca", help="PEM CA bundle: connect with TLS, trusting this CA (server.tls_cert's issuer)")
    replay.add_argument("--tls-cert", help="PEM client certificate, for a sidecar with server.tls_client_ca (with --tls-key)")
    replay.add_argument("--tls-key", help="PEM private key of --tls-cert")
    replay.add_argument("--json", action="store_true", help="print verdicts as JSON lines")

    record = sub.add_parser("simulate", help="write simulated traces (labelled SIMULATED) to a .cwtrace file")
    record.add_argument("output")
    record.add_argument("--requests", type=_positive, default=8, help="simulated requests to write (default: 8)")
    record.add_argument("--seed", type=int, default=0, help="seed of the simulation: same seed, same traces")
    record.add_argument("--corpus", action="store_true",
                        help="the labelled eval corpus: every scenario --per-scenario times (ignores --requests)")
    record.add_argument("--per-scenario", type=_positive, default=20, help="with --corpus: requests per scenario (default: 20)")
    record.add_argument("--profile", default=None,
                        help="simulated dynamics calibrated to the real model: default, hot, high_entropy or "
                             "default_noise_drafts (default: default_noise_drafts)")
    record.add_argument("--steps", type=int, default=None,
                        help=f"denoising steps per canvas (default: {HOT_STEPS} for --profile hot, whose positions keep "
                             f"changing for 30-60 steps, else {DEFAULT_STEPS})")
    record.add_argument("--canvas-length", type=int, default=64, help="positions per canvas (default: 64)")

    inspect = sub.add_parser("inspect", help="render a trace's denoising timeline as one self-contained HTML file")
    inspect.add_argument("trace", help="a .cwtrace file (canvaswatch simulate or import writes them)")
    inspect.add_argument("-o", "--output", required=True,
                         help="report.html; a file of several requests needs --request (which one) or --all "
                              "(report-<request id>.html each)")
    inspect.add_argument("--request", help="the request id to render, when the file holds several")
    inspect.add_argument("--all", action="store_true", help="one report per request: <output stem>-<request id>.html")
    inspect.add_argument("--config", help="the sidecar's TOML config: which monitors run (default: the built-in set)")

    imported = sub.add_parser("import", help="turn a real DiffusionGemma capture into a .cwtrace file (docs/importers.md)")
    imported.add_argument("format", help="gallery, clean, bench_order, films or poem")
    imported.add_argument("path", help="the capture: gallery.json, clean.json, bench_order.json, films_order.json, "
                                       "poem_order.json")
    imported.add_argument("-o", "--output", required=True, help="the .cwtrace file to write")
    imported.add_argument("--rule", default="committed", choices=("committed", "entropy"),
                          help="how probabilities are filled in (default: committed)")
    imported.add_argument("--k", type=int, default=4, help="top-k width (default: 4)")
    imported.add_argument("--curves", help="anim_curves.json for --rule entropy (default: beside PATH)")
    imported.add_argument("--seed", type=int, default=0, help="seed of the fill rules' random streams")
    imported.add_argument("--no-signals", action="store_true",
                          help="leave out the sampler signals (accepted, entropy, argmax_ids, temperature)")
    imported.add_argument("--canvas-length", type=int,
                          help="require this canvas length (clean, bench_order, poem; films: the content's canvas); "
                               "default: what the capture records")
    imported.add_argument("--skip-invalid", action="store_true",
                          help="leave out a malformed run (each named on stderr) instead of refusing the file")
    imported.add_argument("--steps", type=int,
                          help="clean only: steps per trace (default: the run's T, else max(48, last lock + 2))")

    evaluate = sub.add_parser("eval", help="precision, recall, FPR and AUROC of each monitor on labelled traces")
    evaluate.add_argument("traces", help=".cwtrace file whose traces carry a 'labels' attribute")
    evaluate.add_argument("--config", help="the sidecar's TOML config: which monitors run (default: the built-in set)")
    evaluate.add_argument("--json", dest="json_path", help="also write the scores to this JSON file")

    args = parser.parse_args(argv)
    try:
        return {
            "serve": _serve, "demo": _demo, "check": _check, "replay": _replay, "simulate": _simulate,
            "eval": _eval, "inspect": _inspect, "import": _import,
        }[args.command](args)
    except ConfigError as err:
        print(f"canvaswatch: configuration error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:  # an input that is not there: a usage error, like a file that is not a trace
        print(f"canvaswatch: {err.filename}: no such file" if err.filename else f"canvaswatch: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a port in use, an unreadable trace file: say what, not a traceback
        print(f"canvaswatch: {err}", file=sys.stderr)
        return 1
    except TraceFileError as err:  # a file that is not a .cwtrace (or a truncated one)
        print(f"canvaswatch: {err}", file=sys.stderr)
        return 2
    except (EmbeddingError, VocabularyError, WorkerStartError) as err:  # what start-up loads or spawns
        print(f"canvaswatch: cannot start: {err}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    given = (("grpc_port", args.grpc_port), ("metrics_port", args.metrics_port), ("host", args.host),
             ("monitor_processes", args.monitor_processes), ("tls_cert", args.tls_cert), ("tls_key", args.tls_key),
             ("tls_client_ca", args.tls_client_ca))
    overrides = {key: value for key, value in given if value is not None}
    config = config.with_server(**overrides) if overrides else config
    configure_logging(config.logging.level)
    from canvaswatch.server.app import Sidecar

    async def run() -> None:
        sidecar = Sidecar(config)
        await sidecar.start()
        stopping, hurry = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task] = set()

        def stop() -> None:  # SIGTERM / SIGINT: drain; a second one cuts the drain short
            (hurry if stopping.is_set() else stopping).set()

        def reload() -> None:  # SIGHUP: monitors for new streams from the config file (docs/operations.md)
            task = loop.create_task(sidecar.reload(args.config, overrides))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        loop.add_signal_handler(signal.SIGHUP, reload)
        await stopping.wait()
        await sidecar.drain(config.server.drain_grace_s, hurry)
        await sidecar.stop(grace=1.0)

    asyncio.run(run())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from canvaswatch.client import simulate
    from canvaswatch.client.replay import replay
    from canvaswatch.client.stream import channel_options
    from canvaswatch.server.app import SidecarThread
    from canvaswatch.server.config import default_config

    profile = _profile(args.profile)
    if profile is None:
        return 2
    config = default_config().with_server(grpc_port=args.grpc_port, metrics_port=args.metrics_port)
    configure_logging("warning", human=True)  # among the demo's own lines: readable, not JSON
    print("canvaswatch demo: starting the sidecar with the default monitors "
          "...", flush=True)  # a first run's one-time vocabulary conversion announces itself
    sidecar = SidecarThread(config).start()
    vocab = sidecar.sidecar.vocab
    print(f"  gRPC  {sidecar.target}   metrics  http://127.0.0.1:{sidecar.sidecar.metrics_port}/metrics", flush=True)
    print(f"  monitors: {', '.join(m.name for m in sidecar.sidecar.engine.monitors)}; vocabulary: {vocab.size} tokens")
    print("\nStreaming SIMULATED denoising traces (real text through the real Gemma tokenizer, simulated "
          "trajectories with planted phenomena):\n", flush=True)
    requests = args.requests if args.requests is not None else len(simulate.SCENARIOS)
    kinds = [simulate.SCENARIOS[i % len(simulate.SCENARIOS)] for i in range(requests)]
    traces = [simulate.scenario(kind, vocab.encode, vocab.size, request_id=f"demo-{i:03d}-{kind}", seed=i,
                                profile=profile)
              for i, kind in enumerate(kinds)]
    channel = grpc.insecure_channel(sidecar.target, options=channel_options())
    printing = threading.Lock()

    def show(event) -> None:
        if event.WhichOneof("event") == "flag":
            flag = event.flag
            with printing:
                snippet = flag.evidence[0].snippet if flag.evidence else ""
                print(f"  [{event.request_id}] FLAG {flag.monitor} {_severity(flag.severity)}: {flag.reason}"
                      + (f"\n      evidence: {snippet!r}" if snippet else ""), flush=True)

    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        verdicts = list(pool.map(lambda t: replay(t, channel, on_event=show), traces))
    elapsed = time.perf_counter() - started
    messages = sum(len(t.steps) for t in traces)
    steps = sum(v.steps_seen for v in verdicts)
    running = {m.name for m in sidecar.sidecar.engine.monitors}
    print("\nVerdicts (expects: the monitors that should flag the planted phenomenon; off: not running here):")
    for kind, verdict in zip(kinds, verdicts):
        expected = simulate.SCENARIO_LABELS.get(kind, ())
        expects = ", ".join(m if m in running else f"{m} (off by default)" for m in expected) or "no flag"
        print(f"  {verdict.request_id:<32} planted={kind:<17} flags={len(verdict.flags):<2} "
              f"max={_severity(verdict.max_severity):<8} steps_seen={verdict.steps_seen:<3} expects={expects}")
    print(f"\n{len(traces)} requests, {messages} messages in {elapsed:.2f} s over gRPC: {steps} denoising steps "
          f"(canvaswatch_steps_total) and {messages - steps} final messages, which carry each request's output "
          f"rather than a step.")
    if sidecar.sidecar.metrics_port:
        url = f"http://127.0.0.1:{sidecar.sidecar.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        print(f"\nFrom {url}:")
        for line in text.splitlines():
            if line.startswith(("canvaswatch_flags_total", "canvaswatch_requests_total", "canvaswatch_steps_total")):
                print("  " + line)
    channel.close()
    if args.serve_after:
        print(f"\nSidecar still serving on {sidecar.target}; Ctrl-C to stop.", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    sidecar.stop()
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("canvaswatch")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


DEFAULT_STEPS, HOT_STEPS = 24, 64  # simulate's steps per canvas: the hot sampler keeps changing for 30-60 steps


def _offline_engine(config_path: str | None):
    """An in-process engine for the offline commands (check, inspect, eval): no server, quiet logs.

    Errors only: a monitor's budget overrun is worth a warning where a client waits for the verdict,
    not here, where the first call of a kernel alone can overrun it (its effect, a stopped monitor,
    is in the verdict's monitor_errors either way). No audit log, whatever the configuration says:
    it is the record of served traffic, and a trace checked offline is not that."""
    from canvaswatch.server.pipeline.engine import Engine
    from canvaswatch.server.bottleneck.vocab import load_vocabulary

    config = load_config(config_path)
    config = dataclasses.replace(config, logging=dataclasses.replace(config.logging, audit_log=""))
    configure_logging("error")
    engine = Engine(config, load_vocabulary(config.vocab.tokenizer))
    if not engine.monitors:
        print(f"canvaswatch: {config_path}: no monitor is enabled (a config with [monitors.*] tables runs only the "
              "monitors it names and enables)", file=sys.stderr)
    return engine


def _check(args: argparse.Namespace) -> int:
    from canvaswatch.client.trace import read_traces
    from canvaswatch.server.pipeline.wire import verdict_to_pb
    from canvaswatch.server.errors import StepError
    from canvaswatch.server.transport.status import grpc_status

    engine = _offline_engine(args.config)
    for index, trace in enumerate(read_traces(args.trace)):
        try:
            verdict = verdict_to_pb(engine.check_trace(trace))
        except StepError as err:
            print(f"canvaswatch: trace {index}: {grpc_status(err.refusal).name}: {err.message}", file=sys.stderr)
            return 1
        _print_verdict(verdict, args.json, _simulated(trace))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from canvaswatch.client.replay import replay
    from canvaswatch.client.stream import WatchError, channel_options
    from canvaswatch.client.trace import read_traces

    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(args.tls_ca).read_bytes(),
            private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
            certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None)
        channel = grpc.secure_channel(args.target, credentials, options=channel_options())
    else:
        channel = grpc.insecure_channel(args.target, options=channel_options())
    with channel:
        for index, trace in enumerate(read_traces(args.trace)):
            try:
                verdict = replay(trace, channel, metadata=metadata)
            except WatchError as err:
                hint = f" (is a sidecar serving at {args.target}?)" if err.code == grpc.StatusCode.UNAVAILABLE else ""
                print(f"canvaswatch: trace {index}: {err}{hint}", file=sys.stderr)
                return 1
            _print_verdict(verdict, args.json, _simulated(trace))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from canvaswatch.client import simulate
    from canvaswatch.client.trace import write_traces
    from canvaswatch.server.bottleneck.vocab import load_vocabulary

    profile = _profile(args.profile)
    if profile is None:
        return 2
    if args.steps is None:
        args.steps = HOT_STEPS if profile == "hot" else DEFAULT_STEPS
    if args.steps < 6 or args.canvas_length < 16:
        print(f"canvaswatch: simulate: need --steps >= 6 and --canvas-length >= 16, got {args.steps} and "
              f"{args.canvas_length}", file=sys.stderr)
        return 2
    vocab = load_vocabulary()
    shape = {"steps": args.steps, "canvas_length": args.canvas_length, "profile": profile}
    if args.corpus:
        traces = simulate.labelled_corpus(vocab.encode, vocab.size, per_scenario=args.per_scenario, seed=args.seed,
                                          **shape)
    else:
        traces = [
            simulate.scenario(simulate.SCENARIOS[i % len(simulate.SCENARIOS)], vocab.encode, vocab.size,
                              request_id=f"sim-{args.seed}-{i:04d}", seed=args.seed + i, **shape)
            for i in range(args.requests)
        ]
    count = write_traces(Path(args.output), traces)
    print(f"wrote {count} SIMULATED traces to {args.output}")
    return 0


def _profile(name: str | None) -> str | None:
    """The simulator profile to use (the corpus's when `name` is None), or None after saying why it is unknown."""
    from canvaswatch.client import simulate

    if name is None:
        return simulate.CORPUS_PROFILE
    if name not in simulate.PROFILES:
        print(f"canvaswatch: --profile: unknown {name!r}; expected one of {', '.join(sorted(simulate.PROFILES))}",
              file=sys.stderr)
        return None
    return name


def _import(args: argparse.Namespace) -> int:
    from collections import Counter

    from canvaswatch.client.trace import write_traces
    from canvaswatch.server.importers import CaptureError, import_capture

    configure_logging("warning")
    skipped: list[CaptureError] = []
    failure: Exception | None = None
    try:
        traces = import_capture(args.format, Path(args.path), rule=args.rule, k=args.k,
                                curves=Path(args.curves) if args.curves else None, seed=args.seed,
                                signals=not args.no_signals, canvas_length=args.canvas_length, steps=args.steps,
                                on_invalid=skipped.append if args.skip_invalid else None)
    except (CaptureError, ValueError) as err:  # malformed capture or bad argument: one line, nothing written
        failure = err
    for skip in skipped:  # with --skip-invalid: what was wrong with each run left out (before any refusal)
        print(f"canvaswatch: import: skipped {skip}", file=sys.stderr)
    if failure is not None:
        print(f"canvaswatch: import: {failure}", file=sys.stderr)
        return 2
    count = write_traces(Path(args.output), traces)
    labels = Counter(label for t in traces for label in t.info.attributes["labels"].split(",") if label)
    unlabelled = sum(1 for t in traces if not t.info.attributes["labels"])
    summary = ", ".join(f"{name} {n}" for name, n in sorted(labels.items())) or "none"
    print(f"wrote {count} traces from {Path(args.path).name} (rule {args.rule}, k {args.k}) to {args.output}; "
          f"labels: {summary}; unlabelled {unlabelled}" + (f"; skipped {len(skipped)} malformed" if skipped else ""))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from canvaswatch.client.trace import read_traces
    from canvaswatch.server.errors import StepError
    from canvaswatch.server.transport.status import grpc_status
    from canvaswatch.server.ops.report import write_report

    traces = list(read_traces(args.trace))
    ids = [_request_id(trace) for trace in traces]
    if args.request is not None:
        if args.request not in ids:
            print(f"canvaswatch: inspect: no request {args.request!r} in {args.trace} (it holds "
                  f"{_some(ids)})", file=sys.stderr)
            return 2
        traces = [traces[ids.index(args.request)]]
    elif len(traces) > 1 and not args.all:
        print(f"canvaswatch: inspect: {args.trace} holds {len(traces)} requests ({_some(ids)}); choose one with "
              f"--request ID, or write one report each with --all", file=sys.stderr)
        return 2
    engine = _offline_engine(args.config)
    output = Path(args.output)
    for index, trace in enumerate(traces):
        try:
            history = engine.history_of(trace)
        except StepError as err:
            print(f"canvaswatch: trace {index}: {grpc_status(err.refusal).name}: {err.message}", file=sys.stderr)
            return 1
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in history.meta.request_id)[:100] or str(index)
        target = output if len(traces) == 1 else output.with_name(f"{output.stem}-{safe}{output.suffix}")
        write_report(history, engine.vocab, target)
        print(f"{history.meta.request_id}: {len(history.flags)} flag{'' if len(history.flags) == 1 else 's'} -> {target}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from canvaswatch.client.trace import read_traces
    from canvaswatch.server.evaluation.evaluate import as_json, as_table, evaluate

    engine = _offline_engine(args.config)
    scores = evaluate(engine, read_traces(args.traces))
    print(as_table(scores))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(as_json(scores), indent=2) + "\n")
    return 0


def _severity(value: int) -> str:
    from canvaswatch.v1 import monitor_pb2 as pb

    return pb.Severity.Name(value) if value else "NONE"


def _request_id(trace) -> str:
    info = trace.info if trace.info.request_id else (trace.steps[0].info if trace.steps else trace.info)
    return info.request_id


def _some(ids: list[str]) -> str:
    return ", ".join(ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")


def _positive(value: str) -> int:
    """A count of at least 1 (0 or less started a sidecar and then failed, or quietly did nothing)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return number


def _host_port(value: str) -> str:
    """HOST:PORT for --target; a bare host would silently dial gRPC's default port 443."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:50051), got {value!r}")
    return value


def _simulated(trace) -> bool:
    info = trace.info if trace.info.request_id else (trace.steps[0].info if trace.steps else trace.info)
    return info.attributes.get("simulated") == "true"


def _print_verdict(verdict, as_json: bool, simulated: bool = False) -> None:
    if as_json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(verdict, preserving_proto_field_name=True)))
        return
    print(f"{verdict.request_id}: max={_severity(verdict.max_severity)} flags={len(verdict.flags)} "
          f"steps_seen={verdict.steps_seen} steps_dropped={verdict.steps_dropped}"
          + (" (SIMULATED trace)" if simulated else ""))
    for flag in verdict.flags:
        print(f"  {flag.monitor} {_severity(flag.severity)}: {flag.reason}")
    for error in verdict.monitor_errors:
        print(f"  monitor error: {error}")


if __name__ == "__main__":
    sys.exit(main())
