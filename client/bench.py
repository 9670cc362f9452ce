"""Load generator: drive Recommend with realistic traffic and print throughput and latency.

It uses grpc.aio (one event loop per process, `--processes` of them) so the generator is
not the bottleneck, and reports its own CPU use to prove it. The summary and its format are
shared with `python -m recsys.server.bench`, which runs the same request mix without gRPC.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import resource
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ML100K_USER_COUNT = 943
ML100K_ITEM_COUNT = 1682
UNKNOWN_USER_SHARE = 0.03


def user_mix(users: str, known_user_ids: list[str] | None, seed: int = 0, size: int = 10_000) -> list[str]:
    """User ids to request, in order: drawn from the data set, ~3% ids no model knows (cold start)."""
    pool = known_user_ids or [str(n) for n in range(1, ML100K_USER_COUNT + 1)]
    if users != "all":
        pool = pool[:int(users)]
    rng = random.Random(seed)
    return [f"unknown-{rng.randrange(10**9)}" if rng.random() < UNKNOWN_USER_SHARE else rng.choice(pool)
            for _ in range(size)]


def interaction_mix(count: int, item_ids: list[str] | None, seed: int = 0,
                    size: int = 1_000) -> list[list[tuple[str, float]]]:
    """`size` lists of `count` recent interactions (distinct movies of the data set, 1 to 5 stars),
    sent in turn with the requests; one empty list when `count` is 0."""
    if not count:
        return [[]]
    pool = item_ids or [str(n) for n in range(1, ML100K_ITEM_COUNT + 1)]
    rng = random.Random(seed)
    return [[(item_id, float(rng.randint(1, 5))) for item_id in rng.sample(pool, count)] for _ in range(size)]


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    cpu_seconds: float = 0.0

    def merge(self, other: "Tally") -> None:
        self.latencies_ms += other.latencies_ms
        self.errors.update(other.errors)
        self.cpu_seconds += other.cpu_seconds


class ServerSampler:
    """Samples another process's resident memory and CPU time (Linux /proc) while the load runs:
    growth over a long run is how a leak shows, and CPU per request says what a machine of
    this size can serve at most, whatever the latency."""

    def __init__(self, pid: int, every_seconds: float = 10.0):
        self.status_path, self.stat_path = Path(f"/proc/{pid}/status"), Path(f"/proc/{pid}/stat")
        if not self.status_path.is_file():
            raise ValueError(f"no process {pid} to sample (needs Linux /proc)")
        self.every_seconds = every_seconds
        self.samples_mb: list[float] = []
        self.cpu_seconds = 0.0  # over the run, once it has ended
        self._cpu_before = 0.0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-sampler", daemon=True)

    def _sample(self) -> None:
        for line in self.status_path.read_text().splitlines():
            if line.startswith("VmRSS:"):
                self.samples_mb.append(round(int(line.split()[1]) / 1024, 1))

    def _process_cpu_seconds(self) -> float:
        # Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
        fields = self.stat_path.read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._stopped.wait(self.every_seconds):
            self._sample()

    def __enter__(self) -> "ServerSampler":
        self._sample()
        self._cpu_before = self._process_cpu_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu_seconds = self._process_cpu_seconds() - self._cpu_before
        self._stopped.set()
        self._thread.join()
        self._sample()

    def rss_summary(self) -> dict:
        return {"start": self.samples_mb[0], "end": self.samples_mb[-1], "max": max(self.samples_mb),
                "samples": self.samples_mb}


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(target: str, concurrency: int, duration: float, k: int, user_ids: list[str],
                 timeout: float, interactions: list[list[tuple[str, float]]], record: bool) -> Tally:
    import grpc

    from recsys.v1 import recommender_pb2, recommender_pb2_grpc

    recent = [[recommender_pb2.Interaction(item_id=item_id, rating=stars) for item_id, stars in entries]
              for entries in interactions]
    tally = Tally()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        stop_at = time.perf_counter() + duration

        async def worker(offset: int) -> None:
            n = offset
            while time.perf_counter() < stop_at:
                user_id, entries = user_ids[n % len(user_ids)], recent[n % len(recent)]
                n += concurrency
                started = time.perf_counter()
                try:
                    if record:
                        await stub.RecordInteractions(recommender_pb2.RecordInteractionsRequest(
                            user_id=user_id, interactions=entries), timeout=timeout)
                    else:
                        request = recommender_pb2.RecommendRequest(user_id=user_id, k=k, recent_interactions=entries)
                        async for _ in stub.Recommend(request, timeout=timeout):
                            pass
                    tally.latencies_ms.append((time.perf_counter() - started) * 1000)
                except grpc.aio.AioRpcError as error:
                    tally.errors[error.code().name] += 1

        await asyncio.gather(*(worker(offset) for offset in range(concurrency)))
    return tally


def _process_main(args: tuple) -> Tally:
    cpu_before = process_cpu_seconds()
    tally = asyncio.run(_drive(*args))
    tally.cpu_seconds = process_cpu_seconds() - cpu_before
    return tally


def run_against_server(target: str, concurrency: int, duration: float, k: int, user_ids: list[str],
                       processes: int = 1, timeout: float = 5.0,
                       interactions: list[list[tuple[str, float]]] | None = None,
                       record: bool = False) -> tuple[Tally, float]:
    """Returns the merged tally and the wall time it covered. `interactions` (`interaction_mix`) go
    with the requests in turn; with `record`, the calls are RecordInteractions of them instead."""
    shares = [concurrency // processes + (1 if n < concurrency % processes else 0) for n in range(processes)]
    jobs = [(target, share, duration, k, user_ids[n::processes] or user_ids, timeout, interactions or [[]], record)
            for n, share in enumerate(shares) if share]
    started = time.perf_counter()
    if len(jobs) == 1:
        results = [_process_main(jobs[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            results = pool.map(_process_main, jobs)
    wall = time.perf_counter() - started
    total = Tally()
    for result in results:
        total.merge(result)
    return total, wall


def percentile(ordered: list[float], q: float) -> float:
    """The q-th percentile of sorted values, interpolated linearly between neighbours (numpy's default)."""
    if not ordered:
        return 0.0
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(tally: Tally, wall: float, target: str, concurrency: int, k: int) -> dict:
    latencies = sorted(tally.latencies_ms)
    requests = len(tally.latencies_ms) + sum(tally.errors.values())
    return {
        "target": target, "concurrency": concurrency, "k": k, "duration_s": round(wall, 2),
        "requests": requests, "ok": len(tally.latencies_ms), "errors": dict(tally.errors),
        "throughput_rps": round(len(tally.latencies_ms) / wall, 1),
        "latency_ms": {name: round(percentile(latencies, q), 3) for name, q in (("p50", 50), ("p90", 90), ("p99", 99))}
                      | {"max": round(latencies[-1] if latencies else 0.0, 3)},
        "client_cpu_percent_of_one_core": round(100 * tally.cpu_seconds / wall, 1),
        "client_cpu_ms_per_request": _per_request_ms(tally.cpu_seconds, requests),
        "cores": os.cpu_count(),
    }


def add_server_figures(summary: dict, sampler: ServerSampler) -> None:
    """The server's memory and CPU over the run (`--server-pid`)."""
    summary["server_rss_mb"] = sampler.rss_summary()
    summary["server_cpu_percent_of_one_core"] = round(100 * sampler.cpu_seconds / summary["duration_s"], 1)
    summary["server_cpu_ms_per_request"] = _per_request_ms(sampler.cpu_seconds, summary["requests"])


def _per_request_ms(cpu_seconds: float, requests: int) -> float:
    return round(1000 * cpu_seconds / requests, 3) if requests else 0.0


def format_summary(summary: dict) -> str:
    latency = summary["latency_ms"]
    errors = ", ".join(f"{code} {count}" for code, count in summary["errors"].items()) or "none"
    return "\n".join([
        f"target {summary['target']}  concurrency {summary['concurrency']}  k {summary['k']}  "
        f"duration {summary['duration_s']}s  cores {summary['cores']}",
        f"requests {summary['requests']}  ok {summary['ok']}  errors {errors}",
        f"throughput {summary['throughput_rps']} req/s",
        f"latency ms  p50 {latency['p50']}  p90 {latency['p90']}  p99 {latency['p99']}  max {latency['max']}",
        f"load generator cpu {summary['client_cpu_percent_of_one_core']}% of one core  "
        f"({summary['client_cpu_ms_per_request']} ms per request)",
    ] + ([f"server cpu {summary['server_cpu_percent_of_one_core']}% of one core  "
          f"({summary['server_cpu_ms_per_request']} ms per request)",
          f"server rss MB  start {rss['start']}  end {rss['end']}  max {rss['max']}  "
          f"({len(rss['samples'])} samples)"] if (rss := summary.get("server_rss_mb")) else []))


def write_json(summary: dict | list[dict], path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")
