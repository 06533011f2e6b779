#!/usr/bin/env python3
"""Serving overhead: the same Poisson load through HTTP (`diffpipe serve` + the official openai client) and
submitted directly (`diffpipe bench --rates`, same model, placement, images and steps), in one run.

    python3 benchmarks/serve_bench.py --bin build/apps/diffpipe --model DIR [--np 3] [--images 24] [--steps 10]
                                      [--rates 2,4,8] [--size 16]

Every HTTP response is checked (200, one PNG of the requested size) before any figure is printed. Prints, per
rate: achieved images/s and latency p50/p95 through HTTP and directly, and their ratios.
"""
import argparse
import base64
import concurrent.futures
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import openai
from PIL import Image

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="build/apps/diffpipe")
ap.add_argument("--model", required=True)
ap.add_argument("--np", type=int, default=1)
ap.add_argument("--images", type=int, default=24)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--rates", default="2,4,8")
ap.add_argument("--size", type=int, default=0, help="image side (default: the model's)")
args = ap.parse_args()
rates = [float(r) for r in args.rates.split(",")]
env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
launch = ["mpirun", "--oversubscribe", "-np", str(args.np)] if args.np > 1 else []


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]


# 1) directly: diffpipe bench, pipeline placement (one rank: all stages on it), the same rates
work = tempfile.mkdtemp(prefix="diffpipe-serve-bench-")
size = ["--width", str(args.size), "--height", str(args.size)] if args.size else []
subprocess.run(launch + [args.bin, "bench", "--model", args.model, "--images", str(args.images), "--steps",
                         str(args.steps), "--rates", args.rates, "--placements", "pipeline" if args.np > 1 else "one",
                         "--out", f"{work}/direct.json"] + size, env=env, check=True, stderr=subprocess.DEVNULL)
direct = {r["rate"]: r for r in json.load(open(f"{work}/direct.json"))["runs"] if r["mode"] == "open"}

# 2) through HTTP
log = open(f"{work}/serve.log", "w")
srv = subprocess.Popen(launch + [args.bin, "serve", "--model", args.model, "--port", "0", "--queue", "1024",
                                 "--steps", str(args.steps)], env=env, stderr=log, stdout=log)
url = None
for _ in range(600):
    m = re.search(r"http://127\.0\.0\.1:(\d+)", open(f"{work}/serve.log").read())
    if m:
        url = m.group(0)
        try:
            import urllib.request
            urllib.request.urlopen(url + "/healthz", timeout=2)
            break
        except Exception:  # noqa: BLE001 - not up yet
            pass
    time.sleep(0.1)
assert url, "server did not start"
client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
rows = []
try:
    for rate in rates:
        rng = random.Random(7919 + rates.index(rate))
        arrivals, t = [], 0.0
        for _ in range(args.images):
            arrivals.append(t)
            t += rng.expovariate(rate)
        lat, done_at = [None] * args.images, [None] * args.images
        t0 = time.time()

        def one(i):
            time.sleep(max(0.0, t0 + arrivals[i] - time.time()))
            s = time.time()
            extra = {"seed": 1 + i}
            r = client.images.generate(prompt="a red circle at the top left", extra_body=extra,
                                       **({"size": f"{args.size}x{args.size}"} if args.size else {}))
            im = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
            assert im.format == "PNG" and (not args.size or im.size == (args.size, args.size)), im
            lat[i], done_at[i] = time.time() - s, time.time()

        with concurrent.futures.ThreadPoolExecutor(args.images) as pool:
            list(pool.map(one, range(args.images)))
        ips = args.images / (max(done_at) - t0)
        d = direct[rate]
        rows.append((rate, ips, pct(lat, 0.5), pct(lat, 0.95), d["images_per_s"], d["latency_s"]["p50"],
                     d["latency_s"]["p95"]))
finally:
    srv.send_signal(signal.SIGTERM)
    srv.wait(timeout=120)

print(f"model {args.model}, {args.np} rank(s), {args.images} images x {args.steps} steps per rate")
print("| rate /s | HTTP images/s | HTTP p50 s | HTTP p95 s | direct images/s | direct p50 s | direct p95 s | "
      "HTTP/direct images/s | HTTP/direct p50 |")
print("|---|---|---|---|---|---|---|---|---|")
for r, hi, hp50, hp95, di, dp50, dp95 in rows:
    print(f"| {r:g} | {hi:.2f} | {hp50:.3f} | {hp95:.3f} | {di:.2f} | {dp50:.3f} | {dp95:.3f} | {hi / di:.2f}x | "
          f"{hp50 / dp50:.2f}x |")
