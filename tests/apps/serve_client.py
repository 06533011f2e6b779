"""`diffpipe serve` driven by a client nobody here wrote: the official `openai` package (PyPI).

    serve_client.py BASE_URL REFERENCE_DIR PART

PART: basic (n images, same pixels as `generate --prompt P --seed s`, errors as the client sees them, raw HTTP bad
input, metrics, models) | load (64 concurrent clients: every request answered 200 or 429, server still healthy) |
disconnect (a client that leaves has its request cancelled) | inflight (one long request, for the SIGTERM test).
Exit 0 when every check passes; each failure is printed.
"""
import base64
import concurrent.futures
import io
import json
import socket
import sys
import time
import urllib.error
import urllib.request

import openai
from PIL import Image

base, ref_dir, part = sys.argv[1], sys.argv[2], sys.argv[3]
host, port = base.split("//")[1].split(":")
port = int(port.split("/")[0])
client = openai.OpenAI(base_url=base + "/v1", api_key="not-needed", max_retries=0, timeout=120)
fails = []


def check(cond, what):
    print(("ok: " if cond else "FAIL: ") + what)
    if not cond:
        fails.append(what)


def pixels_of_b64(s):
    return Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB").tobytes()


def raw(method, path, body=None, headers=None):
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


if part == "basic":
    r = client.images.generate(model="tiny", prompt="a red circle", n=2, size="16x16", response_format="b64_json",
                               extra_body={"seed": 5, "num_inference_steps": 3})
    check(len(r.data) == 2 and r.created > 0, "images.generate: 2 images")
    for k, d in enumerate(r.data):
        want = Image.open(f"{ref_dir}/img-{k:05d}-seed{5 + k}.png").convert("RGB").tobytes()
        check(pixels_of_b64(d.b64_json) == want, f"image {k}: the same pixels as generate --prompt P --seed {5 + k}")
    check(r.usage is not None and r.usage.input_tokens > 0, "usage counts the prompt's tokens")
    for kwargs, param in [({"size": "15x15"}, "size"), ({"n": 100}, "n"), ({"response_format": "url"}, "response_format"),
                          ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps"),
                          ({"extra_body": {"bogus": 1}}, "bogus")]:
        try:
            client.images.generate(prompt="x", **kwargs)
            check(False, f"{kwargs}: accepted")
        except openai.BadRequestError as e:
            check(e.status_code == 400 and e.body and e.body.get("param") == param,
                  f"{kwargs}: 400 naming '{param}' ({e.body.get('message') if e.body else e})")
    events = list(client.images.generate(prompt="a red circle", size="16x16", stream=True, partial_images=2,
                                         extra_body={"seed": 5, "num_inference_steps": 3}))
    kinds = [(e.type, getattr(e, "partial_image_index", None)) for e in events]
    check(kinds == [("image_generation.partial_image", 0), ("image_generation.partial_image", 1),
                    ("image_generation.completed", None)], f"stream=True, partial_images=2: {kinds}")
    want = Image.open(f"{ref_dir}/single/img-00000-seed5.png").convert("RGB").tobytes()  # a run of it alone
    check(pixels_of_b64(events[-1].b64_json) == want, "streamed final image: the same pixels as generate")
    try:
        client.images.generate(prompt="x", stream=True, n=2)
        check(False, "stream with n=2 accepted")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "n", "stream=True with n=2: 400 naming 'n'")
    code, body, _ = raw("POST", "/v1/images/generations", b"{not json", {"Content-Type": "application/json"})
    check(code == 400 and "not valid JSON" in json.loads(body)["error"]["message"], "malformed JSON: 400")
    code, body, _ = raw("POST", "/v1/images/generations", b'{"n": 1}', {"Content-Type": "application/json"})
    check(code == 400 and json.loads(body)["error"]["param"] == "prompt", "missing prompt: 400 naming 'prompt'")
    s = socket.create_connection((host, port))  # the server answers at the header, before the body
    s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n" + b"x" * 65536)
    s.settimeout(30)
    got = s.recv(4096).decode(errors="replace")
    s.close()
    check(got.startswith("HTTP/1.1 413") and "body_too_large" in got, f"oversized body: 413 ({got[:40]!r})")
    code, body, _ = raw("GET", "/nowhere")
    check(code == 404 and "error" in json.loads(body), "unknown route: 404 with an error object")
    code, body, _ = raw("GET", "/v1/models")
    check(code == 200 and json.loads(body)["data"][0]["object"] == "model", "/v1/models")
    # a slow client: connects, sends half a request, then nothing: 408, and the server goes on
    s = socket.create_connection((host, port))
    s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    s.settimeout(30)
    got = s.recv(4096).decode(errors="replace")
    s.close()
    check(got.startswith("HTTP/1.1 408"), f"slow client: 408 ({got[:40]!r})")
    code, body, _ = raw("GET", "/metrics")
    check(code == 200 and 'diffpipe_images_total{status="done"}' in body and "diffpipe_image_latency_seconds_bucket" in body
          and 'diffpipe_http_responses_total{code="400"}' in body, "/metrics in the Prometheus text format")
    code, body, _ = raw("GET", "/healthz")
    check(code == 200, "healthy after all of the above")

elif part == "load":
    def one(i):
        try:
            client.images.generate(prompt=f"shape {i}", size="16x16", extra_body={"num_inference_steps": 2, "seed": i})
            return 200
        except openai.RateLimitError as e:
            return 429 if e.response.headers.get("retry-after") else -1
        except Exception as e:  # noqa: BLE001 - any other outcome is a failure of the test
            print("unexpected:", type(e).__name__, e)
            return -1
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        codes = list(pool.map(one, range(64)))
    n200, n429 = codes.count(200), codes.count(429)
    check(n200 + n429 == 64 and n200 > 0, f"64 concurrent clients: {n200} x 200, {n429} x 429 (with Retry-After), no other answer")
    code, _, _ = raw("GET", "/healthz")
    check(code == 200, "healthy after the load")

elif part == "disconnect":
    s = socket.create_connection((host, port))
    body = json.dumps({"prompt": "a long one", "size": "16x16", "num_inference_steps": 400}).encode()
    s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    time.sleep(0.5)
    s.close()
    deadline = time.time() + 30
    cancelled = False
    while time.time() < deadline and not cancelled:
        _, m, _ = raw("GET", "/metrics")
        cancelled = 'diffpipe_images_total{status="cancelled"} 1' in m
        time.sleep(0.2)
    check(cancelled, "a client that disconnects has its request cancelled in every stage")
    r = client.images.generate(prompt="after", size="16x16", extra_body={"num_inference_steps": 2})
    check(len(r.data) == 1, "the server goes on")

elif part == "faults":  # server started with --timeout-request 2 --inject-failure denoise:2
    r = client.images.generate(prompt="first", size="16x16", extra_body={"num_inference_steps": 2})
    check(len(r.data) == 1, "image 1: 200")
    try:
        client.images.generate(prompt="second", size="16x16", extra_body={"num_inference_steps": 2})
        check(False, "image 2 (injected failure) answered 200")
    except openai.InternalServerError as e:
        check(e.status_code == 500 and "injected failure" in e.body.get("message", ""), f"a failed image: 500 for itself ({e.body})")
    try:
        client.images.generate(prompt="slow", size="32x32", extra_body={"num_inference_steps": 900})
        check(False, "a request past its deadline answered 200")
    except openai.APIStatusError as e:
        check(e.status_code == 504 and e.body.get("code") == "timeout", f"past --timeout-request: 504 ({e.status_code})")
    r = client.images.generate(prompt="after", size="16x16", extra_body={"num_inference_steps": 2})
    check(len(r.data) == 1, "the server goes on: 200")

elif part == "inflight":
    r = client.images.generate(prompt="in flight at SIGTERM", size="16x16", extra_body={"num_inference_steps": 150})
    check(len(r.data) == 1, "the request in flight at SIGTERM completes")

sys.exit(1 if fails else 0)
