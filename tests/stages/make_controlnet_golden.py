#!/usr/bin/env python3
"""Makes a ControlNet reference with diffusers' StableDiffusionControlNetPipeline on the tiny-sd folder, for the
GoldenControlNet tests:

    python3 tests/stages/make_controlnet_golden.py --out DIR [--src ../shared/golden/tiny-sd] [--seed 0]
    DIFFPIPE_GOLDEN_CONTROLNET=DIR ./build/tests/test_stages --gtest_filter='GoldenControlNet.*'

DIR/model links to the source folder. DIR/controlnet: a ControlNetModel made from its UNet (ControlNetModel.from_unet,
a conditioning embedding of 8, 16, 32 channels: two stride-2 convolutions for the VAE's factor 4) with every weight,
the zero convolutions included, perturbed at random. DIR/control_K.png: 32x32 conditioning images (a bright outline
on black, as edge maps are). DIR/golden.safetensors: `latents` [B, 4, 8, 8] (the initial latents given to every run)
and, for each run R of golden.json (conditioning scale, guidance, negative prompt, the steps' share it acts in:
control_guidance_start/end), R.images [B, 3, 32, 32] in [0, 1]
(DDIM, 4 steps); `plain.images` from the UNet alone. The "img2img" run: StableDiffusionControlNetImg2ImgPipeline from
DIR/start_K.png at strength 0.75, the ControlNet in the first two thirds of its steps, its draws as img2img.draws.K.
The "guess" run: guess_mode=True; "pooled": DIR/controlnet-pooled (global_pool_conditions, so guess mode) at 1.5.
The "inpaint" runs: StableDiffusionControlNetInpaintPipeline from the starting images with DIR/mask.png, on tiny-sd and
on DIR/inpaint-model (a random 9-channel UNet), draws recorded with their roles (image, noise, masked).
The "multi" run: DIR/controlnet and DIR/controlnet2 (another random ControlNet) together (MultiControlNetModel), the
second with DIR/control2_K.png (the first images mirrored), scales 1 and 0.6, the second in the middle half of the steps.
With --sdxl MODEL (an SDXL folder, e.g. tiny-sdxl's): DIR/sdxl-controlnet made from its UNet the same way, runs
through StableDiffusionXLControlNetPipeline from the same latents (its Euler, 5 steps; golden.json's sdxl.runs) and one
through StableDiffusionXLControlNetImg2ImgPipeline at strength 0.6 (sdxl_img2img.draws.K).
"""
import json
import os

import numpy as np
import torch

from golden_draws import out_linked_to, recorded_draws, tiny_sd_args

PROMPTS = ["a red circle above a blue square", "two small green triangles"]


def random_controlnet(unet, seed):
    """A ControlNetModel made from `unet` (a conditioning embedding of 8, 16, 32 channels) with every weight, the zero
    convolutions included, perturbed by N(0, 0.05) drawn after torch.manual_seed(seed)."""
    from diffusers import ControlNetModel
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32)).eval()
    with torch.no_grad():
        for prm in cn.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)
    return cn


def controlnet_pipe(base, controlnet):
    """StableDiffusionControlNetPipeline on `base`'s components with `controlnet` (one, or a list: several)."""
    from diffusers import StableDiffusionControlNetPipeline
    p = StableDiffusionControlNetPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=base.unet, controlnet=controlnet, scheduler=base.scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def main():
    a = tiny_sd_args("an SDXL model folder (e.g. tiny-sdxl's) for the sdxl runs")
    import diffusers
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from safetensors.torch import save_file

    src = out_linked_to(a.out, a.src)
    base = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    cn = random_controlnet(base.unet, a.seed + 600)
    cn.save_pretrained(os.path.join(a.out, "controlnet"))
    pipe = controlnet_pipe(base, cn)

    controls = []
    for k in range(len(PROMPTS)):
        img = np.zeros((32, 32, 3), np.uint8)
        if k == 0:
            img[6:26, 6] = img[6:26, 25] = img[6, 6:26] = img[25, 6:26] = 255  # a square's outline
        else:
            yy, xx = np.mgrid[0:32, 0:32]
            ring = np.abs(np.hypot(yy - 16, xx - 16) - 10) < 1.2
            img[ring] = (255, 200, 120)  # a coloured ring: the channels differ
        Image.fromarray(img, "RGB").save(os.path.join(a.out, f"control_{k}.png"))
        controls.append(Image.fromarray(img, "RGB"))
    g = torch.Generator().manual_seed(a.seed + 21)
    latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=g)
    res = {"latents": latents}
    with torch.no_grad():
        res["plain.images"] = base(PROMPTS, num_inference_steps=4, guidance_scale=7.5, latents=latents.clone(),
                                   output_type="pt").images
    runs = [dict(name="scale_1", scale=1.0, guidance=7.5, negative_prompt=None),
            dict(name="scale_05_negative", scale=0.5, guidance=5.0, negative_prompt="blurry"),
            dict(name="no_guidance", scale=1.5, guidance=1.0, negative_prompt=None),
            dict(name="middle_steps", scale=1.0, guidance=7.5, negative_prompt=None, start=0.25, end=0.75)]
    for r in runs:
        neg = None if r["negative_prompt"] is None else [r["negative_prompt"]] * len(PROMPTS)
        with torch.no_grad():
            res[f"{r['name']}.images"] = pipe(PROMPTS, image=controls, num_inference_steps=4,
                                              guidance_scale=r["guidance"], negative_prompt=neg,
                                              controlnet_conditioning_scale=r["scale"], latents=latents.clone(),
                                              control_guidance_start=r.get("start", 0.0),
                                              control_guidance_end=r.get("end", 1.0),
                                              output_type="pt").images
    # guess mode (the ControlNet on the conditional row alone, its residuals ramped 0.1 ... 1), and a pooling ControlNet
    # (global_pool_conditions: the pipeline runs it in guess mode, residuals averaged over their pixels)
    guess = dict(name="guess", scale=1.0, guidance=7.5, negative_prompt=None)
    with torch.no_grad():
        res["guess.images"] = pipe(PROMPTS, image=controls, num_inference_steps=4, guidance_scale=7.5,
                                   guess_mode=True, latents=latents.clone(), output_type="pt").images
    pooled_cn = random_controlnet(base.unet, a.seed + 604)
    pooled_cn.register_to_config(global_pool_conditions=True)
    pooled_cn.save_pretrained(os.path.join(a.out, "controlnet-pooled"))
    pooled = controlnet_pipe(base, pooled_cn)
    with torch.no_grad():
        res["pooled.images"] = pooled(PROMPTS, image=controls, num_inference_steps=4, guidance_scale=7.5,
                                      controlnet_conditioning_scale=1.5, latents=latents.clone(),
                                      output_type="pt").images
    # two ControlNets at once (MultiControlNetModel): a second one from the UNet with other weights, its own images
    # (the first ones mirrored), scale and share of the steps
    cn2 = random_controlnet(base.unet, a.seed + 602)
    cn2.save_pretrained(os.path.join(a.out, "controlnet2"))
    controls2 = []
    for k, im in enumerate(controls):
        m = im.transpose(Image.FLIP_LEFT_RIGHT)
        m.save(os.path.join(a.out, f"control2_{k}.png"))
        controls2.append(m)
    multi = controlnet_pipe(base, [cn, cn2])
    multi_run = dict(name="multi", guidance=7.5, negative_prompt=None, scales=[1.0, 0.6], starts=[0.0, 0.25],
                     ends=[1.0, 0.75])
    with torch.no_grad():
        res["multi.images"] = multi(PROMPTS, image=[controls, controls2], num_inference_steps=4, guidance_scale=7.5,
                                    controlnet_conditioning_scale=multi_run["scales"],
                                    control_guidance_start=multi_run["starts"],
                                    control_guidance_end=multi_run["ends"], latents=latents.clone(),
                                    output_type="pt").images
    # ControlNet on image-to-image (StableDiffusionControlNetImg2ImgPipeline): starting images, strength 0.75 (3 of 4
    # steps), the ControlNet in the first two thirds; its draws (the posterior's sample, the noise) recorded
    from diffusers import StableDiffusionControlNetImg2ImgPipeline
    from diffusers.models.autoencoders import vae as vae_module
    from diffusers.pipelines.controlnet import pipeline_controlnet_img2img
    i2i = StableDiffusionControlNetImg2ImgPipeline(vae=base.vae, text_encoder=base.text_encoder,
                                                   tokenizer=base.tokenizer, unet=base.unet, controlnet=cn,
                                                   scheduler=base.scheduler, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    i2i.set_progress_bar_config(disable=True)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 31.0
    starts = []
    for k in range(len(PROMPTS)):
        rgb = (np.stack([xx, yy, 1 - xx if k else (xx + yy) / 2], -1) * 200 + 30).astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(os.path.join(a.out, f"start_{k}.png"))
        starts.append(Image.fromarray(rgb, "RGB"))
    img2img = dict(name="img2img", scale=1.0, guidance=7.5, negative_prompt=None, strength=0.75, end=0.67)
    with torch.no_grad(), recorded_draws(vae_module, pipeline_controlnet_img2img) as draws:
        res["img2img.images"] = i2i(PROMPTS, image=starts, control_image=controls, strength=0.75,
                                    num_inference_steps=4, guidance_scale=7.5, controlnet_conditioning_scale=1.0,
                                    control_guidance_end=0.67, output_type="pt",
                                    generator=torch.Generator().manual_seed(a.seed + 22)).images
    assert len(draws) == 2, len(draws)
    res["img2img.draws.0"], res["img2img.draws.1"] = draws
    # ControlNet on inpainting (StableDiffusionControlNetInpaintPipeline, strength 1): tiny-sd's 4-channel UNet (the
    # kept region blended back) and a random 9-channel inpainting UNet (DIR/inpaint-model; the ControlNet sees the
    # latents alone), the starting images' centre repainted (DIR/mask.png)
    import shutil
    from diffusers import StableDiffusionControlNetInpaintPipeline, UNet2DConditionModel
    from diffusers.pipelines.controlnet import pipeline_controlnet_inpaint
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 6:26] = 255
    Image.fromarray(m, "L").save(os.path.join(a.out, "mask.png"))
    torch.manual_seed(a.seed + 603)
    unet9 = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9}).eval()
    with torch.no_grad():
        for prm in unet9.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)
    inpaint_runs = []
    for name, unet in (("inpaint_blend", base.unet), ("inpaint_unet9", unet9)):
        ip = StableDiffusionControlNetInpaintPipeline(vae=base.vae, text_encoder=base.text_encoder,
                                                      tokenizer=base.tokenizer, unet=unet, controlnet=cn,
                                                      scheduler=base.scheduler, safety_checker=None,
                                                      feature_extractor=None, requires_safety_checker=False)
        ip.set_progress_bar_config(disable=True)
        model = "model"
        if unet is unet9:
            model = "inpaint-model"
            folder = os.path.join(a.out, model)
            StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet9,
                                    scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False).save_pretrained(folder)
            shutil.rmtree(os.path.join(folder, "tokenizer"))
            shutil.copytree(os.path.join(src, "tokenizer"), os.path.join(folder, "tokenizer"))
        r = dict(name=name, model=model, scale=0.8, guidance=7.5, negative_prompt=None,
                 draw_roles=(["image"] if unet is base.unet else []) + ["noise", "masked"])
        with torch.no_grad(), recorded_draws(vae_module, pipeline_controlnet_inpaint) as draws:
            res[f"{name}.images"] = ip(PROMPTS, image=starts, mask_image=[Image.fromarray(m, "L")] * len(PROMPTS),
                                       control_image=controls, num_inference_steps=4, guidance_scale=7.5,
                                       controlnet_conditioning_scale=0.8, output_type="pt", height=32, width=32,
                                       generator=torch.Generator().manual_seed(a.seed + 24)).images
        assert len(draws) == len(r["draw_roles"]), (name, len(draws))
        for role, d in zip(r["draw_roles"], draws):
            res[f"{name}.draws.{role}"] = d
        inpaint_runs.append(r)
    sdxl = None
    if a.sdxl:  # an SDXL ControlNet (text_time embedding: the pooled text and size ids reach it too)
        from diffusers import (StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetPipeline,
                               StableDiffusionXLPipeline)
        from diffusers.pipelines.controlnet import pipeline_controlnet_sd_xl_img2img
        xl = StableDiffusionXLPipeline.from_pretrained(a.sdxl)
        xcn = random_controlnet(xl.unet, a.seed + 601)
        xcn.save_pretrained(os.path.join(a.out, "sdxl-controlnet"))
        parts = {k: v for k, v in xl.components.items() if k not in ("image_encoder", "feature_extractor")}
        xpipe = StableDiffusionXLControlNetPipeline(**parts, controlnet=xcn)
        xpipe.set_progress_bar_config(disable=True)
        sdxl = dict(model=os.path.abspath(a.sdxl), controlnet="sdxl-controlnet", steps=5,
                    runs=[dict(name="sdxl_scale_1", scale=1.0, guidance=5.0, negative_prompt=None),
                          dict(name="sdxl_scale_07_negative", scale=0.7, guidance=4.0, negative_prompt="blurry",
                               start=0.2, end=0.8)])
        for r in sdxl["runs"]:
            neg = None if r["negative_prompt"] is None else [r["negative_prompt"]] * len(PROMPTS)
            with torch.no_grad():
                res[f"{r['name']}.images"] = xpipe(PROMPTS, image=controls, num_inference_steps=sdxl["steps"],
                                                   guidance_scale=r["guidance"], negative_prompt=neg,
                                                   controlnet_conditioning_scale=r["scale"],
                                                   control_guidance_start=r.get("start", 0.0),
                                                   control_guidance_end=r.get("end", 1.0), latents=latents.clone(),
                                                   output_type="pt").images
        xi2i = StableDiffusionXLControlNetImg2ImgPipeline(**parts, controlnet=xcn)
        xi2i.set_progress_bar_config(disable=True)
        sdxl["img2img"] = dict(name="sdxl_img2img", scale=0.8, guidance=5.0, negative_prompt=None, strength=0.6)
        with torch.no_grad(), recorded_draws(vae_module, pipeline_controlnet_sd_xl_img2img) as draws:
            res["sdxl_img2img.images"] = xi2i(PROMPTS, image=starts, control_image=controls, strength=0.6,
                                              num_inference_steps=sdxl["steps"], guidance_scale=5.0,
                                              controlnet_conditioning_scale=0.8, output_type="pt",
                                              generator=torch.Generator().manual_seed(a.seed + 23)).images
        assert len(draws) == 2, len(draws)
        res["sdxl_img2img.draws.0"], res["sdxl_img2img.draws.1"] = draws
    save_file({k: v.contiguous() for k, v in res.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = {"prompts": PROMPTS, "controls": [f"control_{k}.png" for k in range(len(PROMPTS))], "steps": 4,
            "runs": runs, "img2img": img2img, "starts": [f"start_{k}.png" for k in range(len(PROMPTS))], "sdxl": sdxl,
            "multi": multi_run, "controls2": [f"control2_{k}.png" for k in range(len(PROMPTS))],
            "inpaint": inpaint_runs, "mask": "mask.png", "guess": guess,
            "pooled": dict(name="pooled", controlnet="controlnet-pooled", scale=1.5, guidance=7.5, negative_prompt=None),
            "source": f"diffusers {diffusers.__version__} StableDiffusionControlNetPipeline on {a.src}, "
                                    f"torch {torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
