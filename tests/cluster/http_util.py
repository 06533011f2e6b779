"""Shared by the cluster tests' HTTP checks (imported by their inline Python; lib.sh puts this folder on PYTHONPATH):
a JSON POST to a diffpipe server and the decoded pixel rows of a PNG (its text chunks aside)."""
import json
import struct
import urllib.error
import urllib.request
import zlib


def post(url, body, route="/v1/images/generations"):
    """POSTs `body` as JSON; returns (HTTP status, the parsed JSON answer), error statuses included."""
    req = urllib.request.Request(url + route, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png_pixels(png):
    """(width, height) and the decompressed image data of PNG bytes (equal pixels: equal data, chunks aside)."""
    i, idat = 8, b""
    while i < len(png):
        n, t = struct.unpack(">I4s", png[i:i + 8])
        i += 8
        if t == b"IDAT":
            idat += png[i:i + n]
        i += n + 4
    return struct.unpack(">II", png[16:24]), zlib.decompress(idat)
