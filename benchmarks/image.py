"""The service in its image against the same service outside it, side by side in one run.

    python -m benchmarks.image --data data/raw                          # builds the image from models/model.onnx
    python -m benchmarks.image --data data/raw --image mnist-onnx-serve:latest --base BASE   # one already built

What it measures, on this machine (podman and runc, as tests/test_image.py runs them):

- the image's size, uncompressed, and what it is made of: the base, the service's Python
  environment (onnxruntime's share of it), the service's code and the model;
- start to ready: from ``podman run`` to the first 200 from /v2/health/ready, and from starting
  ``python -m serving`` in this checkout to its "ready" line, ``--starts`` times each;
- JSON requests/s: benchmarks.load's clients (``--clients`` threads, one real test digit a v2 JSON
  request, answers checked against the labels) against the container and the process in turn, for
  ``--rounds`` rounds of ``--seconds`` each; the ratio is the median of the per-round ratios, so a
  busy spell on the machine tilts one round, not the figure.

Both run the same model file with the same settings (ServeConfig's defaults, which the image
uses). The process runs this checkout's Python and libraries, the container the image's (the JSON
says which); the clients share the machine's CPUs with either. Without --image, the image is built
(scripts/image.sh) on a base made with mmdebstrap, as the tests do, and removed afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from benchmarks.load import infer_bodies, run_clients
from harness import containers
from harness.services import SpawnedServer
from pipeline import contract
from pipeline.machine import hardware

REPO = Path(__file__).resolve().parents[1]


def composition(image: str) -> dict[str, int]:
    """Bytes on disk of the parts of the image (du inside it)."""
    paths = {"python_environment_bytes": "/opt/venv",
             "onnxruntime_bytes": "/opt/venv/lib/python3*/site-packages/onnxruntime",
             "service_code_bytes": "/app", "model_bytes": "/models"}
    out = containers.podman("run", "--rm", "--pull=never", *containers.ulimits(), "--entrypoint", "sh", image, "-c",
                            # one du each: du counts a folder once, even inside another it was given
                            "; ".join(f"du -s --block-size=1 {p}" for p in paths.values())).stdout.splitlines()
    return {name: int(line.split()[0]) for name, line in zip(paths, out)}


@contextmanager
def beside(container: containers.Container, pid: int) -> Iterator[Path]:
    """Process ``pid`` in a CPU cgroup of its own next to the container's, for the block.

    A container is one cgroup, and the kernel shares the CPUs between cgroups before it shares
    them between the tasks in one: on a busy machine, the container's threads together get about
    what one busy process of the root cgroup gets, and a process outside any container more. In
    a cgroup of the same weight beside the container's, the process competes on the same terms,
    as every pod does on Kubernetes. (cgroup v1's cpu hierarchy, or v2's unified one.)
    """
    cpid = int(containers.podman("inspect", "--format", "{{.State.Pid}}", container.name).stdout)
    lines = Path(f"/proc/{cpid}/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in lines if "cpu" in line.split(":")[1].split(",")]
    v2 = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
    root = Path("/sys/fs/cgroup/cpu") if v1 else Path("/sys/fs/cgroup")
    own = root / Path((v1 or v2)[0]).parent.relative_to("/") / f"mnist-onnx-bench-{pid}"
    own.mkdir()
    try:
        (own / "cgroup.procs").write_text(str(pid))
        yield own
    finally:
        (root / "cgroup.procs").write_text(str(pid))  # back where it came from, so the cgroup can go
        own.rmdir()


def versions(image: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, platform; print(platform.python_version(), "
            "m.version('onnxruntime'), m.version('onnx'))")
    python, ort, onnx = containers.podman("run", "--rm", "--pull=never", *containers.ulimits(), "--entrypoint",
                                          "python", image, "-c", code).stdout.split()
    return {"python": python, "onnxruntime": ort, "onnx": onnx}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / contract.DEFAULT_MODEL,
                        help="the model the process serves; it must be the one in the image")
    parser.add_argument("--data", type=Path, required=True, help="folder of the IDX files (real test digits)")
    parser.add_argument("--image", help="an image built by scripts/image.sh from --model (default: build one)")
    parser.add_argument("--base", help="with --image: the base it was built on, to say what it weighs")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--starts", type=int, default=3, help="start-to-ready measurements of each")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    if reason := containers.unavailable():
        parser.exit(2, f"image: cannot run containers here: {reason}\n")

    bodies = infer_bodies(args.data, 2000)
    name = contract.RegistryConfig.model_name
    results: dict = {"machine": hardware(with_gpu=False)}
    with ExitStack() as stack:
        image, base = args.image, args.base
        if image is None:
            print("image: making a base with mmdebstrap and building the image (a few minutes)")
            token = uuid.uuid4().hex[:8]
            base = containers.make_base(Path(stack.enter_context(tempfile.TemporaryDirectory())),
                                        f"localhost/mnist-onnx-bench-base:{token}")
            stack.callback(containers.remove_image, base)
            image = containers.build_image(REPO, f"localhost/mnist-onnx-bench:{token}", base)
            stack.callback(containers.remove_image, image)
        results["image"] = {"name": image, "size_bytes": containers.image_size(image), **composition(image),
                            **({"base_bytes": containers.image_size(base)} if base else {}),
                            "versions": versions(image)}

        starts: dict[str, list[float]] = {"container": [], "process": []}
        for _ in range(args.starts):
            with containers.Container(image) as c:
                starts["container"].append(c.ready_s)
            t0 = time.perf_counter()
            with SpawnedServer(args.model, command="serving"):
                starts["process"].append(time.perf_counter() - t0)
        results["start_to_ready_s"] = {k: round(statistics.median(v), 2) for k, v in starts.items()}

        # The image as deploy/ runs it (a port mapped to the container's network); the same image on
        # the host's network (what the mapping costs); the service as a process of this checkout, in
        # a cgroup beside the container's (the same share of a busy machine) and as it is started.
        servers = {"container": stack.enter_context(containers.Container(image)),
                   "container, host network": stack.enter_context(containers.Container(image, host_network=True)),
                   "process, own cgroup": stack.enter_context(SpawnedServer(args.model, command="serving")),
                   "process": stack.enter_context(SpawnedServer(args.model, command="serving"))}
        stack.enter_context(beside(servers["container"], servers["process, own cgroup"].proc.pid))
        rounds: list[dict] = []
        for r in range(args.rounds):
            row = {}
            for who, server in servers.items():
                assert server.url is not None
                row[who] = run_clients(server.url, name, bodies, args.clients, args.seconds)
                print(f"round {r + 1}/{args.rounds} {who}: {row[who]['throughput_rps']} requests/s, "
                      f"p50 {row[who]['p50_ms']} ms, p99 {row[who]['p99_ms']} ms, "
                      f"errors {row[who]['error_count']}, wrong {row[who]['wrong_answers']}")
            rounds.append(row)
        results["rounds"] = rounds
        results["json_rps"] = {who: round(statistics.median(row[who]["throughput_rps"] for row in rounds), 1)
                               for who in servers}
        results["json_rps_ratio"] = {  # medians of the per-round ratios
            f"{a} / {b}": round(statistics.median(row[a]["throughput_rps"] / row[b]["throughput_rps"]
                                                  for row in rounds), 3)
            for a, b in (("container", "process, own cgroup"), ("container, host network", "container"),
                         ("container", "process"), ("process, own cgroup", "process"))}
        results["load_average_1m"] = os.getloadavg()[0]
        results["container_exit_codes"] = [c.stop() for c in servers.values() if isinstance(c, containers.Container)]

    size = results["image"]
    base_part = f"base {size['base_bytes'] / 1e6:.0f} MB, " if "base_bytes" in size else ""
    print(f"image: {size['size_bytes'] / 1e6:.0f} MB: {base_part}Python environment "
          f"{size['python_environment_bytes'] / 1e6:.0f} MB (onnxruntime {size['onnxruntime_bytes'] / 1e6:.0f} MB), "
          f"service code {size['service_code_bytes'] / 1e3:.0f} KB, model {size['model_bytes'] / 1e6:.1f} MB; "
          f"in it: {size['versions']}")
    print(f"start to ready (median of {args.starts}): container {results['start_to_ready_s']['container']} s, "
          f"process {results['start_to_ready_s']['process']} s")
    print(f"JSON requests/s (median of {args.rounds} rounds of {args.seconds:g} s, {args.clients} clients): "
          + ", ".join(f"{who} {rps}" for who, rps in results["json_rps"].items()))
    print("ratios (median of the per-round ratios): "
          + ", ".join(f"{pair} {ratio}x" for pair, ratio in results["json_rps_ratio"].items()))
    print(f"load average at the end: {results['load_average_1m']:.1f} (cores: {results['machine']['cores']})")
    print(f"machine: {results['machine']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
