"""Load test of the inference service: many concurrent clients, latency, errors, memory, attacks.

    python -m benchmarks.load --data data/raw                        # this checkout's service
    python -m benchmarks.load --data data/raw --baseline 226d2dd     # and another commit's, side by side
    python -m benchmarks.load --url http://127.0.0.1:8000 --clients 64   # a running server (JSON phase only)

Without --url it starts each service itself (python -m commands.serve, port 0; a --baseline
commit runs from a temporary git worktree with this Python), so it can also watch the
server's resident memory, and runs these phases, each on a fresh server:

1. json:      --clients clients, each sending single-digit v2 JSON requests back to back
              (real test digits, answers checked against the labels) for --seconds;
2. binary:    the same with 16 digits a request, in the binary tensor data extension;
3. slowloris: the JSON load while 100 attackers hold connections, each sending a byte a second
              (70 an infer request's body, 30 a header that never ends): valid requests
              should keep getting 200, and their p99 says what the attack costs;
4. memory:    64 clients upload a request of the server's largest body size (16 MiB of JSON
              numbers) at once, three times: the peak resident memory (the server's and its
              worker's) is the worst case; meanwhile one client sends single-digit requests,
              whose p99 is set beside the same client's on the quiet server just before;
5. pictures:  16 clients POST /digit a 4096 x 4096 PNG (tens of KB) at once, three times;
6. unbatched: the JSON load with --no-batching (--compare-unbatched);
7. overload:  the JSON load against a server allowing --overload-concurrency requests:
              the rest must get fast 503s, never time out.

The clients run on the same machine as the server and take CPU from it; numbers are for the
pair, on the CPU the table names. Compare only ratios measured in one run. Writes JSON (--out).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from harness.services import SpawnedServer
from pipeline import contract  # numpy only; never torch
from pipeline.machine import hardware

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def tree_rss(pid: int) -> float:
    """Resident memory of ``pid`` and its child processes (the service's parsing worker), MB."""
    return rss_mb(pid) + sum(rss_mb(c) for c in children(pid))


def infer_bodies(data_dir: Path | None, count: int, per_request: int = 1,
                 binary: bool = False) -> list[tuple[bytes, dict, list[int]]]:
    """(request body, headers, labels) for ``count`` real test digits, ``per_request`` to a
    request, in JSON or with the binary tensor extension; random pixels (labels -1) without data."""
    if data_dir is not None:
        from pipeline import data  # numpy only; never torch
        images, labels = data.load_split(data_dir, "test")
        images, labels = images[:count], labels[:count]
    else:
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), np.full(count, -1)
    out = []
    for start in range(0, count - per_request + 1, per_request):
        pixels = contract.to_input(images[start:start + per_request])
        tensor = {"name": contract.INPUT_NAME, "datatype": "FP32", "shape": list(pixels.shape)}
        truth = [int(v) for v in labels[start:start + per_request]]
        if binary:
            raw = pixels.astype("<f4").tobytes()
            header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
                                 "parameters": {"binary_data_output": True}}).encode()
            out.append((header + raw, {"Inference-Header-Content-Length": str(len(header)),
                                       "Content-Type": "application/octet-stream"}, truth))
        else:
            body = {"inputs": [{**tensor, "data": pixels.round(4).ravel().tolist()}]}
            out.append((json.dumps(body).encode(), {"Content-Type": "application/json"}, truth))
    return out


def read_logits(payload: bytes, header_length: str | None) -> np.ndarray:
    """Logits from a v2 response, JSON or binary."""
    if header_length is None:
        out = json.loads(payload)["outputs"][0]
        return np.reshape(out["data"], out["shape"])
    n = int(header_length)
    out = json.loads(payload[:n])["outputs"][0]
    return np.frombuffer(payload[n:], "<f4").reshape(out["shape"])


class Connection(http.client.HTTPConnection):
    """http.client with Nagle's algorithm off, as load tools (wrk, ab) have it: http.client sends
    a body over 2,920 bytes in a second write, which Nagle holds back until the server ACKs the
    headers, and Linux delays that ACK by up to 40 ms. Left on, it caps every server at about
    32 clients / 50 ms, whatever the server does (measured: 540 requests/s for two servers alike)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def run_clients(url: str, model_name: str, bodies: list[tuple[bytes, dict, list[int]]], clients: int, seconds: float,
                timeout_s: float = 10.0, on_tick=None, until: Callable[[], bool] = lambda: False) -> dict:
    """``clients`` threads with one keep-alive connection each, for ``seconds`` or until ``until()``."""
    target = urllib.parse.urlsplit(url)
    path = f"/v2/models/{model_name}/infer"
    lock = threading.Lock()
    ok_latency: list[float] = []
    rejected_latency: list[float] = []
    errors: dict[str, int] = {}
    wrong, images = [0], [0]
    stop_at = time.perf_counter() + seconds

    def client(k: int) -> None:
        conn = Connection(target.hostname or "127.0.0.1", target.port, timeout=timeout_s)
        i = k
        while time.perf_counter() < stop_at and not until():
            body, headers, labels = bodies[i % len(bodies)]
            i += clients
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                payload = response.read()
                dt = time.perf_counter() - t0
                if response.status == 200:
                    predicted = read_logits(payload, response.getheader("Inference-Header-Content-Length")).argmax(1)
                    with lock:
                        ok_latency.append(dt)
                        images[0] += len(labels)
                        wrong[0] += sum(t >= 0 and t != p for t, p in zip(labels, predicted))
                elif response.status == 503:
                    with lock:
                        rejected_latency.append(dt)
                    time.sleep(0.005)  # a real client backs off a little (the server says Retry-After)
                else:
                    with lock:
                        errors[f"HTTP {response.status}"] = errors.get(f"HTTP {response.status}", 0) + 1
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                conn.close()
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if on_tick:
            on_tick(time.perf_counter() - t_start)
        time.sleep(0.5)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    ms = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 2) if xs else None  # noqa: E731
    return {"clients": clients, "seconds": round(elapsed, 1), "ok": len(ok_latency),
            "rejected_503": len(rejected_latency), "errors": errors, "error_count": sum(errors.values()),
            "wrong_answers": int(wrong[0]), "throughput_rps": round(len(ok_latency) / elapsed, 1),
            "images_per_s": round(images[0] / elapsed, 1),
            "p50_ms": ms(ok_latency, 50), "p90_ms": ms(ok_latency, 90), "p99_ms": ms(ok_latency, 99),
            "rejected_p50_ms": ms(rejected_latency, 50), "rejected_p99_ms": ms(rejected_latency, 99)}


class Sampler:
    """The server's resident memory (with its child processes), sampled every 20 ms on a thread
    while the phase runs."""

    def __init__(self, pid: int):
        self.pid, self.samples = pid, [(0.0, tree_rss(pid))]
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.samples.append((time.perf_counter() - self._t0, tree_rss(self.pid)))
            except (OSError, RuntimeError):
                return  # the server has gone

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        seconds = self.samples[-1][0]
        window = min(10.0, seconds / 3)
        first = [m for t, m in self.samples if t <= window] or [self.samples[0][1]]
        last = [m for t, m in self.samples if t >= seconds - window] or [self.samples[-1][1]]
        return {"rss_start_mb": round(self.samples[0][1], 1), "rss_max_mb": round(max(m for _, m in self.samples), 1),
                "rss_growth": round(float(np.mean(last)) / float(np.mean(first)) - 1, 4)}


@contextmanager
def attackers(url: str, model_name: str, count: int = 100) -> Iterator[None]:
    """``count`` slow-loris connections, each sending one byte a second for as long as the block
    runs: 70% an infer request's body (Content-Length 1000), the rest a header that never ends."""
    target = urllib.parse.urlsplit(url)
    host, port = target.hostname or "127.0.0.1", target.port
    socks = [slow_client(host, port, f"/v2/models/{model_name}/infer", body=k % 10 < 7) for k in range(count)]
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1.0):
            for s in socks:
                try:
                    s.sendall(b"x")
                except OSError:
                    pass  # closed by the server: it is allowed to
    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for s in socks:
            s.close()


def slow_client(host: str, port: int | None, path: str, body: bool) -> socket.socket:
    """A connection that has sent an infer request up to its body (``body``) or into its headers."""
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode() if body
              else f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode())
    return s


def burst(url: str, path: str, body: bytes, content_type: str, clients: int, rounds: int,
          judge: Callable[[int, bytes], str] = lambda status, payload: f"HTTP {status}") -> dict:
    """``clients`` threads POST ``body`` to ``path`` at once, ``rounds`` times each; counts the
    outcomes (``judge`` names an answer; an error is named by its type)."""
    target = urllib.parse.urlsplit(url)
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def client() -> None:
        conn = Connection(target.hostname or "127.0.0.1", target.port, timeout=120)
        for _ in range(rounds):
            try:
                conn.request("POST", path, body, {"Content-Type": content_type})
                response = conn.getresponse()
                key = judge(response.status, response.read())
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException) as e:
                key = type(e).__name__
                conn.close()
            with lock:
                outcomes[key] = outcomes.get(key, 0) + 1
        conn.close()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": clients, "body_bytes": len(body), "rounds": rounds, "statuses": outcomes,
            "seconds": round(time.perf_counter() - t0, 1)}


def big_bodies(url: str, model_name: str, size: int, probe: list[tuple[bytes, dict, list[int]]],
               clients: int = 64, rounds: int = 3, quiet_s: float = 5.0) -> dict:
    """``clients`` uploads of a ``size``-byte JSON infer request at once, ``rounds`` times:
    the worst case for the server's memory (each parses into millions of numbers). One more
    client sends the ``probe`` requests back to back, for ``quiet_s`` before the burst and then
    until it ends: what the burst does to a valid request's latency."""
    values = (size - 200) // 4
    body = (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [256, 1, 28, 28], "data": ['
            + b"0.0," * (values - 1) + b"0.0]}]}")
    quiet = run_clients(url, model_name, probe, 1, quiet_s)
    result: dict = {}
    uploads = threading.Thread(target=lambda: result.update(
        burst(url, f"/v2/models/{model_name}/infer", body, "application/json", clients, rounds)))
    uploads.start()
    during = run_clients(url, model_name, probe, 1, 3600, until=lambda: not uploads.is_alive())
    uploads.join()
    keys = ("ok", "rejected_503", "error_count", "p50_ms", "p99_ms")
    result.update(probe_quiet={k: quiet[k] for k in keys}, probe_burst={k: during[k] for k in keys})
    if quiet["p99_ms"] and during["p99_ms"]:
        result["probe_p99_ratio"] = round(during["p99_ms"] / quiet["p99_ms"], 1)
    return result


def big_pictures(url: str, data_dir: Path | None, clients: int = 16, rounds: int = 3, side: int = 4096) -> dict:
    """``clients`` POST /digit of a ``side`` x ``side`` PNG at once, ``rounds`` times: a small
    file (tens of KB) whose pixels are the cost. Every answer should be the digit drawn."""
    import io

    from PIL import Image
    if data_dir is not None:
        from pipeline import data
        images, labels = data.load_split(data_dir, "test")
        digit, label = images[0], int(labels[0])
    else:
        digit, label = np.zeros((28, 28), np.uint8), -1
        digit[4:24, 12:16] = 255  # a "1"
    canvas = Image.new("L", (side, side), 255)
    canvas.paste(Image.fromarray(255 - digit).resize((side // 2, side // 2), Image.Resampling.NEAREST),
                 (side // 4, side // 4))
    buf = io.BytesIO()
    canvas.save(buf, "PNG", optimize=True)

    def judge(status: int, payload: bytes) -> str:
        wrong = status == 200 and label >= 0 and json.loads(payload)["digit"] != label
        return f"HTTP {status}" + (", wrong digit" if wrong else "")
    return burst(url, "/digit", buf.getvalue(), "image/png", clients, rounds, judge)


@contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """Commit ``ref`` of this repository in a temporary git worktree (removed afterwards)."""
    folder = Path(tempfile.mkdtemp(prefix="load-baseline-"))
    added = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(folder), ref],
                           capture_output=True, text=True)
    if added.returncode != 0:
        folder.rmdir()
        sys.exit(f"load: cannot check out --baseline {ref!r} ({added.stderr.strip()}); "
                 "give a commit, tag or branch of this repository")
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], capture_output=True)


def phase(label: str, model: Path, name: str, flags: list[str], run, cwd: Path = REPO,
          seconds: float | None = None) -> dict:
    """Start a server (from ``cwd``), ``run(url)`` against it while sampling its memory, stop it."""
    # No tracking store for either server: the registry lookup at start-up is not what is measured.
    no_store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tempfile.gettempdir()}/no-tracking-store-{os.getpid()}.db"}
    with SpawnedServer(model.resolve(), *flags, cwd=cwd, env=no_store) as server:
        sampler = Sampler(server.proc.pid)
        with tqdm(total=round(seconds) if seconds else None, desc=label, unit="s",
                  bar_format="{desc}: {bar} {n:.0f}/{total} s" if seconds else "{desc}: {elapsed}") as bar:
            result = run(server.url, lambda t: bar.update(min(t, seconds or t) - bar.n))
        result.update(sampler.stop())
        result.update(server_exit_code=server.stop(), server_flags=flags,
                      server_summary=next((line.strip() for line in reversed(server.log) if "stopped" in line), ""))
    return result


def table(results: dict) -> str:
    cols = ["clients", "ok", "rejected_503", "error_count", "wrong_answers", "throughput_rps", "images_per_s",
            "p50_ms", "p99_ms", "rejected_p99_ms", "rss_max_mb", "rss_growth"]
    lines = ["| phase | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


SCENARIOS = ("json", "binary", "slowloris", "memory", "pictures")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / contract.DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, help="folder of the IDX files: send real digits and check answers")
    parser.add_argument("--url", help="load a running server instead of starting one (JSON only, no memory readings)")
    parser.add_argument("--name", default=contract.RegistryConfig.model_name, help="model name in the v2 API")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each timed phase")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"which of {', '.join(SCENARIOS)}")
    parser.add_argument("--baseline", help="also measure the service of this git commit, side by side")
    parser.add_argument("--compare-unbatched", action="store_true", help="also run with --no-batching")
    parser.add_argument("--overload-concurrency", type=int, default=0,
                        help="also run against a server allowing this many requests in flight (0 = skip)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    if unknown := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")

    json_bodies = infer_bodies(args.data, 2000)
    binary_bodies = infer_bodies(args.data, 2000, 16, binary=True)
    results: dict[str, dict] = {}
    if args.url:
        results["json"] = run_clients(args.url, args.name, json_bodies, args.clients, args.seconds)
    else:
        def load(bodies):
            return lambda url, tick: run_clients(url, args.name, bodies, args.clients, args.seconds, on_tick=tick)

        def under_attack(url, tick):
            with attackers(url, args.name):
                return run_clients(url, args.name, json_bodies, args.clients, args.seconds, on_tick=tick)
        plan: dict[str, tuple[list[str], Callable, float | None]] = {
                "json": ([], load(json_bodies), args.seconds),
                "binary": ([], load(binary_bodies), args.seconds),
                "slowloris": ([], under_attack, args.seconds),
                "memory": ([], lambda url, tick: big_bodies(url, args.name, 16 * 2**20, json_bodies,
                                                            quiet_s=min(args.seconds, 10.0)), None),
                "pictures": ([], lambda url, tick: big_pictures(url, args.data), None)}
        runs = {k: v for k, v in plan.items() if k in scenarios}
        if args.compare_unbatched:
            runs["unbatched"] = (["--no-batching"], load(json_bodies), args.seconds)
        if args.overload_concurrency:
            runs["overload"] = (["--max-concurrency", str(args.overload_concurrency)], load(json_bodies),
                                min(args.seconds, 10.0))
        with ExitStack() as stack:
            servers = {"now": REPO}
            if args.baseline:
                servers[args.baseline] = stack.enter_context(checkout(args.baseline))
            for label, (flags, run, seconds) in runs.items():
                for who, cwd in servers.items():  # side by side: each phase on both before the next
                    key = label if len(servers) == 1 else f"{label} ({who})"
                    results[key] = phase(key, args.model, args.name, flags, run, cwd, seconds)
    results["machine"] = hardware(with_gpu=False)
    print(table({k: v for k, v in results.items() if k != "machine"}))
    for k, r in results.items():
        if "statuses" in r:
            print(f"{k}: {r['clients']} clients x {r['rounds']} bodies of {r['body_bytes']:,} bytes: {r['statuses']}, "
                  f"peak RSS {r['rss_max_mb']} MB")
        if "probe_burst" in r:
            quiet, during = r["probe_quiet"], r["probe_burst"]
            print(f"{k}: a single-digit request meanwhile: p99 {during['p99_ms']} ms ({during['ok']} answered, "
                  f"{during['rejected_503']} x 503, {during['error_count']} errors), against {quiet['p99_ms']} ms "
                  f"on the quiet server just before: {r.get('probe_p99_ratio', '?')}x")
    if args.baseline and not args.url:
        now, then = "({})".format("now"), f"({args.baseline})"
        for label, field in (("json", "throughput_rps"), ("binary", "images_per_s"), ("slowloris", "ok")):
            a, b = results.get(f"{label} {now}"), results.get(f"{label} {then}")
            if a and b:
                ratio = f"{a[field] / b[field]:.2f}x" if b[field] else "inf (baseline 0)"
                print(f"{label}: {field} {a[field]} vs {b[field]} = {ratio}; p99 {a['p99_ms']} vs {b['p99_ms']} ms")
    if "unbatched" in results and "json" in results:
        print(f"batching: {results['json']['images_per_s'] / results['unbatched']['images_per_s']:.2f}x "
              "the throughput of one onnxruntime run per request")
    print(f"machine: {results['machine']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
