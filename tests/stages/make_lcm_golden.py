#!/usr/bin/env python3
"""Makes Latent Consistency Model references with diffusers for the GoldenLcm tests: LCMScheduler on tiny-sd (as an
LCM-LoRA runs: StableDiffusionPipeline / StableDiffusionImg2ImgPipeline with `LCMScheduler.from_config`), and an
LCM-distilled UNet (time_cond_proj_dim: the guidance scale embedded into the time embedding, no classifier-free
guidance) through LatentConsistencyModelPipeline:

    python3 tests/stages/make_lcm_golden.py --out DIR [--src ../shared/golden/tiny-sd] [--sdxl SDXL_MODEL]
    DIFFPIPE_GOLDEN_LCM=DIR ./build/tests/test_stages --gtest_filter='GoldenLcm.*'

DIR/model links to the source folder's model. DIR/lcm-model is tiny-sd with a UNet of time_cond_proj_dim 16 (a random
`time_embedding.cond_proj`), an LCMScheduler config and model_index LatentConsistencyModelPipeline. With --sdxl, also
DIR/lcm-sdxl-model: that SDXL folder's components with a time_cond_proj_dim UNet and an LCMScheduler (as
latent-consistency/lcm-sdxl is used: StableDiffusionXLPipeline).
DIR/input_K.png: image-to-image inputs (32x32).
DIR/golden.safetensors, for each run R of golden.json (model, pipeline, steps, guidance, negative prompt, strength):
R.draws.K, every random draw in order (text-to-image: the initial latents [B, 4, 8, 8], then the scheduler's noise at
each step but the last; image-to-image: the posterior's sample, the noise, then the steps'; the distilled folder's
image-to-image runs LatentConsistencyModelImg2ImgPipeline: every step, over the strength's share of the schedule),
R.timesteps (i64) and
R.images [B, 3, 32, 32] in [0, 1]; R.w_embedding for the distilled UNet's runs.
"""
import json
import os
import shutil

import numpy as np
import torch

from golden_draws import out_linked_to, recorded_draws, tiny_sd_args

PROMPTS = ["a red circle above a blue square", "two small green triangles"]
COND_DIM = 16
RUNS = [
    # LCM-LoRA style: an ordinary UNet with the LCM sampler; guidance 1 (no CFG) and guidance with a negative prompt
    dict(name="sd_g1", model="model", pipeline="sd", steps=4, guidance=1.0, negative_prompt=None),
    dict(name="sd_g2", model="model", pipeline="sd", steps=6, guidance=2.0, negative_prompt="blurry, dark"),
    dict(name="sd_img2img", model="model", pipeline="img2img", steps=5, guidance=1.5, negative_prompt=None,
         strength=0.6),
    # a distilled LCM UNet: guidance embedded, one UNet row per request
    dict(name="distilled", model="lcm-model", pipeline="lcm", steps=4, guidance=8.5, negative_prompt=None),
    dict(name="distilled_sd", model="lcm-model", pipeline="sd", steps=3, guidance=3.0, negative_prompt="blurry"),
    # LatentConsistencyModelImg2ImgPipeline: every step runs, over the strength's share of the schedule
    dict(name="distilled_img2img", model="lcm-model", pipeline="lcm_img2img", steps=4, guidance=6.0,
         negative_prompt=None, strength=0.5),
]


def nudge(module, scale, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module.eval()


def lcm_unet(unet, seed):
    """A copy of `unet` with time_cond_proj_dim COND_DIM: the same weights plus a random cond_proj."""
    from diffusers import UNet2DConditionModel
    u = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": COND_DIM}).eval()
    missing, unexpected = u.load_state_dict(unet.state_dict(), strict=False)
    assert list(missing) == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    torch.manual_seed(seed)
    with torch.no_grad():
        u.time_embedding.cond_proj.weight.normal_(0, 0.3)
    return u


def link_components(src, dst, names):
    for n in names:
        if os.path.exists(os.path.join(src, n)):
            os.symlink(os.path.join(src, n), os.path.join(dst, n))


def main():
    a = tiny_sd_args("an SDXL model folder for the lcm_sdxl run")
    import diffusers
    from diffusers import (LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline, LCMScheduler,
                           StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline)
    from diffusers.models.autoencoders import vae as vae_module
    from diffusers.pipelines.latent_consistency_models import pipeline_latent_consistency_img2img as lcm_i2i_module
    from diffusers.pipelines.latent_consistency_models import pipeline_latent_consistency_text2img as lcm_module
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion, pipeline_stable_diffusion_img2img
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl
    from diffusers.schedulers import scheduling_lcm
    from PIL import Image
    from safetensors.torch import save_file

    src = out_linked_to(a.out, a.src)
    sd = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    sched = LCMScheduler.from_config(sd.scheduler.config)

    # the distilled folder: tiny-sd's components, an LCM UNet and scheduler
    lcm_dir = os.path.join(a.out, "lcm-model")
    os.makedirs(lcm_dir)
    link_components(src, lcm_dir, ["tokenizer", "text_encoder", "vae"])
    unet = lcm_unet(sd.unet, a.seed + 1)
    unet.save_pretrained(os.path.join(lcm_dir, "unet"))
    sched.save_config(os.path.join(lcm_dir, "scheduler"))
    index = json.load(open(os.path.join(src, "model_index.json")))
    index.update(_class_name="LatentConsistencyModelPipeline", scheduler=["diffusers", "LCMScheduler"])
    index.pop("safety_checker", None)
    index.pop("feature_extractor", None)
    index["requires_safety_checker"] = False
    json.dump(index, open(os.path.join(lcm_dir, "model_index.json"), "w"), indent=1)

    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 31.0
    rng = np.random.default_rng(a.seed)
    images = []
    for k in range(len(PROMPTS)):
        rgb = np.stack([xx, yy, (xx + yy) / 2 if k == 0 else 1 - xx], -1) * 200 + 30
        rgb = (rgb + rng.normal(0, 12, rgb.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(os.path.join(a.out, f"input_{k}.png"))
        images.append(Image.fromarray(rgb, "RGB"))

    parts = dict(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, scheduler=sched)
    pipes = {
        ("model", "sd"): (StableDiffusionPipeline(unet=sd.unet, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False, **parts), pipeline_stable_diffusion),
        ("model", "img2img"): (StableDiffusionImg2ImgPipeline(unet=sd.unet, safety_checker=None, feature_extractor=None,
                                                              requires_safety_checker=False, **parts),
                               pipeline_stable_diffusion_img2img),
        ("lcm-model", "lcm"): (LatentConsistencyModelPipeline(unet=unet, safety_checker=None, feature_extractor=None,
                                                              requires_safety_checker=False, **parts), lcm_module),
        ("lcm-model", "lcm_img2img"): (
            LatentConsistencyModelImg2ImgPipeline(unet=unet, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False, **parts), lcm_i2i_module),
        ("lcm-model", "sd"): (StableDiffusionPipeline(unet=unet, safety_checker=None, feature_extractor=None,
                                                      requires_safety_checker=False, **parts),
                              pipeline_stable_diffusion),
    }
    runs = list(RUNS)
    if a.sdxl:
        xl = StableDiffusionXLPipeline.from_pretrained(a.sdxl)
        xl_dir = os.path.join(a.out, "lcm-sdxl-model")
        os.makedirs(xl_dir)
        link_components(os.path.abspath(a.sdxl), xl_dir, ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2",
                                                          "vae"])
        xl_unet = lcm_unet(xl.unet, a.seed + 2)
        xl_unet.save_pretrained(os.path.join(xl_dir, "unet"))
        xl_sched = LCMScheduler.from_config(xl.scheduler.config)
        xl_sched.save_config(os.path.join(xl_dir, "scheduler"))
        index = json.load(open(os.path.join(a.sdxl, "model_index.json")))
        index["scheduler"] = ["diffusers", "LCMScheduler"]
        json.dump(index, open(os.path.join(xl_dir, "model_index.json"), "w"), indent=1)
        pipes[("lcm-sdxl-model", "sdxl")] = (
            StableDiffusionXLPipeline(vae=xl.vae, text_encoder=xl.text_encoder, text_encoder_2=xl.text_encoder_2,
                                      tokenizer=xl.tokenizer, tokenizer_2=xl.tokenizer_2, unet=xl_unet,
                                      scheduler=xl_sched), pipeline_stable_diffusion_xl)
        runs.append(dict(name="sdxl", model="lcm-sdxl-model", pipeline="sdxl", steps=4, guidance=5.0,
                         negative_prompt=None))

    res = {}
    for r in runs:
        pipe, module = pipes[(r["model"], r["pipeline"])]
        pipe.set_progress_bar_config(disable=True)
        n = r["name"]
        kw = dict(num_inference_steps=r["steps"], guidance_scale=r["guidance"], output_type="pt",
                  generator=torch.Generator().manual_seed(a.seed + 11))
        if r["negative_prompt"] is not None:
            kw["negative_prompt"] = [r["negative_prompt"]] * len(PROMPTS)
        if r["pipeline"] in ("img2img", "lcm_img2img"):
            kw.update(image=images, strength=r["strength"])
        if r["pipeline"] == "sdxl":
            kw.update(height=32, width=32)
        captured = {}
        real_unet = pipe.unet.forward

        def unet_forward(*args, real=real_unet, captured=captured, **kwargs):
            if kwargs.get("timestep_cond") is not None:
                captured.setdefault("w", kwargs["timestep_cond"].clone())
            return real(*args, **kwargs)
        pipe.unet.forward = unet_forward
        with torch.no_grad(), recorded_draws(vae_module, module, scheduling_lcm) as draws:
            img = pipe(PROMPTS, **kw).images
        pipe.unet.forward = real_unet
        for k, d in enumerate(draws):
            res[f"{n}.draws.{k}"] = d
        res[f"{n}.timesteps"] = pipe.scheduler.timesteps.clone()
        res[f"{n}.images"] = img
        if "w" in captured:
            res[f"{n}.w_embedding"] = captured["w"]
        r["draws"] = len(draws)
    save_file({k: v.clone().contiguous() for k, v in res.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = {"prompts": PROMPTS, "runs": runs, "time_cond_proj_dim": COND_DIM,
            "source": f"diffusers {diffusers.__version__}, torch {torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
