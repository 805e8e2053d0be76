"""Assemble and run the sidecar: grpc.aio server, health, reflection, auth, metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from canvaswatch.monitors.base import Vocabulary
from canvaswatch.server.transport.auth import BearerTokenInterceptor
from canvaswatch.server.config import Config, ServerSection, load_config
from canvaswatch.server.bottleneck.dense import DenseDecoder
from canvaswatch.server.pipeline.engine import Engine
from canvaswatch.server.ops.metrics import Metrics
from canvaswatch.server.ops.merged_metrics import merged_registry
from canvaswatch.server.workers.pool import MonitorWorkers
from canvaswatch.server.workers.threads import StepThreads
from canvaswatch.server.transport.relay import RelayWatch, relay_handler
from canvaswatch.server.transport.status import SERVICE_NAME
from canvaswatch.server.transport.lifecycle import StreamLimits, StreamSlots
from canvaswatch.server.transport.servicer import CanvasMonitorServicer
from canvaswatch.server.bottleneck.vocab import load_vocabulary

log = structlog.get_logger(__name__)


class Sidecar:
    """One sidecar: call `await start()`, then `await wait()` or `await stop()`."""

    def __init__(self, config: Config, vocab: Vocabulary | None = None, metrics: Metrics | None = None,
                 dense: DenseDecoder | None = None) -> None:
        self.config = config
        self.vocab = vocab or load_vocabulary(config.vocab.tokenizer)
        self.engine = Engine(config, self.vocab, metrics=metrics, dense=dense)
        self.engine.warm_up()
        # Reloads and engine closes only: steps and Check run on step threads (workers/threads.py).
        self.executor = ThreadPoolExecutor(max_workers=config.server.workers, thread_name_prefix="canvaswatch-ops")
        # Workers build their own engine from `config` (vocabulary, monitors); only the matrix is handed over.
        self.workers = (MonitorWorkers(config, self.engine.dense.embeddings, log_level=config.logging.level,
                                       killed=self.engine.metrics.workers_killed.inc)
                        if config.server.monitor_processes else None)
        self.threads: StepThreads | None = None
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._health: health.aio.HealthServicer | None = None
        self.slots: StreamSlots | None = None
        self.servicer: CanvasMonitorServicer | None = None
        # One reload at a time, in signal order: each reads the file when its turn comes, so the last
        # SIGHUP's engine is the one installed (two built at once finished in any order).
        self._reloading = asyncio.Lock()

    async def start(self) -> int:
        s = self.config.server
        credentials = server_credentials(s)  # before anything starts: a bad file stops nothing half-started
        interceptors = [BearerTokenInterceptor(s.auth_tokens)] if s.auth_tokens else []
        server = grpc.aio.server(options=server_options(s), interceptors=interceptors)
        metrics = self.engine.metrics
        slots = StreamSlots(StreamLimits.of(s), metrics.active_streams, metrics.streams_refused, s.auth_tokens)
        servicer = CanvasMonitorServicer(self.engine, self.executor, slots)
        threads = self.threads = StepThreads(servicer.borrow, servicer.give_back, metrics,
                                             hard_deadline_s=s.monitor_hard_deadline_s, dense_concurrency=s.workers,
                                             large_canvas_nice=s.large_canvas_nice)
        threads.start()
        servicer.threads = threads
        self.slots, self.servicer = slots, servicer
        exposed = self.engine.metrics.registry
        if self.workers is None:
            server.add_generic_rpc_handlers((relay_handler(RelayWatch(threads, metrics, slots), servicer),))
        else:
            await self.workers.start()
            server.add_generic_rpc_handlers((relay_handler(RelayWatch(self.workers, metrics, slots), servicer),))
            exposed = merged_registry(self.engine.metrics.registry, self.workers.metric_snapshots)
        health_servicer = self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{s.host}:{s.grpc_port}"
        # Found before gRPC tries (its C core logs a line of its own): a port in use, an address not of this machine.
        problem = _bind_problem(s.host, s.grpc_port) if s.grpc_port else None
        if problem is not None and problem.errno != errno.EADDRINUSE:
            self._stop_workers()
            raise OSError(f"server.host: cannot bind {s.host}:{s.grpc_port}: {problem.strerror}")
        if problem is not None:
            self.grpc_port = 0
        else:
            try:
                self.grpc_port = (server.add_secure_port(address, credentials) if credentials is not None
                                  else server.add_insecure_port(address))
            except RuntimeError:  # grpc reports a failed bind as RuntimeError (older versions: port 0)
                self.grpc_port = 0
        if self.grpc_port == 0:
            self._stop_workers()
            why = "in use?" if not s.tls_cert else "in use, or server.tls_cert and tls_key not a certificate and its key?"
            raise OSError(f"server.grpc_port: cannot bind {s.host}:{s.grpc_port} ({why})")
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        def serving_changed(_: bool) -> None:
            """No worker up / a step thread stuck, and back: the service (readiness) says so; "" (liveness)
            stays SERVING, so a probe routes traffic elsewhere without restarting a process that recovers.
            Both are asked each time: in worker mode a Check's stuck thread and a replaced worker overlap."""
            if self.slots is not None and self.slots.draining:
                return  # shutting down: NOT_SERVING stays
            serving = not threads.stuck and (self.workers is None or any(w.alive for w in self.workers.workers))
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            asyncio.get_running_loop().create_task(health_servicer.set(SERVICE_NAME, status))

        threads.on_serving_change = serving_changed
        if self.workers is not None:
            self.workers.on_serving_change = serving_changed
        metrics_host = s.metrics_host or s.host
        try:
            self._metrics_http = (self.engine.metrics.serve(metrics_host, s.metrics_port, exposed)
                                  if s.metrics_port >= 0 else None)
        except (OSError, UnicodeError) as err:  # a port in use, or an address that is not this machine's
            await server.stop(0)
            self._stop_workers()
            bad_address = isinstance(err, (socket.gaierror, UnicodeError)) or getattr(err, "errno", None) == errno.EADDRNOTAVAIL
            key = "server.metrics_host" if s.metrics_host and bad_address else "server.metrics_port"
            raise OSError(f"{key}: cannot bind {metrics_host}:{s.metrics_port}: "
                          f"{getattr(err, 'strerror', None) or err}") from None
        if self._metrics_http is not None:
            self.metrics_port = self._metrics_http[0].server_port
        self._server = server
        log.info("sidecar_started", grpc=f"{s.host}:{self.grpc_port}", metrics_port=self.metrics_port,
                 metrics_host=metrics_host,
                 monitors=[m.name for m in self.engine.monitors], vocab_size=self.vocab.size,
                 tls="mutual" if s.tls_client_ca else "on" if s.tls_cert else "off",
                 monitor_processes=s.monitor_processes, audit_log=self.config.logging.audit_log or "off")
        return self.grpc_port

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def drain(self, grace: float, hurry: asyncio.Event | None = None) -> int:
        """Shutdown, first half: refuse new streams (UNAVAILABLE, health NOT_SERVING), give the open ones
        `grace` seconds (or until `hurry` is set) to finish, then cut the rest with UNAVAILABLE.
        Returns how many were cut."""
        slots = self.slots
        if slots is None:
            return 0
        slots.draining = True
        if self._health is not None:
            for name in ("", SERVICE_NAME):
                await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("draining", streams=slots.active, grace_s=grace)
        waits = [asyncio.ensure_future(slots.idle.wait())]
        if hurry is not None:
            waits.append(asyncio.ensure_future(hurry.wait()))
        await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
        cut = 0
        if slots.active:
            cut = slots.cut(f"server: shutting down; the stream was still open when server.drain_grace_s = {grace:g} s ran out")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(slots.idle.wait(), 5.0)  # the cut streams' handlers unwind
        log.info("drained", cut=cut)
        return cut

    async def reload(self, path: str | None, overrides: dict | None = None) -> bool:
        """SIGHUP: new streams get monitors (and [logging]) from `path`; open ones finish on the old engine.

        [server], [vocab] and [dense] need a restart (a port, a matrix); a change to them is logged and
        kept for the next start. With monitor worker processes nothing is reloaded (the workers build their
        engines when they start): the reload is logged as unsupported. A config that does not validate is
        refused with one line naming the key, and the running engine stays.
        """
        if self.workers is not None:
            log.warning("config_reload_unsupported", reason="server.monitor_processes > 0: worker processes build "
                        "their monitors at start; restart the sidecar to change them")
            return False
        loop = asyncio.get_running_loop()
        async with self._reloading:
            try:
                engine, restart = await loop.run_in_executor(self.executor, self._reloaded_engine, path, overrides or {})
            except Exception as err:  # ConfigError names the key; a monitor that fails to build says why
                log.error("config_reload_refused", error=str(err), kind=type(err).__name__)
                return False
            self.config, self.engine = engine.config, engine
            if self.servicer is not None:
                self.servicer.use(engine)
            log.info("config_reloaded", monitors=[m.name for m in engine.monitors], needs_restart=restart)
            return True

    def _reloaded_engine(self, path: str | None, overrides: dict) -> tuple[Engine, list[str]]:
        new = load_config(path)
        new = new.with_server(**overrides) if overrides else new
        restart = [name for name in ("server", "vocab", "dense") if getattr(new, name) != getattr(self.config, name)]
        config = dataclasses.replace(self.config, monitors=new.monitors, logging=new.logging)
        engine = Engine(config, self.vocab, metrics=self.engine.metrics, dense=self.engine.dense)
        try:
            engine.warm_up()
        except BaseException:
            engine.close()  # refused: its monitors and sinks (an audit file) are let go
            raise
        return engine, restart

    async def stop(self, grace: float = 2.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._metrics_http is not None:
            self._metrics_http[0].shutdown()
            self._metrics_http[0].server_close()
            self._metrics_http = None
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.threads is not None:
            self.threads.stop()
        if self.slots is not None:
            self.slots.close()
        self._stop_workers()
        if self.servicer is not None:
            self.servicer.close_retired()
        self.engine.close()
        log.info("sidecar_stopped")

    def _stop_workers(self) -> None:
        if self.workers is not None:
            self.workers.stop()


def server_options(s: ServerSection) -> list[tuple[str, int]]:
    """grpc.aio server options: message size, keepalive policy (docs/operations.md)."""
    return [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        # The server pings a connection quiet for keepalive_time_s and closes it when the ping goes
        # unanswered: a client that vanished without a FIN (a dead pod, a cut network) frees its streams.
        ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # A client may ping no more often than min_ping_interval_s; after two such pings (strikes) the
        # connection is closed with GOAWAY too_many_pings, so pings cannot be used to keep the loop busy.
        ("grpc.http2.min_ping_interval_without_data_ms", int(s.min_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
        # gRPC sets SO_REUSEPORT by default, so a second sidecar on a port in use would start and take half
        # the connections; without it the second bind fails and start-up names server.grpc_port.
        ("grpc.so_reuseport", 0),
    ]


def server_credentials(s: ServerSection) -> grpc.ServerCredentials | None:
    """TLS credentials from server.tls_cert / tls_key, requiring client certificates signed by tls_client_ca
    when it is set; None for a plaintext port. A file that is not PEM is an OSError naming its key."""
    if not s.tls_cert:
        return None
    pem = {}
    for key in ("tls_cert", "tls_key", "tls_client_ca"):
        if getattr(s, key):
            pem[key] = Path(getattr(s, key)).read_bytes()
            if b"-----BEGIN " not in pem[key]:  # gRPC would only say "Invalid cert chain file" on stderr
                raise OSError(f"server.{key}: {getattr(s, key)!r} is not a PEM file")
    chain = (pem["tls_key"], pem["tls_cert"])
    client_ca = pem.get("tls_client_ca")
    return grpc.ssl_server_credentials([chain], root_certificates=client_ca, require_client_auth=client_ca is not None)


class SidecarThread:
    """A sidecar on its own event loop in a background thread (tests, the demo)."""

    def __init__(self, config: Config, vocab: Vocabulary | None = None, dense: DenseDecoder | None = None) -> None:
        self.sidecar = Sidecar(config, vocab=vocab, dense=dense)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="canvaswatch-sidecar", daemon=True)

    def start(self) -> "SidecarThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.sidecar.start(), self._loop).result(timeout=300)  # worker processes start in seconds
        return self

    @property
    def target(self) -> str:
        return f"{self.sidecar.config.server.host}:{self.sidecar.grpc_port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sidecar.stop(0.5), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> "SidecarThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bind_problem(host: str, port: int) -> OSError | None:
    """Why host:port cannot be bound the way gRPC binds it (SO_REUSEADDR, so a port in TIME_WAIT is free):
    in use (EADDRINUSE), an address not of this machine (EADDRNOTAVAIL), ...; None where it can be, or where
    this cannot tell (a name that does not resolve: gRPC itself judges)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return None
    failures = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    return err
                failures.append(err)
    # gRPC binds every address the name gives: it fails only when none can be bound
    return failures[0] if failures and len(failures) == len(infos) else None
