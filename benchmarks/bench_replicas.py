"""Throughput of one and of two ``mien serve`` replicas behind the same HAProxy, measured in one run.

    nice -n 0 .venv/bin/python benchmarks/bench_replicas.py [--requests 300] [--concurrency 8] [--rounds 3]
        [--threads 1] [--json docs/figures/bench_replicas.json] [--note "..."]

Two replicas (``mien serve``, ``--threads`` onnxruntime threads per model, the bundled default model
mini_xception and the bundled YuNet detector) and Debian's HAProxy with ``deploy/haproxy/haproxy.cfg`` in front
of them, all on loopback. Every round sends the same ``--requests`` POST /predict (scikit-image's astronaut,
512×512 JPEG, one face) at the same ``--concurrency`` through the proxy twice: once with replica2 put in
maintenance over HAProxy's admin socket (one replica serves, the other idles) and once with both in the rotation.
The order alternates between rounds, so a change in the machine's background load falls on both alike; the
table gives the median over rounds and the ratio of two to one. HAProxy's per-replica answer counts show which
replica served each run, and the CPU time of each process (/proc/<pid>/stat) and of the whole machine
(/proc/stat) over each run, as busy cores, shows where the cores went: to the replicas, HAProxy, this client,
or other processes. Prints a Markdown table; writes ``--json``.

A benchmark, not a test: it exits non-zero only when a replica or HAProxy does not start. Never downloads.
The start-up helpers (:class:`Replica`, :func:`haproxy`, :class:`Proxy`) are also what tests/test_failover.py
runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.detect_photos import real_photo  # noqa: E402
from benchmarks.server_load import free_port, jpeg, load, percentile, terminate, wait_ready  # noqa: E402
from mien.machine import describe_cpu  # noqa: E402

HAPROXY_CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
BACKEND = "mien"  # the backend's name in HAPROXY_CONFIG
SERVERS = ("replica1", "replica2")  # its servers, in the order of MIEN_LB_REPLICA1 and MIEN_LB_REPLICA2
DEFAULT_MODEL = "mini_xception"
START_TIMEOUT = 300.0  # seconds a replica may take to answer /ready (a loaded machine loads models slowly)


def model_folder(folder: Path) -> Path:
    """A model folder with only the bundled default model (linked, not copied): every replica starts in seconds
    whatever else models/ holds. The detector is the bundled one (models/detector), found by the service."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (f"{DEFAULT_MODEL}.onnx", f"{DEFAULT_MODEL}.card.json"):
        if not (folder / name).exists():
            (folder / name).symlink_to(ROOT / "models" / name)
    return folder


class Replica:
    """``mien serve`` in a subprocess on a free loopback port, its output in ``log``; a context manager that
    returns once /ready answers 200 and stops the process (if still running) on exit."""

    def __init__(self, model_dir: Path, log: Path, threads: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        self.log = log
        self._command = [sys.executable, "-m", "mien.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                         "--model-dir", str(model_dir)]  # fmt: skip
        self._env = os.environ | {"MIEN_THREADS": str(threads), "MIEN_PROVIDERS": "CPUExecutionProvider"}
        self.process: subprocess.Popen | None = None

    def start(self) -> Replica:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self._command, cwd=ROOT, env=self._env, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        wait_ready(self.process, self.url, self.log, timeout)

    def predictions(self) -> int:
        """POST /predict requests this replica answered 200, from its own /metrics (mien_predict_requests)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        pattern = r'^mien_predict_requests_total\{[^}]*status="200"[^}]*\} ([0-9.e+]+)$'
        return int(sum(float(value) for value in re.findall(pattern, text, flags=re.MULTILINE)))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the process to end (SIGKILL after ``timeout``); its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode

    def __enter__(self) -> Replica:
        if self.process is None:
            self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Proxy:
    """A running HAProxy: the URL clients use and its admin socket."""

    url: str
    socket_path: Path
    process: subprocess.Popen
    log: Path

    def command(self, line: str, timeout: float = 10.0) -> str:
        """One command on the admin socket (``show stat``, ``set server mien/replica2 state maint``); its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend: a row per server name, plus the row ``BACKEND``; HAProxy's CSV columns
        (status, stot, hrsp_2xx, hrsp_5xx, wretr (retries), wredis (redispatches), ...)."""
        text = self.command("show stat").lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(text.splitlines()) if row["pxname"] == BACKEND}

    def set_state(self, server: str, state: str) -> None:
        """``ready``, ``drain`` or ``maint`` for one server of the backend."""
        answer = self.command(f"set server {BACKEND}/{server} state {state}").strip()
        if answer:
            raise RuntimeError(f"HAProxy refused 'set server {server} state {state}': {answer}")

    def wait_status(self, wanted: dict[str, str], timeout: float = 60.0) -> dict[str, dict[str, str]]:
        """Poll ``show stat`` until each named server's status starts with its wanted one (UP, DOWN, MAINT)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.process.returncode}; see {self.log}")
            stats = self.stats()
            if all(stats[name]["status"].startswith(status) for name, status in wanted.items()):
                return stats
            if time.monotonic() > deadline:
                seen = {name: stats[name]["status"] for name in wanted}
                raise RuntimeError(f"HAProxy did not report {wanted} within {timeout:.0f} s (it says {seen})")
            time.sleep(0.05)


def find_haproxy() -> str | None:
    """The haproxy executable: on PATH, or Debian's /usr/sbin/haproxy (not on a non-root user's PATH)."""
    found = shutil.which("haproxy")
    if found is None and os.access("/usr/sbin/haproxy", os.X_OK):
        found = "/usr/sbin/haproxy"
    return found


@contextlib.contextmanager
def haproxy(replicas: list[str], workdir: Path, config: Path = HAPROXY_CONFIG) -> Iterator[Proxy]:
    """HAProxy with ``config`` on a free loopback port in front of ``replicas`` (host:port each, two at most; the
    first repeated when only one), pidfile, admin socket and log in ``workdir``; stopped on exit."""
    executable = find_haproxy()
    if executable is None:
        raise RuntimeError("no haproxy on PATH: `apt-get install haproxy` (scripts/test.sh does it as root)")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    socket_path, log = workdir / "haproxy.sock", workdir / "haproxy.log"
    env = os.environ | {
        "MIEN_LB_BIND": f"127.0.0.1:{port}",
        "MIEN_LB_SOCKET": str(socket_path),
        **{f"MIEN_LB_REPLICA{i + 1}": replicas[min(i, len(replicas) - 1)] for i in range(len(SERVERS))},
    }
    command = [executable, "-f", str(config), "-db", "-p", str(workdir / "haproxy.pid")]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    proxy = Proxy(f"http://127.0.0.1:{port}", socket_path, process, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {process.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                proxy.stats()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy's admin socket did not answer within 30 s; see {log}")
            time.sleep(0.05)
        yield proxy
    finally:
        terminate(process, 10.0)


# --- the benchmark ---------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time every core of the machine spent not idle so far (/proc/stat), for every process."""
    ticks = [int(n) for n in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()} | {"machine": machine_busy_seconds()}


def busy_cores(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Cores kept busy during a run: by each of our processes, and by the whole machine (the rest is others')."""
    cores = {name: round((after[name] - before[name]) / wall, 2) for name in before}
    cores["others"] = round(max(0.0, cores["machine"] - sum(v for k, v in cores.items() if k != "machine")), 2)
    return cores


def summary(result: dict, served: dict[str, int], cores: dict[str, float]) -> dict:
    ms = result["latencies"]
    errors = sum(n for status, n in result["statuses"].items() if status != 200)
    return {
        "requests": len(ms),
        "seconds": round(result["wall"], 3),
        "requests_per_s": round(len(ms) / result["wall"], 2),
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "errors": errors,
        "statuses": {str(k): v for k, v in result["statuses"].items()},
        "answered_by": served,
        "busy_cores": cores,
    }


def answered(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> dict[str, int]:
    """2xx answers per replica between two ``show stat``."""
    return {name: int(after[name]["hrsp_2xx"] or 0) - int(before[name]["hrsp_2xx"] or 0) for name in SERVERS}


def run(args: argparse.Namespace, workdir: Path) -> dict:
    body = jpeg(real_photo("astronaut"))
    photos = [("astronaut", body)]
    models = model_folder(workdir / "models")
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with contextlib.ExitStack() as stack:
        replicas = [Replica(models, workdir / f"replica{i + 1}.log", args.threads).start() for i in range(2)]
        for replica in replicas:
            stack.enter_context(replica)
        proxy = stack.enter_context(haproxy([r.address for r in replicas], workdir / "haproxy"))
        proxy.wait_status(dict.fromkeys(SERVERS, "UP"))
        pids = {name: r.process.pid for name, r in zip(SERVERS, replicas, strict=True)}
        pids |= {"haproxy": proxy.process.pid, "client": os.getpid()}
        # Warm both replicas (first requests pay for onnxruntime's first runs and allocations).
        asyncio.run(load(proxy.url, photos, args.concurrency, 4 * args.concurrency, desc="warm-up"))
        for round_ in range(args.rounds):
            for count in (1, 2) if round_ % 2 == 0 else (2, 1):
                proxy.set_state("replica2", "maint" if count == 1 else "ready")
                proxy.wait_status({"replica1": "UP", "replica2": "MAINT" if count == 1 else "UP"})
                before, cpu = proxy.stats(), cpu_snapshot(pids)
                result = asyncio.run(load(proxy.url, photos, args.concurrency, args.requests,
                                          desc=f"round {round_ + 1}, {count} replica(s)"))  # fmt: skip
                cores = busy_cores(cpu, cpu_snapshot(pids), result["wall"])
                runs[count].append(summary(result, answered(before, proxy.stats()), cores))
                print(f"round {round_ + 1}, {count} replica(s): {runs[count][-1]['requests_per_s']} requests/s",
                      flush=True)  # fmt: skip
    return runs


def table(runs: dict[int, list[dict]], rounds: int, requests: int) -> tuple[list[str], dict[int, dict], float]:
    lines = [
        "| replicas | rounds × requests | median requests/s | median p50 ms | median p95 ms | errors "
        "| answered by replica1 / replica2 | median busy cores: replica1 / replica2 / haproxy / client / others |",
        "|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    medians = {}
    for count, results in runs.items():
        medians[count] = {key: statistics.median(r[key] for r in results)
                          for key in ("requests_per_s", "p50_ms", "p95_ms")}  # fmt: skip
        errors = sum(r["errors"] for r in results)
        served = " / ".join(str(sum(r["answered_by"][name] for r in results)) for name in SERVERS)
        cores = " / ".join(f"{statistics.median(r['busy_cores'][name] for r in results):.2f}"
                           for name in (*SERVERS, "haproxy", "client", "others"))  # fmt: skip
        m = medians[count]
        lines.append(f"| {count} | {rounds} × {requests} | {m['requests_per_s']:.1f} | {m['p50_ms']:.1f} "
                     f"| {m['p95_ms']:.1f} | {errors} | {served} | {cores} |")  # fmt: skip
    ratio = medians[2]["requests_per_s"] / medians[1]["requests_per_s"]
    return lines, medians, ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="POST /predict requests per run")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (httpx client)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one run with 1 and one with 2 replicas")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per model (MIEN_THREADS)")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "figures" / "bench_replicas.json")
    parser.add_argument("--note", default="", help="the machine's state, recorded in the JSON")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mien-bench-replicas-") as tmp:
        runs = run(args, Path(tmp))
    load_after = os.getloadavg()[0]
    lines, medians, ratio = table(runs, args.rounds, args.requests)
    version = subprocess.run([find_haproxy(), "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    machine = f"{describe_cpu()}; Python {platform.python_version()}; {version}"
    print(f"\nMachine: {machine}; load average (1 min) {load_before:.2f} before, {load_after:.2f} after."
          + (f" {args.note}" if args.note else ""))  # fmt: skip
    print("\n".join(lines))
    print(f"\nTwo replicas ÷ one: {ratio:.2f}× requests/s (medians over {args.rounds} rounds).")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "command": shlex.join(["python", *sys.argv]),
            "machine": machine,
            "cores": os.cpu_count(),
            "load_average_1min_before_after": [round(load_before, 2), round(load_after, 2)],
            "note": args.note,
            "photo": "scikit-image astronaut, 512×512 JPEG quality 90, one face",
            "requests_per_run": args.requests,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "onnxruntime_threads_per_replica": args.threads,
            "model": DEFAULT_MODEL,
            "haproxy_config": str(HAPROXY_CONFIG.relative_to(ROOT)),
            "median": {str(count): m for count, m in medians.items()},
            "two_over_one": round(ratio, 2),
            "runs": {str(count): results for count, results in runs.items()},
        }
        args.json.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
