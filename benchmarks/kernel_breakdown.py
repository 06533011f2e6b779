#!/usr/bin/env python3
"""Where a GPU call's time goes, side by side: GPU kernel time by kind, from Chrome traces of one call each.

    python3 benchmarks/kernel_breakdown.py NAME=TRACE.json [NAME=TRACE.json ...] [--top 12]

The traces are what `bench_sd --trace PREFIX` (LibTorch's Kineto profiler, diffpipe's side) and
`vs_diffusers.py --trace DIR` (torch.profiler, diffusers eager and compiled) write: one UNet forward or one VAE
decode each. Kernels are summed by kind (convolution, matrix product, attention, normalisation, layout copies,
element-wise, compiled Triton kernels, other), and for each trace the kernels of largest total time are listed.
"GPU busy" is the sum of kernel durations; "span" runs from the first kernel's start to the last one's end: span
minus busy is time the GPU waited for the host (launch overhead, synchronisations).
"""
import argparse
import collections
import json
import re
import sys

# Order matters: the first pattern a kernel's name matches decides its kind.
KINDS = [
    ("layout", r"nchwToNhwc|nhwcToNchw|nchw2nhwc|nhwc2nchw|convertTensor|transpose|permute|copy_kernel|direct_copy|"
               r"CatArrayBatchedCopy|Memcpy|memcpy|Memset|memset|contiguous"),
    ("attention", r"flash|fmha|attention|sdpa|_attn|mha|softmax"),
    ("norm", r"group_?norm|GroupNorm|layer_?norm|LayerNorm|RowwiseMoments|ComputeFusedParams|Welford|welford|"
             r"compute_stats|_norm_"),
    ("triton", r"^triton_"),
    ("conv", r"conv|fprop|implicit_gemm|winograd|implicit_convolve|dgrad|xmma_fprop|cudnn"),
    ("matmul", r"gemm|Gemm|GEMM|cutlass|cublas|nvjet|matmul|sm90_xmma|splitK|reduce_1Block"),
    ("elementwise", r"elementwise|vectorized|unrolled|Activation|silu|gelu|geglu|add_kernel|mul_kernel|"
                    r"upsample|avg_pool|reduce_kernel|index|cat_|fill"),
]
KIND_RE = [(k, re.compile(p)) for k, p in KINDS]


def kind_of(name):
    for k, r in KIND_RE:
        if r.search(name):
            return k
    return "other"


def load(path):
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"kernel_breakdown: cannot read trace {path}: {e}")
    ev = d["traceEvents"] if isinstance(d, dict) else d
    ks = [e for e in ev if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return ks


def summarise(kernels):
    by_kind = collections.defaultdict(float)
    count = collections.Counter()
    by_name = collections.defaultdict(float)
    for e in kernels:
        dur = float(e.get("dur", 0.0)) / 1000.0  # ms
        k = kind_of(e["name"])
        by_kind[k] += dur
        count[k] += 1
        by_name[e["name"]] += dur
    busy = sum(by_kind.values())
    span = 0.0
    if kernels:
        span = (max(float(e["ts"]) + float(e.get("dur", 0.0)) for e in kernels) - min(float(e["ts"]) for e in kernels)) / 1000.0
    return {"busy_ms": busy, "span_ms": span, "kernels": len(kernels), "by_kind": dict(by_kind), "count": dict(count),
            "by_name": by_name}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+", help="NAME=FILE.json")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", help="also write the summaries here")
    a = ap.parse_args()
    sums = {}
    for t in a.traces:
        name, sep, path = t.partition("=")
        if not sep:
            sys.exit(f"kernel_breakdown: '{t}': expected NAME=FILE.json")
        ks = load(path)
        if not ks:
            print(f"kernel_breakdown: {path}: no GPU kernels in the trace (a CPU run?)")
            continue
        sums[name] = summarise(ks)
    if not sums:
        return 1
    names = list(sums)
    kinds = [k for k, _ in KINDS] + ["other"]
    print(f"{'kernel kind (ms)':<18}" + "".join(f"{n:>22}" for n in names))
    for k in kinds:
        if not any(k in s["by_kind"] for s in sums.values()):
            continue
        row = f"{k:<18}"
        for n in names:
            s = sums[n]
            v = s["by_kind"].get(k, 0.0)
            row += f"{v:>10.2f} ({s['count'].get(k, 0):>4}) {100 * v / max(s['busy_ms'], 1e-9):>4.0f}%"
        print(row)
    print(f"{'GPU busy':<18}" + "".join(f"{sums[n]['busy_ms']:>10.2f} ({sums[n]['kernels']:>4})      " for n in names))
    print(f"{'span':<18}" + "".join(f"{sums[n]['span_ms']:>10.2f}" + " " * 12 for n in names))
    for n in names:
        print(f"\n{n}: the {a.top} kernels of largest total time (ms, share of GPU busy)")
        top = sorted(sums[n]["by_name"].items(), key=lambda kv: -kv[1])[: a.top]
        for kname, v in top:
            print(f"  {v:8.3f} {100 * v / sums[n]['busy_ms']:5.1f}%  [{kind_of(kname)}] {kname[:110]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({n: {k: v for k, v in s.items() if k != "by_name"} for n, s in sums.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
