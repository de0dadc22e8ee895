"""How candidate HTTP servers for the service behave under attack and load: the measurement
behind the choice of uvicorn with its h11 parser (README, "Our inference service").

    pip install httptools uvloop hypercorn granian     # the candidates not in the project
    python -m benchmarks.http_servers

Each server runs the same minimal ASGI app (read the body, answer its length; a body over
1,000 bytes is refused with 413 before it is read) on 127.0.0.1 and gets, in turn:
an HTTP/0.9 request, two different Content-Lengths, a Content-Length in Unicode digits, a
GET whose body is another request (smuggling: how many answers come back), a request with
both Content-Length and Transfer-Encoding followed by another (how many answers; is the
connection closed, as RFC 9112 6.1 requires?), Expect: 100-continue on a body too large (is
100 sent before the 413?), a connection that sends nothing, one that sends a header a byte at
a time, an endless stream of headers (memory growth), 10,000 headers (97 KiB) in one write
(the answer, and the server's CPU per such request), and 32 clients posting 6 KB bodies for
5 s (requests/s, p99, server CPU per request). Beside the candidates, uvicorn + h11 as the
service runs it: behind serving/transport.py's guards.
The numbers are for this machine (the CPU is printed) and the candidates' versions.
"""
from __future__ import annotations

import importlib.metadata
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.load import Connection, children, tree_rss
from harness.services import REPO, free_port
from pipeline.machine import hardware

APP = '''
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            done = "startup" if message["type"] == "lifespan.startup" else "shutdown"
            await send({"type": f"lifespan.{done}.complete"})
            if done == "shutdown":
                return
    declared = int(dict(scope["headers"]).get(b"content-length", b"0"))
    if declared > 1000 and scope["path"] == "/small":
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-length", b"0"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": b""})
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    out = b'{"bytes": %d}' % size
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(out))]})
    await send({"type": "http.response.body", "body": out})
'''

GUARDED = f'''
import sys
sys.path.insert(0, {str(REPO)!r})
from app import app as plain
from serving.metrics import Metrics
from serving.transport import guarded_h11, refuse_ambiguous_framing
metrics = Metrics("bench")
app = refuse_ambiguous_framing(plain, metrics)
Protocol = guarded_h11(metrics)
'''

CANDIDATES = {  # name: (module that must be importable, command; {port} is filled in)
    "uvicorn + httptools": ("httptools", ["uvicorn", "app:app", "--http", "httptools", "--no-access-log",
                                          "--port", "{port}"]),
    "uvicorn + h11": ("h11", ["uvicorn", "app:app", "--http", "h11", "--no-access-log", "--port", "{port}"]),
    "uvicorn + h11 + serving/transport.py": ("h11", ["uvicorn", "guarded:app", "--http", "guarded:Protocol",
                                                     "--no-access-log", "--port", "{port}"]),
    "hypercorn": ("hypercorn", ["hypercorn", "app:app", "-b", "127.0.0.1:{port}"]),
    "granian": ("granian", ["granian", "--interface", "asgi", "app:app", "--workers", "1",
                            "--http1-header-read-timeout", "5000", "--port", "{port}"]),
}


def raw(port: int, data: bytes, wait: float = 3) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


def closed_after(port: int, trickle: bool, limit: float = 15) -> float | None:
    """Seconds until the server closes a connection that sends nothing (or a byte a second)."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        t0 = time.monotonic()
        if trickle:
            s.sendall(b"GET / HTTP/1.1\r\n")
        while time.monotonic() - t0 < limit:
            try:
                if trickle:
                    s.sendall(b"X")
                s.recv(100)  # an error answer, or b"" (closed): either way the server ended it
                return round(time.monotonic() - t0, 1)
            except TimeoutError:
                continue
            except OSError:
                return round(time.monotonic() - t0, 1)
    return None


def tree_cpu_s(pid: int) -> float:
    pids = [pid, *children(pid)]
    return sum(sum(map(float, Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[11:13])) / 100
               for p in pids)


def endless_headers(port: int, pid: int) -> str:
    before = tree_rss(pid)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        try:
            for i in range(20_000):  # 20 MB of headers
                s.sendall(b"X-Pad-%d: %s\r\n" % (i, b"y" * 1000))
                sent += 1
        except OSError:
            pass
        time.sleep(0.5)
        grown = tree_rss(pid) - before
        try:
            answer = s.recv(40).split(b"\r\n")[0].decode() or "closed"
        except (TimeoutError, OSError):
            answer = "no answer"
    return f"{answer} after {sent:,} KB; RSS +{grown:.0f} MB"


def framing_both(port: int) -> str:
    """Content-Length and Transfer-Encoding in one request, then a second request."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                  b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        out, closed = b"", False
        try:
            while chunk := s.recv(65536):
                out += chunk
            closed = True
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    statuses = ", ".join(status.decode() for status in re.findall(rb"HTTP/1.1 (\d{3})", out))
    return f"{statuses or 'no answer'}; {'closed' if closed else 'kept open'}"


def many_headers(port: int, pid: int, times: int = 20) -> str:
    """10,000 headers in one write (97 KiB, one read for the server), ``times`` times: the
    answer, and the server's CPU per request."""
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X%d: y\r\n" % i for i in range(10_000)) + b"\r\n"
    cpu0 = tree_cpu_s(pid)
    answers = set()
    for _ in range(times):
        try:
            answers.add(raw(port, head, 2).split(b"\r\n")[0].decode(errors="replace") or "closed")
        except ConnectionResetError:
            answers.add("reset")
    return f"{' / '.join(sorted(answers))}; {(tree_cpu_s(pid) - cpu0) / times * 1e3:.1f} ms CPU each"


def load(port: int, pid: int, clients: int = 32, seconds: float = 5) -> dict:
    body = b"x" * 6000
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        conn = Connection("127.0.0.1", port, timeout=10)
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            conn.request("POST", "/", body)
            conn.getresponse().read()
            with lock:
                latencies.append(time.perf_counter() - t0)
        conn.close()
    cpu0 = tree_cpu_s(pid)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = tree_cpu_s(pid) - cpu0
    latencies.sort()
    p99 = latencies[int(len(latencies) * .99)]
    return {"requests/s": round(len(latencies) / seconds), "p99 ms": round(p99 * 1e3, 1),
            "server CPU µs/request": round(cpu / len(latencies) * 1e6)}


def probe(name: str, command: list[str], folder: Path) -> dict:
    port = free_port()
    proc = subprocess.Popen([c.replace("{port}", str(port)) for c in command], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(0.5)
        first_line = lambda b: b.split(b"\r\n")[0].decode(errors="replace") or "closed"  # noqa: E731
        smuggle = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
        return {
            "HTTP/0.9 GET /": first_line(raw(port, b"GET /\r\n\r\n")),
            "two Content-Lengths": first_line(raw(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                                        b"Content-Length: 5\r\n\r\nabcde")),
            "Content-Length: ²": first_line(raw(port, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \u00b2\r\n\r\nab"
                                                .encode("latin-1"))),
            "GET with a request as body: answers": raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                                                       % len(smuggle) + smuggle, 2).count(b"HTTP/1.1 "),
            "Content-Length + Transfer-Encoding, then a request": framing_both(port),
            "100-continue, body too large": first_line(raw(port, b"POST /small HTTP/1.1\r\nHost: x\r\n"
                                                                 b"Expect: 100-continue\r\n"
                                                                 b"Content-Length: 5000000\r\n\r\n", 2)),
            "silent connection closed after (s)": closed_after(port, trickle=False) or "> 15",
            "header a byte/s closed after (s)": closed_after(port, trickle=True) or "> 15",
            "20 MB of headers": endless_headers(port, proc.pid),
            "10,000 headers in one write": many_headers(port, proc.pid),
            **load(port, proc.pid),
        }
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="http-servers-"))
    (folder / "app.py").write_text(APP)
    (folder / "guarded.py").write_text(GUARDED)
    results = {}
    for name, (module, command) in CANDIDATES.items():
        try:
            version = importlib.metadata.version(command[0])
        except importlib.metadata.PackageNotFoundError:
            version = None
        if version is None or shutil.which(command[0]) is None or not _importable(module):
            print(f"{name}: not installed, skipped (pip install {module} {command[0]})", file=sys.stderr)
            continue
        print(f"{name} {version} ...", file=sys.stderr, flush=True)
        results[f"{name} {version}"] = probe(name, command, folder)
    shutil.rmtree(folder)
    rows = list(next(iter(results.values())).keys()) if results else []
    print("| | " + " | ".join(results) + " |")
    print("|" + " --- |" * (len(results) + 1))
    for row in rows:
        print(f"| {row} | " + " | ".join(str(r[row]) for r in results.values()) + " |")
    print(f"machine: {hardware(with_gpu=False)}")


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
