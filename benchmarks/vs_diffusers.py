#!/usr/bin/env python3
"""diffpipe against diffusers on the same machine, same folder, same settings, in one run.

    python3 benchmarks/vs_diffusers.py --model DIR [--size 256] [--steps 6] [--images 2] [--threads 2]
        [--device cpu|cuda] [--dtype float32|float16|bfloat16] [--rounds 2] [--parts e2e,loop,unet,vae]
        [--compile] [--bench build/benchmarks/bench_sd] [--trace DIR]

Runs build/benchmarks/bench_sd (diffpipe: model loaded once, timed rounds, its inputs and outputs saved), then
diffusers' StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL folders, StableDiffusion3Pipeline for SD3
ones: their "unet" part is the MMDiT transformer, their sampler flow matching; default attention processor, i.e.
scaled_dot_product_attention) on the very
same inputs: each request's initial noise, the UNet and VAE inputs. It checks the numbers first -- UNet and VAE
outputs by max|a-b|/max|b|, the final 8-bit images within +-1 -- and fails (exit 1) when they disagree; then it
prints both times and the ratio diffusers/diffpipe (> 1: diffpipe is faster) for
  e2e   the whole generation of N images (text encoder, denoising loop, VAE decode; model load excluded),
  loop  the denoising loop alone (steps/s with guidance, diffusers' progress-bar rate),
  unet  one UNet forward on the [2N, C, h, w] guidance batch,
  vae   one VAE decode of N latents,
  (e2e_threads: diffpipe only, e2e with each CPU stage computing on its own thread instead of the rank's
   compute lane; printed as the lane's speed-up)
plus diffpipe's per-module breakdown of the e2e run and peak memory of both. Times are the minimum over rounds
(after one warm-up); each side runs alone with the same thread count. --compile adds diffusers with
torch.compile (UNet and VAE decoder) as a second reference. --trace DIR profiles one more UNet and VAE call of
each side (Chrome traces in DIR) and prints where the GPU time goes, kind by kind (benchmarks/kernel_breakdown.py).
The reference is only a benchmark dependency: diffpipe itself never runs Python.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 3e-2}  # module tolerances of the golden tests


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--parts", default="e2e,loop,unet,vae")
    ap.add_argument("--compile", action="store_true", help="also time diffusers + torch.compile")
    ap.add_argument("--bench", default=os.path.join(os.path.dirname(__file__), "..", "build", "benchmarks", "bench_sd"))
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--trace", help="profile one UNet / VAE call of each side into this folder, print the breakdown")
    return ap.parse_args()


def pipeline_class(model):
    return json.load(open(os.path.join(model, "model_index.json"))).get("_class_name")


def sampler_of(model):  # DDIM on both sides; SD3 and Flux folders: their flow-matching Euler
    return "flow_euler" if pipeline_class(model) in ("StableDiffusion3Pipeline", "FluxPipeline") else "ddim"


def run_diffpipe(a, out_file):
    cmd = [a.bench, "--model", a.model, "--size", str(a.size), "--steps", str(a.steps), "--images", str(a.images),
           "--guidance", str(a.guidance), "--threads", str(a.threads), "--device", a.device, "--dtype", a.dtype,
           "--rounds", str(a.rounds), "--parts", a.parts, "--sampler", sampler_of(a.model), "--out", out_file]
    if a.trace:
        cmd += ["--trace", os.path.join(a.trace, "diffpipe")]
    print("[diffpipe] " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"vs_diffusers: bench_sd failed (exit {p.returncode})")
    return json.loads(p.stdout.strip().splitlines()[-1])


class Diffusers:
    def __init__(self, a, torch):
        from diffusers import (DDIMScheduler, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline,
                               StableDiffusionXLPipeline)
        self.a, self.torch = a, torch
        self.tag = "diffusers"  # the traces' name ("diffusers_compiled" once compiled)
        self.dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[a.dtype]
        t0 = time.perf_counter()
        cls = pipeline_class(a.model)
        self.xl, self.sd3 = cls == "StableDiffusionXLPipeline", cls == "StableDiffusion3Pipeline"
        self.flux = cls == "FluxPipeline"
        if self.flux:
            pipe = FluxPipeline.from_pretrained(a.model, dtype=self.dtype)
        elif self.xl:  # no watermark: diffpipe does not add one
            pipe = StableDiffusionXLPipeline.from_pretrained(a.model, dtype=self.dtype, add_watermarker=False)
        elif self.sd3:
            absent = {}  # a folder saved without T5 (or an image encoder) names them null: diffusers wants None
            for k in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"):
                if not os.path.isdir(os.path.join(a.model, k)):
                    absent[k] = None
            pipe = StableDiffusion3Pipeline.from_pretrained(a.model, dtype=self.dtype, **absent)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(a.model, dtype=self.dtype, safety_checker=None,
                                                           requires_safety_checker=False)
        if not (self.sd3 or self.flux):
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(a.device)
        self.load_s = time.perf_counter() - t0
        # diffusers' SD pipeline keeps the VAE in the pipeline dtype (its SDXL pipeline upcasts as diffpipe does);
        # diffpipe decodes in float32 under force_upcast. Match the numbers checked, not the policy: the VAE check
        # runs the reference in float32 when diffpipe did.
        self.vae_dtype = torch.float32 if (pipe.vae.config.get("force_upcast", True) and a.dtype == "float16") else self.dtype

    def sync(self):
        if self.a.device == "cuda":
            self.torch.cuda.synchronize()

    def timed(self, f, trace=None):
        f()  # warm-up
        ts = []
        for _ in range(self.a.rounds):
            self.sync()
            t0 = time.perf_counter()
            out = f()
            self.sync()
            ts.append(time.perf_counter() - t0)
        if trace and self.a.trace:  # one more call under the profiler, as bench_sd --trace does
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.a.device == "cuda" else [])
            self.sync()
            with profile(activities=acts) as p:
                f()
                self.sync()
            p.export_chrome_trace(os.path.join(self.a.trace, f"{self.tag}.{trace}.json"))
        return ts, out

    def prompts(self):
        return [f"a photograph of an astronaut riding a horse, number {i}" for i in range(self.a.images)]

    def e2e(self, noise):
        torch, a = self.torch, self.a
        # diffusers multiplies given latents by it, as diffpipe does (flow matching starts at sigma 1: none)
        sigma = getattr(self.pipe.scheduler, "init_noise_sigma", 1.0)
        lat = noise.to(a.device, self.dtype)
        if self.flux:  # FluxPipeline takes its latents 2x2-packed
            b, c, h, w = lat.shape
            lat = self.pipe._pack_latents(lat, b, c, h, w)

        def run():
            with torch.no_grad():
                return self.pipe(self.prompts(), height=a.size, width=a.size, num_inference_steps=a.steps,
                                 guidance_scale=a.guidance, latents=lat, output_type="np").images
        ts, img = self.timed(run)
        assert sigma == 1.0
        return ts, torch.from_numpy((img * 255).round().clip(0, 255).astype("uint8"))

    def loop(self):
        """Steps/s of the denoising loop: callback timestamps between the first and the last step."""
        torch, a = self.torch, self.a
        stamps = []

        def cb(pipe, i, t, kw):
            self.sync()
            stamps.append(time.perf_counter())
            return kw

        def run():
            stamps.clear()
            with torch.no_grad():
                self.pipe(self.prompts(), height=a.size, width=a.size, num_inference_steps=a.steps + 1,
                          guidance_scale=a.guidance, output_type="latent", callback_on_step_end=cb)
            return (stamps[-1] - stamps[0])
        run()
        durations = [run() for _ in range(a.rounds)]  # a.steps steps between a.steps + 1 stamps
        return [d for d in durations]

    def unet(self, saved):
        torch, a = self.torch, self.a
        x, t = saved["unet.sample"].to(a.device, self.dtype), saved["unet.timesteps"].to(a.device)
        ctx = saved["unet.encoder_hidden_states"].to(a.device, self.dtype)
        if self.flux:  # packed latents, the ids FluxPipeline makes, timestep as sigma, the guidance scale
            pooled = saved["unet.text_embeds"].to(a.device, self.dtype)
            b, c, h, w = x.shape
            packed = self.pipe._pack_latents(x, b, c, h, w)
            img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, a.device, self.dtype)
            txt_ids = torch.zeros(ctx.shape[1], 3, device=a.device, dtype=self.dtype)
            g = saved["unet.guidance"].to(a.device) if self.pipe.transformer.config.guidance_embeds else None

            def run():
                out = self.pipe.transformer(packed, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                                            img_ids=img_ids, txt_ids=txt_ids, guidance=g).sample
                return self.pipe._unpack_latents(out, h * self.pipe.vae_scale_factor, w * self.pipe.vae_scale_factor,
                                                 self.pipe.vae_scale_factor)
            with torch.no_grad():
                return self.timed(run, "unet")
        if self.sd3:
            pooled = saved["unet.text_embeds"].to(a.device, self.dtype)
            with torch.no_grad():
                return self.timed(lambda: self.pipe.transformer(x, encoder_hidden_states=ctx, pooled_projections=pooled,
                                                                timestep=t).sample, "unet")
        kw = {}
        if self.xl:  # the pooled text embedding and size ids bench_sd fed
            kw["added_cond_kwargs"] = {"text_embeds": saved["unet.text_embeds"].to(a.device, self.dtype),
                                       "time_ids": saved["unet.time_ids"].to(a.device, self.dtype)}
        with torch.no_grad():
            return self.timed(lambda: self.pipe.unet(x, t, encoder_hidden_states=ctx, **kw).sample, "unet")

    def vae(self, z):
        torch, a = self.torch, self.a
        vae = self.pipe.vae.to(self.vae_dtype)
        z = z.to(a.device, self.vae_dtype)
        with torch.no_grad():
            r = self.timed(lambda: vae.decode(z).sample, "vae")
        vae.to(self.dtype)
        return r

    def peak(self):
        if self.a.device == "cuda":
            return self.torch.cuda.max_memory_allocated(), "cuda allocated"
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "process max rss"


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main():
    a = parse()
    parts = set(a.parts.split(","))
    if a.trace:
        os.makedirs(a.trace, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    with tempfile.TemporaryDirectory() as tmp:
        io_file = os.path.join(tmp, "diffpipe.safetensors")
        ours = run_diffpipe(a, io_file)
        import torch
        from safetensors.torch import load_file
        torch.set_num_threads(a.threads)
        saved = {k: v.clone() for k, v in load_file(io_file).items()}
    ref = Diffusers(a, torch)
    theirs, checks, failed = {}, {}, []
    tol = TOL[a.dtype]
    if "unet" in parts:
        theirs["unet_s"], out = ref.unet(saved)
        checks["unet rel err"] = rel_err(saved["unet.out"], out)
        if checks["unet rel err"] > tol:
            failed.append(f"UNet output differs from diffusers: {checks['unet rel err']:.2e} > {tol}")
    if "vae" in parts:
        theirs["vae_s"], out = ref.vae(saved["vae.latents"])
        checks["vae rel err"] = rel_err(saved["vae.out"], out)
        if checks["vae rel err"] > tol:
            failed.append(f"VAE output differs from diffusers: {checks['vae rel err']:.2e} > {tol}")
    if "e2e" in parts:
        theirs["e2e_s"], img = ref.e2e(saved["noise"])
        d = (saved["images"].int() - img.int()).abs()
        within = float((d <= 1).double().mean())
        mse = float((d.double() ** 2).mean())
        psnr = 10 * math.log10(255.0 ** 2 / mse) if mse > 0 else float("inf")
        checks["images max |diff|"] = int(d.max())
        checks["images within +-1"] = within
        checks["images PSNR dB"] = psnr
        # float32: the golden README's image tolerance. 16-bit: rounding moves whole trajectories a little (the
        # golden tests see up to 6 levels on 8-bit values), so the same picture is asked for: PSNR >= 30 dB.
        if a.dtype == "float32" and within < 0.99:
            failed.append(f"images differ from diffusers: {within:.4f} of 8-bit values within +-1 (< 0.99)")
        if a.dtype != "float32" and psnr < 30:
            failed.append(f"images differ from diffusers: PSNR {psnr:.1f} dB (< 30)")
    if "loop" in parts:
        theirs["loop_s"] = ref.loop()
    theirs["peak_bytes"], kind = ref.peak()
    compiled = {}
    if a.compile:
        if ref.sd3 or ref.flux:
            ref.pipe.transformer = torch.compile(ref.pipe.transformer)
        else:
            ref.pipe.unet = torch.compile(ref.pipe.unet)
        ref.pipe.vae.decoder = torch.compile(ref.pipe.vae.decoder)
        ref.tag = "diffusers_compiled"
        if "e2e" in parts:
            compiled["e2e_s"], _ = ref.e2e(saved["noise"])
        if "loop" in parts:
            compiled["loop_s"] = ref.loop()
        if "unet" in parts:
            compiled["unet_s"], _ = ref.unet(saved)
        if "vae" in parts:
            compiled["vae_s"], _ = ref.vae(saved["vae.latents"])

    print()
    print(f"model {a.model}: {a.images} image(s) {a.size}x{a.size}, {a.steps} {sampler_of(a.model)} steps, "
          f"guidance {a.guidance}, "
          f"{a.device} {a.dtype}, {a.threads} threads; min over {a.rounds} rounds")
    for k, v in checks.items():
        print(f"check: {k} = {v:.3g}" if isinstance(v, float) else f"check: {k} = {v}")
    if failed:
        for f in failed:
            print("FAILED: " + f)
        sys.exit(1)
    rows = []
    head = f"{'part':<6} {'diffpipe s':>11} {'diffusers s':>12} {'ratio':>7}"
    if a.compile:
        head += f" {'+compile s':>11} {'ratio':>7}"
    print(head)
    for part in ["e2e", "loop", "unet", "vae"]:
        k = part + "_s"
        if k not in ours or k not in theirs:
            continue
        o, t = min(ours[k]), min(theirs[k])
        line = f"{part:<6} {o:>11.3f} {t:>12.3f} {t / o:>6.2f}x"
        row = {"part": part, "diffpipe_s": o, "diffusers_s": t, "ratio": t / o}
        if a.compile and k in compiled:
            c = min(compiled[k])
            line += f" {c:>11.3f} {c / o:>6.2f}x"
            row.update(compiled_s=c, ratio_compiled=c / o)
        print(line)
        rows.append(row)
    if "loop_s" in ours and "loop_s" in theirs:
        print(f"denoising steps/s (batch {a.images}, guidance): diffpipe {a.steps / min(ours['loop_s']):.2f}, "
              f"diffusers {a.steps / min(theirs['loop_s']):.2f}")
    if "e2e_s" in ours:
        print(f"images/s: diffpipe {a.images / min(ours['e2e_s']):.3f}, diffusers {a.images / min(theirs['e2e_s']):.3f}")
        # the breakdown comes from one more round with the profile sections on (on a GPU they synchronise the
        # stream at every boundary, so that round is slower than the timed ones)
        prof = ours["e2e_profile_s"]
        wall = ours.get("e2e_profiled_s", min(ours["e2e_s"]))
        busy = sum(prof.values())
        parts_txt = ", ".join(f"{k} {v:.3f} s ({100 * v / wall:.1f}%)" for k, v in prof.items() if v > 0)
        print(f"diffpipe e2e breakdown (a profiled round, wall {wall:.3f} s): {parts_txt}; "
              f"outside these {max(0.0, wall - busy):.3f} s")
    if "e2e_threads_s" in ours and "e2e_s" in ours:  # --parts e2e,e2e_threads: the compute lane's effect
        th = min(ours["e2e_threads_s"])
        print(f"diffpipe e2e with each stage computing on its own thread: {th:.3f} s; "
              f"the one-thread compute lane is {th / min(ours['e2e_s']):.2f}x faster")
    print(f"peak memory ({kind}): diffpipe {ours['peak_bytes'] / 2**30:.2f} GiB, diffusers {theirs['peak_bytes'] / 2**30:.2f} GiB")
    if a.trace:
        for part in ("unet", "vae"):
            files = [f"{n}={os.path.join(a.trace, f'{n}.{part}.json')}" for n in ("diffpipe", "diffusers", "diffusers_compiled")]
            files = [f for f in files if os.path.exists(f.split("=", 1)[1])]
            if files:
                print(f"\n--- GPU time of one {part} call, by kernel kind (traces in {a.trace})", flush=True)
                subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "kernel_breakdown.py"), *files,
                                "--json", os.path.join(a.trace, f"breakdown.{part}.json")])
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "diffpipe": ours, "diffusers": theirs, "compiled": compiled, "checks": checks,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
