#!/usr/bin/env python3
"""Makes multistep-sampler references with diffusers for the GoldenSamplers tests: UniPCMultistepScheduler step by
step on recorded trajectories (bh2 and bh1, orders 1 to 3, epsilon and v prediction, spacings, Karras sigmas,
final_sigmas_type sigma_min, disable_corrector, a run begun part-way as image-to-image begins) and
DPMSolverMultistepScheduler with final_sigmas_type sigma_min and as DPM++ 2M SDE (sde-dpmsolver++: midpoint and heun,
Karras sigmas, v prediction, a run begun part-way; each step's noise recorded as C.k.noise); and StableDiffusionPipeline
with UniPC, Heun, KDPM2, LMS, with DPM++ 2M SDE Karras (its per-step draws recorded as pipeline_sde.draws.K) and with DDIM at
guidance_rescale 0.7 (pipeline_rescale) on tiny-sd:

    python3 tests/stages/make_sampler_golden.py --out DIR [--src ../shared/golden/tiny-sd]
    DIFFPIPE_GOLDEN_SAMPLERS=DIR ./build/tests/test_stages --gtest_filter='GoldenSamplers.*'

For each case C of golden.json: DIR/C/scheduler_config.json (the scheduler's full config) and, in
DIR/golden.safetensors, C.timesteps (i64), C.sigmas and per step k (from the case's begin): C.k.model_output,
C.k.sample and C.k.prev_sample. The pipeline run: pipeline.latents (the initial latents) and pipeline.images
[B, 3, 32, 32] in [0, 1]; DIR/model links to the source model.
"""
import json
import os

import torch

from golden_draws import out_linked_to, tiny_sd_args

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1)
CASES = [
    dict(name="unipc_default", cls="UniPCMultistepScheduler", steps=10, config=dict(SD)),
    dict(name="unipc_bh1_order3_v_trailing", cls="UniPCMultistepScheduler", steps=8,
         config=dict(SD, solver_type="bh1", solver_order=3, prediction_type="v_prediction",
                     timestep_spacing="trailing")),
    dict(name="unipc_karras_sigma_min", cls="UniPCMultistepScheduler", steps=7,
         config=dict(SD, use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False)),
    dict(name="unipc_no_corrector_leading", cls="UniPCMultistepScheduler", steps=6,
         config=dict(SD, disable_corrector=[0, 2], timestep_spacing="leading", solver_order=3)),
    dict(name="unipc_order1_sample", cls="UniPCMultistepScheduler", steps=5,
         config=dict(SD, solver_order=1, prediction_type="sample", beta_schedule="linear")),
    dict(name="unipc_begin3", cls="UniPCMultistepScheduler", steps=8, begin=3, config=dict(SD)),
    dict(name="dpm_sigma_min", cls="DPMSolverMultistepScheduler", steps=6,
         config=dict(SD, final_sigmas_type="sigma_min", lower_order_final=False)),
    # DPM++ 2M SDE (algorithm_type sde-dpmsolver++): every step's noise recorded as C.k.noise
    dict(name="dpm_sde", cls="DPMSolverMultistepScheduler", steps=8, config=dict(SD, algorithm_type="sde-dpmsolver++")),
    dict(name="dpm_sde_karras_heun_v", cls="DPMSolverMultistepScheduler", steps=7,
         config=dict(SD, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, solver_type="heun",
                     prediction_type="v_prediction", lower_order_final=False)),
    dict(name="dpm_sde_begin2", cls="DPMSolverMultistepScheduler", steps=6, begin=2,
         config=dict(SD, algorithm_type="sde-dpmsolver++", timestep_spacing="trailing")),
    # DPM-Solver++ of order 3 (dpmsolver++ and DPM++ 3M SDE with Karras sigmas)
    dict(name="dpm_order3", cls="DPMSolverMultistepScheduler", steps=9, config=dict(SD, solver_order=3)),
    dict(name="dpm_3m_sde_karras", cls="DPMSolverMultistepScheduler", steps=16,
         config=dict(SD, solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),
    # Heun (HeunDiscreteScheduler): 2 x steps - 1 calls, each correction after its Euler step
    dict(name="heun", cls="HeunDiscreteScheduler", steps=6, config=dict(SD)),
    dict(name="heun_karras_v_leading", cls="HeunDiscreteScheduler", steps=5,
         config=dict(SD, use_karras_sigmas=True, prediction_type="v_prediction", timestep_spacing="leading")),
    dict(name="heun_begin4", cls="HeunDiscreteScheduler", steps=5, begin=4, config=dict(SD, timestep_spacing="trailing")),
    # KDPM2 (KDPM2DiscreteScheduler, DPM-Solver-2): 2 x steps - 1 calls through the interpolated sigmas
    dict(name="kdpm2", cls="KDPM2DiscreteScheduler", steps=6, config=dict(SD)),
    dict(name="kdpm2_karras_v_leading", cls="KDPM2DiscreteScheduler", steps=5,
         config=dict(SD, use_karras_sigmas=True, prediction_type="v_prediction", timestep_spacing="leading")),
    dict(name="kdpm2_begin4", cls="KDPM2DiscreteScheduler", steps=5, begin=4, config=dict(SD)),
    # LMS (LMSDiscreteScheduler, order 4: coefficients by scipy's quad)
    dict(name="lms", cls="LMSDiscreteScheduler", steps=8, config=dict(SD)),
    dict(name="lms_karras_v_leading", cls="LMSDiscreteScheduler", steps=6,
         config=dict(SD, use_karras_sigmas=True, prediction_type="v_prediction", timestep_spacing="leading")),
    dict(name="lms_begin3", cls="LMSDiscreteScheduler", steps=7, begin=3, config=dict(SD)),
]
PROMPTS = ["a red circle above a blue square", "two small green triangles"]


def main():
    a = tiny_sd_args()
    import diffusers
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler
    from safetensors.torch import save_file

    src = out_linked_to(a.out, a.src)
    out = {}
    g = torch.Generator().manual_seed(0)
    for case in CASES:
        n = case["name"]
        sched = getattr(diffusers, case["cls"])(**case["config"])
        sched.save_config(os.path.join(a.out, n))
        sched.set_timesteps(case["steps"])
        begin = case.get("begin", 0)
        if begin:
            sched.set_begin_index(begin)
        out[f"{n}.timesteps"] = sched.timesteps.clone()
        out[f"{n}.sigmas"] = sched.sigmas.clone().float()
        x = torch.randn(2, 3, 8, 8, generator=g) * 2.0
        sde = case["config"].get("algorithm_type") == "sde-dpmsolver++"
        for k, t in enumerate(sched.timesteps[begin:]):
            mo = torch.randn(2, 3, 8, 8, generator=g) * 0.8 + 0.3 * x
            kw = {}
            if sde:
                kw["variance_noise"] = out[f"{n}.{k}.noise"] = torch.randn(2, 3, 8, 8, generator=g)
            prev = sched.step(mo, t, x, return_dict=False, **kw)[0]
            out[f"{n}.{k}.model_output"] = mo
            out[f"{n}.{k}.sample"] = x
            out[f"{n}.{k}.prev_sample"] = prev
            x = prev

    pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    unipc_config = dict(pipe.scheduler.config)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        img = pipe(PROMPTS, num_inference_steps=8, guidance_scale=7.5, latents=latents, output_type="pt").images
    out["pipeline.latents"] = latents
    out["pipeline.images"] = img
    # DPM++ 2M SDE Karras and 3M SDE Karras through the pipeline: each step's noise drawn from the pipeline's generator
    # (recorded)
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.schedulers import scheduling_dpmsolver_multistep
    from golden_draws import recorded_draws
    for name, steps, order, seed in (("pipeline_sde", 6, None, 9), ("pipeline_3m", 7, 3, 10)):
        kw = {} if order is None else {"solver_order": order}
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                                 algorithm_type="sde-dpmsolver++",
                                                                 use_karras_sigmas=True, **kw)
        with torch.no_grad(), recorded_draws(scheduling_dpmsolver_multistep) as draws:
            out[f"{name}.images"] = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=7.5, latents=latents,
                                         output_type="pt", generator=torch.Generator().manual_seed(seed)).images
        assert len(draws) == steps, (name, len(draws))
        for k, d in enumerate(draws):
            out[f"{name}.draws.{k}"] = d
    # Heun and KDPM2 (9 UNet calls for 5 steps), LMS, and guidance_rescale (rescale_noise_cfg) with the folder's DDIM,
    # each scheduler from the folder's config; no draws beyond the latents
    for name, cls, steps, kw in (("pipeline_heun", "HeunDiscreteScheduler", 5, {}),
                                 ("pipeline_kdpm2", "KDPM2DiscreteScheduler", 5, {}),
                                 ("pipeline_lms", "LMSDiscreteScheduler", 6, {}),
                                 ("pipeline_rescale", "DDIMScheduler", 5, {"guidance_rescale": 0.7})):
        pipe.scheduler = getattr(diffusers, cls).from_pretrained(src, subfolder="scheduler")
        with torch.no_grad():
            out[f"{name}.images"] = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=7.5, latents=latents,
                                         output_type="pt", **kw).images
    save_file({k: v.clone().contiguous() for k, v in out.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = {"cases": [{"name": c["name"], "class": c["cls"], "steps": c["steps"], "begin": c.get("begin", 0)}
                      for c in CASES],
            "pipeline": {"prompts": PROMPTS, "steps": 8, "guidance": 7.5, "sampler": "unipc",
                         "scheduler": unipc_config},
            "pipeline_3m": {"prompts": PROMPTS, "steps": 7, "guidance": 7.5, "sampler": "dpmpp_3m_sde_karras"},
            "pipeline_kdpm2": {"prompts": PROMPTS, "steps": 5, "guidance": 7.5, "sampler": "kdpm2"},
            "pipeline_lms": {"prompts": PROMPTS, "steps": 6, "guidance": 7.5, "sampler": "lms"},
            "pipeline_heun": {"prompts": PROMPTS, "steps": 5, "guidance": 7.5, "sampler": "heun"},
            "pipeline_rescale": {"prompts": PROMPTS, "steps": 5, "guidance": 7.5, "guidance_rescale": 0.7,
                                 "sampler": "ddim"},
            "pipeline_sde": {"prompts": PROMPTS, "steps": 6, "guidance": 7.5, "sampler": "dpmpp_2m_sde_karras"},
            "source": f"diffusers {diffusers.__version__}, torch {torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    print(json.dumps(meta["cases"], indent=1))


if __name__ == "__main__":
    main()
