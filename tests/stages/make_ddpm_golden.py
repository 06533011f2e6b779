#!/usr/bin/env python3
"""Makes DDPMScheduler reference trajectories with diffusers for the GoldenDdpm tests (DeepFloyd IF's sampler:
learned_range variance from the model's extra channels, Imagen's dynamic thresholding; and other variance types):

    python3 tests/stages/make_ddpm_golden.py --out DIR
    DIFFPIPE_GOLDEN_DDPM=DIR ./build/tests/test_stages --gtest_filter='GoldenDdpm.*'

For each case C in golden.json: DIR/C/scheduler_config.json (the scheduler's full config) and, in
DIR/golden.safetensors, C.timesteps (i64) and per step k: C.k.model_output (2x channels for learned variances),
C.k.sample, C.k.noise (the variance noise diffusers drew; absent at t = 0), C.k.prev_sample, C.k.x0.
"""
import argparse
import json
import os
import shutil

import torch

from golden_draws import recorded_draws

CASES = [
    dict(name="if_learned_range", steps=10, config=dict(
        beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
        dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=True, prediction_type="epsilon")),
    dict(name="learned_sample", steps=6, config=dict(
        beta_schedule="linear", variance_type="learned", prediction_type="sample", clip_sample=True,
        clip_sample_range=2.0)),
    dict(name="fixed_large_v_trailing", steps=5, config=dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, variance_type="fixed_large",
        prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing")),
    dict(name="threshold_fixed_small", steps=7, config=dict(
        beta_schedule="linear", variance_type="fixed_small", thresholding=True, dynamic_thresholding_ratio=0.9,
        sample_max_value=3.0, prediction_type="epsilon")),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import diffusers
    from diffusers import DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm
    from safetensors.torch import save_file

    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.makedirs(a.out)
    out = {}
    g = torch.Generator().manual_seed(0)
    for case in CASES:
        n = case["name"]
        sched = DDPMScheduler(num_train_timesteps=1000, **case["config"])
        sched.save_config(os.path.join(a.out, n))
        sched.set_timesteps(case["steps"])
        out[f"{n}.timesteps"] = sched.timesteps.clone()
        learned = case["config"]["variance_type"].startswith("learned")
        x = torch.randn(2, 3, 8, 8, generator=g) * 1.5
        for k, t in enumerate(sched.timesteps):
            eps = torch.randn(2, 3, 8, 8, generator=g) * 1.3
            if learned:
                v = torch.randn(2, 3, 8, 8, generator=g)
                v = torch.tanh(v) if case["config"]["variance_type"] == "learned_range" else v.abs() * 0.01
                mo = torch.cat([eps, v], 1)
            else:
                mo = eps
            with recorded_draws(scheduling_ddpm) as draws:
                r = sched.step(mo, t, x, generator=g, return_dict=False)
            out[f"{n}.{k}.model_output"] = mo
            out[f"{n}.{k}.sample"] = x
            if draws:
                out[f"{n}.{k}.noise"] = draws[0]
            out[f"{n}.{k}.prev_sample"] = r[0]
            out[f"{n}.{k}.x0"] = r[1]
            x = r[0]
    save_file({k: v.clone().contiguous() for k, v in out.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = {"cases": [{"name": c["name"], "steps": c["steps"]} for c in CASES],
            "source": f"diffusers {diffusers.__version__} DDPMScheduler, torch {torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
