"""Latency of one-image prediction (in-process and through the CLI) and of `cifarkit serve`
under load (N requests from C concurrent clients on loopback).

    python benchmarks/serve_latency.py RUN/best.ckpt IMAGE [--requests 200 --clients 8]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("image")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    a = ap.parse_args()
    import httpx
    import torch

    from cifarkit.checkpoint import load_checkpoint
    from cifarkit.predict import Predictor

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    data = open(a.image, "rb").read()
    pred = Predictor(load_checkpoint(a.checkpoint))
    for _ in range(10):
        pred.predict_bytes(data)
    inproc = []
    for _ in range(200):
        t = time.perf_counter()
        pred.predict_bytes(data)
        inproc.append(time.perf_counter() - t)
    cli = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cifarkit", "predict", a.checkpoint, a.image],
                       check=True, capture_output=True)
        cli.append(time.perf_counter() - t)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "cifarkit", "serve", a.checkpoint, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        lat, codes = [], []

        def one(_):
            with httpx.Client(timeout=60) as c:
                t = time.perf_counter()
                r = c.post(url + "/predict", files={"file": ("img.png", data, "application/octet-stream")})
                lat.append(time.perf_counter() - t)
                codes.append(r.status_code)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            list(pool.map(one, range(a.requests)))
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=10)
    q = statistics.quantiles(lat, n=20)
    report = {
        "predict_in_process_ms": {"median": 1000 * statistics.median(inproc),
                                  "p95": 1000 * statistics.quantiles(inproc, n=20)[18]},
        "predict_cli_wall_s_median": statistics.median(cli),
        "serve": {"requests": a.requests, "clients": a.clients, "ok": codes.count(200),
                  "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * q[18],
                  "requests_per_s": a.requests / wall},
        "threads": torch.get_num_threads(), "torch": str(torch.__version__),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
