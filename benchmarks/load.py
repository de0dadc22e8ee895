"""Load test of the inference service: many concurrent clients, latency, errors, memory.

    python -m benchmarks.load --model models/model.onnx --data data/raw           # 32 clients, 30 s
    python -m benchmarks.load --url http://127.0.0.1:8000 --clients 64 --seconds 60  # a running server

Without --url it starts the service itself (python -m stages.serve, port 0) so it can also
watch the server's resident memory, and runs up to three phases, each on a fresh server:

1. load:      --clients clients, each sending single-digit v2 infer requests back to back
              (real test digits, answers checked against the labels) for --seconds;
2. unbatched: the same with --no-batching, so the gain from batching is measured, not assumed
              (--compare-unbatched);
3. overload:  the same clients against a server allowing only --overload-concurrency
              requests in flight: the rest must get fast 503s, never time out.

The clients run on the same machine as the server and take CPU from it; numbers are
for the pair. Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import contract  # numpy only; never torch
from tests.helpers import SpawnedServer

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


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


def run_clients(url: str, model_name: str, bodies: list[tuple[bytes, dict, list[int]]], clients: int, seconds: float,
                timeout_s: float = 10.0, on_tick=None) -> dict:
    """``clients`` threads with one keep-alive connection each, for ``seconds``."""
    target = urllib.parse.urlsplit(url)
    path = f"/v2/models/{model_name}/infer"
    lock = threading.Lock()
    ok_latency: list[float] = []
    rejected_latency: list[float] = []
    errors: dict[str, int] = {}
    wrong, images = [0], [0]
    stop_at = time.perf_counter() + seconds

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=timeout_s)
        i = k
        while time.perf_counter() < stop_at:
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


def phase(label: str, model: Path, name: str, bodies, clients: int, seconds: float, flags: list[str]) -> dict:
    with SpawnedServer(model, *flags) as server:
        pid = server.proc.pid
        samples: list[tuple[float, float]] = [(0.0, rss_mb(pid))]
        with tqdm(total=round(seconds), desc=f"{label}: {clients} clients", unit="s",
                  bar_format="{desc}: {bar} {n:.0f}/{total} s") as bar:
            def tick(t: float) -> None:
                samples.append((t, rss_mb(pid)))
                bar.update(min(t, seconds) - bar.n)
            result = run_clients(server.url, name, bodies, clients, seconds, on_tick=tick)
        samples.append((seconds, rss_mb(pid)))
        exit_code = server.stop()
    window = min(10.0, seconds / 3)
    first = [m for t, m in samples if t <= window] or [samples[0][1]]
    last = [m for t, m in samples if t >= seconds - window] or [samples[-1][1]]
    result.update(rss_start_mb=round(samples[0][1], 1), rss_max_mb=round(max(m for _, m in samples), 1),
                  rss_first_window_mb=round(float(np.mean(first)), 1),
                  rss_last_window_mb=round(float(np.mean(last)), 1),
                  rss_growth=round(float(np.mean(last)) / float(np.mean(first)) - 1, 4),
                  server_exit_code=exit_code, server_flags=flags,
                  server_summary=next((line.strip() for line in reversed(server.log) if "stopped" in line), ""))
    return result


def table(results: dict) -> str:
    cols = ["clients", "ok", "rejected_503", "error_count", "wrong_answers", "throughput_rps", "images_per_s",
            "p50_ms", "p99_ms",
            "rejected_p99_ms", "rss_max_mb", "rss_growth"]
    lines = ["| phase | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / contract.DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, help="folder of the IDX files: send real digits and check answers")
    parser.add_argument("--url", help="load a running server instead of starting one (no memory readings)")
    parser.add_argument("--name", default=contract.RegistryConfig.model_name, help="model name in the v2 API")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--images-per-request", type=int, default=1, help="digits in each infer request")
    parser.add_argument("--binary", action="store_true", help="binary tensor data extension instead of JSON")
    parser.add_argument("--compare-unbatched", action="store_true", help="also run with --no-batching")
    parser.add_argument("--overload-concurrency", type=int, default=0,
                        help="also run against a server allowing this many requests in flight (0 = skip)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()

    bodies = infer_bodies(args.data, 2000, args.images_per_request, args.binary)
    results: dict[str, dict] = {}
    if args.url:
        results["load"] = run_clients(args.url, args.name, bodies, args.clients, args.seconds)
    else:
        results["load"] = phase("load", args.model, args.name, bodies, args.clients, args.seconds, [])
        if args.compare_unbatched:
            results["unbatched"] = phase("unbatched", args.model, args.name, bodies, args.clients, args.seconds,
                                         ["--no-batching"])
        if args.overload_concurrency:
            results["overload"] = phase("overload", args.model, args.name, bodies, args.clients,
                                        min(args.seconds, 10.0), ["--max-concurrency", str(args.overload_concurrency)])
    results["machine"] = {"cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    print(table({k: v for k, v in results.items() if k != "machine"}))
    if "unbatched" in results:
        print(f"batching: {results['load']['images_per_s'] / results['unbatched']['images_per_s']:.2f}x "
              "the throughput of one onnxruntime run per request")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
