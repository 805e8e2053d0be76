"""What gRPC itself costs a Python server per message received: the floor under every sidecar step.

    python bench/grpc_read_floor.py [--sizes 1000,8000,65000,260000] [--messages 4000] [--repeats 3]

A grpc.aio server (the sidecar's transport) and a thread-pool server whose Watch handler only
counts the raw bytes of each message (no parsing, no reply until the end), driven by a sync client
streaming one message repeatedly; prints the server process's CPU per message (user + system,
all its threads) and the message rate. 65 KB is a top-k step at L = 1,024, k = 8. On the 2-core
dev box this is the part of each step the sidecar cannot cut (BENCHMARKS.md, issue 12); the echo
the throughput benchmark compares with pays it too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

METHOD = "/bench.Floor/Watch"
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def _count(messages) -> bytes:
    return str(sum(1 for _ in messages)).encode()


def _serve_sync(port: int) -> None:
    def watch(request_iterator, context):
        yield _count(request_iterator)

    server = grpc.server(ThreadPoolExecutor(4), options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Floor", {"Watch": grpc.stream_stream_rpc_method_handler(watch)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


async def _serve_aio(port: int) -> None:
    async def watch(request_iterator, context):
        count = 0
        async for _ in request_iterator:
            count += 1
        yield str(count).encode()

    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Floor", {"Watch": grpc.stream_stream_rpc_method_handler(watch)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,8000,65000,260000", help="message sizes in bytes")
    parser.add_argument("--messages", type=int, default=4000, help="messages per stream")
    parser.add_argument("--repeats", type=int, default=3, help="streams per size and server, alternating servers")
    parser.add_argument("--serve", choices=("aio", "sync"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "aio":
        asyncio.run(_serve_aio(args.port))
        return 0
    if args.serve == "sync":
        _serve_sync(args.port)
        return 0
    servers = {}
    for kind in ("aio", "sync"):
        port = _free_port()
        servers[kind] = (port, subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)]))
    try:
        channels = {kind: grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) for kind, (port, _) in servers.items()}
        for channel in channels.values():
            grpc.channel_ready_future(channel).result(timeout=30)
        print(f"# server CPU per message received, {args.messages} messages a stream, {os.cpu_count()} cores, "
              "client and servers on this machine")
        print("| size (bytes) | server | CPU us/message (each stream) | messages/s (each stream) |")
        print("|---|---|---|---|")
        for size in (int(s) for s in args.sizes.split(",")):
            message = os.urandom(size)
            rows = {kind: ([], []) for kind in servers}
            for _ in range(args.repeats):
                for kind, (_, process) in servers.items():  # alternate: the machine's drift hits both alike
                    watch = channels[kind].stream_stream(METHOD)
                    list(watch(iter([message] * 50)))  # warm
                    before, started = _cpu_seconds(process.pid), time.perf_counter()
                    list(watch(iter([message] * args.messages)))
                    elapsed = time.perf_counter() - started
                    rows[kind][0].append((_cpu_seconds(process.pid) - before) / args.messages * 1e6)
                    rows[kind][1].append(args.messages / elapsed)
            for kind, (cpu, rate) in rows.items():
                print(f"| {size} | {kind} | {' / '.join(f'{c:.0f}' for c in cpu)} | {' / '.join(f'{r:.0f}' for r in rate)} |",
                      flush=True)
    finally:
        for _, process in servers.values():
            process.terminate()
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
