"""A closed-loop gRPC load generator for ``grpc_bench.py``: what wrk is to the HTTP benchmark.

    python grpc_load.py --target 127.0.0.1:8081 --bodies bodies.bin --concurrency 16 --duration 10

``bodies.bin`` holds serialized ``ModelInferRequest`` messages, each preceded by its length (4 bytes,
little-endian); every call picks one at random (a random model and probe row, as ``wrk_v2.lua`` does). The
messages are sent as bytes and the answers are not decoded, so the client spends as little CPU per call as
grpcio allows: ``concurrency`` workers, each on a channel (an HTTP/2 connection) of its own, as wrk keeps one
connection per concurrent request (``--channels`` shares fewer). Prints one line, ``GRPC_LOAD_JSON {...}``: calls answered OK, failures by
status code, latency percentiles in microseconds, and the client's own CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import struct
import time
from collections import Counter
from pathlib import Path

import grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def read_bodies(path: Path) -> list[bytes]:
    data, bodies, position = path.read_bytes(), [], 0
    while position < len(data):
        (length,) = struct.unpack_from("<I", data, position)
        bodies.append(data[position + 4:position + 4 + length])
        position += 4 + length
    return bodies


def write_bodies(path: Path, bodies: list[bytes]) -> None:
    path.write_bytes(b"".join(struct.pack("<I", len(body)) + body for body in bodies))


async def run(target: str, bodies: list[bytes], *, concurrency: int, duration_s: float, timeout_s: float,
              channels: int | None = None) -> dict:
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    opened = [grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)])
              for _ in range(channels or concurrency)]
    for channel in opened:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
    calls = [opened[n % len(opened)].unary_unary(METHOD) for n in range(concurrency)]  # bytes in, bytes out
    rng = random.Random(1)
    end = time.perf_counter() + duration_s

    async def worker(call) -> None:
        while (started := time.perf_counter()) < end:
            try:
                await call(rng.choice(bodies), timeout=timeout_s)
                latencies.append(time.perf_counter() - started)
            except grpc.aio.AioRpcError as exc:
                failures[exc.code().name] += 1

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await asyncio.gather(*(worker(call) for call in calls))
    elapsed = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    for channel in opened:
        await channel.close()
    latencies.sort()

    def percentile(p: float) -> float:
        return round(1e6 * latencies[min(int(len(latencies) * p), len(latencies) - 1)], 1) if latencies else 0.0

    return {"requests": len(latencies), "failures": dict(failures), "duration_us": round(1e6 * elapsed),
            "p50_us": percentile(0.5), "p90_us": percentile(0.9), "p99_us": percentile(0.99),
            "max_us": round(1e6 * latencies[-1], 1) if latencies else 0.0,
            "client_cpu_s": round(cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime,
                                  3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--bodies", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    parser.add_argument("--channels", type=int, default=None,
                        help="connections the workers share (default: one per worker)")
    args = parser.parse_args()
    summary = asyncio.run(run(args.target, read_bodies(args.bodies), concurrency=args.concurrency,
                              duration_s=args.duration, timeout_s=args.timeout, channels=args.channels))
    print("GRPC_LOAD_JSON " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
