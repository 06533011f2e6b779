#!/usr/bin/env python3
"""Makes an image-to-image reference with diffusers' StableDiffusionImg2ImgPipeline on the tiny-sd folder, for the
GoldenImg2Img tests:

    python3 tests/stages/make_img2img_golden.py --out DIR [--src ../shared/golden/tiny-sd] [--seed 0]
    DIFFPIPE_GOLDEN_IMG2IMG=DIR ./build/tests/test_stages --gtest_filter='GoldenImg2Img.*'

The model is the source folder's (DIR/model links to it). DIR/input_K.png: the starting images (40x32, not square,
so that width and height cannot be swapped unnoticed). DIR/golden.safetensors: for each run R of golden.json (a
sampler, strength, steps, guidance, negative prompt), R.draws.K (every random draw in order: the VAE posterior's
sample noise [B, 4, 8, 10], then the noise added to the latents [B, 4, 8, 10]), R.image_latents (the sampled and
scaled latents of the input images) and R.images [B, 3, 32, 40] in [0, 1] (output_type "pt"). With --sdxl MODEL
(an SDXL folder, e.g. tiny-sdxl's), one more run "sdxl" through StableDiffusionXLImg2ImgPipeline on it (its
scheduler, strength 0.6, the size conditioning from the image), recorded the same way and named in golden.json, and
SDXL inpainting runs (StableDiffusionXLInpaintPipeline; golden.json's sdxl.inpaint): its 4-channel UNet at the
pipeline's default strength, and DIR/sdxl-inpaint-model (its components with a random 9-channel UNet). And the SDXL
refiner's runs (golden.json's sdxl.refiner): DIR/sdxl-refiner-model (text_encoder_2 alone, a random UNet conditioned
on original size, crop and aesthetic score; requires_aesthetics_score) through StableDiffusionXLImg2ImgPipeline at its
default strength and with its aesthetic scores set, and through StableDiffusionXLInpaintPipeline. And the base handing
its latents to that refiner (golden.json's sdxl.handoff): StableDiffusionXLPipeline with denoising_end and
output_type "latent", then the refiner with denoising_start (or, at denoising_end 1, image-to-image on the finished
latents at a strength); R.base_latents is what the base handed over.

Inpainting (StableDiffusionInpaintPipeline), the runs of golden.json's "inpaint" list: on tiny-sd itself (a 4-channel
UNet: the kept region blended back after every step) and on DIR/inpaint-model (tiny-sd with a random 9-channel UNet:
latents, mask and masked-image latents in). DIR/mask_0.png: a white rectangle on black with a column of grey 127
(kept) beside one of 128 (repainted); DIR/mask_1.png: transparent where repainted (the OpenAI images API's convention),
black and opaque elsewhere, given to diffusers as the equivalent white-on-black mask. Each run records its draws with
their roles in golden.json ("image": the image's posterior sample, "noise", "masked": the masked image's sample).
"""
import json
import os
import shutil

import numpy as np
import torch

from golden_draws import out_linked_to, recorded_draws, tiny_sd_args

PROMPTS = ["a red circle above a blue square", "two small green triangles"]
# diffpipe's sampler name -> the diffusers scheduler class
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
              "pndm": "PNDMScheduler", "heun": "HeunDiscreteScheduler"}
RUNS = [dict(name="ddim", sampler="ddim", strength=0.8, steps=6, guidance=7.5, negative_prompt=None),
        dict(name="euler", sampler="euler", strength=0.5, steps=5, guidance=5.0, negative_prompt="blurry, dark"),
        dict(name="dpmpp", sampler="dpmpp_2m", strength=0.75, steps=8, guidance=7.5, negative_prompt=None),
        dict(name="pndm", sampler="pndm", strength=0.6, steps=5, guidance=3.0, negative_prompt=None),
        dict(name="full", sampler="ddim", strength=1.0, steps=4, guidance=1.0, negative_prompt=None),
        dict(name="heun", sampler="heun", strength=0.6, steps=5, guidance=5.0, negative_prompt=None)]


def main():
    a = tiny_sd_args("an SDXL model folder for the sdxl run")
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.models.autoencoders import vae as vae_module
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img
    from PIL import Image
    from safetensors.torch import save_file

    src = out_linked_to(a.out, a.src)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    base_config = dict(pipe.scheduler.config)

    # starting images: colour ramps with a little texture, 40 wide and 32 high
    yy, xx = np.mgrid[0:32, 0:40].astype(np.float32)
    yy, xx = yy / 31.0, xx / 39.0
    rng = np.random.default_rng(a.seed)
    images = []
    for k in range(len(PROMPTS)):
        rgb = np.stack([xx, yy, (xx + yy) / 2 if k == 0 else 1 - xx], -1) * 200 + 30
        rgb = (rgb + rng.normal(0, 12, rgb.shape)).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(rgb, "RGB")
        im.save(os.path.join(a.out, f"input_{k}.png"))
        images.append(im)

    res = {}
    for r in RUNS:
        cls = getattr(diffusers, SCHEDULERS[r["sampler"]])
        extra = {"skip_prk_steps": True} if r["sampler"] == "pndm" else {}
        pipe.scheduler = cls.from_config(base_config, **extra)
        captured = {}
        real = pipe.scheduler.add_noise

        def add_noise(original, noise, t, real=real, captured=captured):
            captured["image_latents"] = original.clone()
            return real(original, noise, t)
        pipe.scheduler.add_noise = add_noise
        with torch.no_grad(), recorded_draws(vae_module, pipeline_stable_diffusion_img2img) as draws:
            neg = None if r["negative_prompt"] is None else [r["negative_prompt"]] * len(PROMPTS)
            img = pipe(PROMPTS, image=images, strength=r["strength"], negative_prompt=neg,
                       num_inference_steps=r["steps"], guidance_scale=r["guidance"], output_type="pt",
                       generator=torch.Generator().manual_seed(a.seed + 11)).images
        n = r["name"]
        assert len(draws) == 2, f"{n}: expected 2 draws (posterior sample, noise), got {len(draws)}"
        for k, d in enumerate(draws):
            res[f"{n}.draws.{k}"] = d
        res[f"{n}.image_latents"] = captured["image_latents"]
        res[f"{n}.images"] = img
    # inpainting: masks, a 9-channel UNet folder, four runs
    masks_l, masks_diffpipe = [], []
    m0 = np.zeros((32, 40), np.uint8)
    m0[4:20, 8:28] = 255
    m0[:, 30] = 127
    m0[:, 31] = 128
    m1 = np.zeros((32, 40), np.uint8)
    m1[10:30, 2:22] = 255
    Image.fromarray(m0, "L").save(os.path.join(a.out, "mask_0.png"))
    rgba = np.zeros((32, 40, 4), np.uint8)
    rgba[..., 3] = np.where(m1 > 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(os.path.join(a.out, "mask_1.png"))
    masks_l = [Image.fromarray(m0, "L"), Image.fromarray(m1, "L")]
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint
    plain = StableDiffusionInpaintPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                           unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    torch.manual_seed(a.seed + 400)
    unet9 = UNet2DConditionModel.from_config({**plain.unet.config, "in_channels": 9}).eval()
    with torch.no_grad():
        for prm in unet9.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)
    nine = StableDiffusionInpaintPipeline(vae=plain.vae, text_encoder=plain.text_encoder, tokenizer=plain.tokenizer,
                                          unet=unet9, scheduler=plain.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    inpaint_model = os.path.join(a.out, "inpaint-model")
    nine.save_pretrained(inpaint_model)
    shutil.rmtree(os.path.join(inpaint_model, "tokenizer"))
    shutil.copytree(os.path.join(src, "tokenizer"), os.path.join(inpaint_model, "tokenizer"))
    inpaint_runs = [dict(name="blend_ddim", model="model", sampler="ddim", strength=None, steps=6, guidance=7.5,
                         negative_prompt=None),
                    dict(name="blend_euler", model="model", sampler="euler", strength=0.7, steps=5, guidance=5.0,
                         negative_prompt="blurry"),
                    dict(name="unet9_ddim", model="inpaint-model", sampler="ddim", strength=None, steps=6,
                         guidance=7.5, negative_prompt=None),
                    dict(name="unet9_dpmpp", model="inpaint-model", sampler="dpmpp_2m", strength=0.75, steps=8,
                         guidance=4.0, negative_prompt=None)]
    for r in inpaint_runs:
        p = plain if r["model"] == "model" else nine
        p.set_progress_bar_config(disable=True)
        cls = getattr(diffusers, SCHEDULERS[r["sampler"]])
        p.scheduler = cls.from_config(base_config)
        strength = 1.0 if r["strength"] is None else r["strength"]
        with torch.no_grad(), recorded_draws(vae_module, pipeline_stable_diffusion_inpaint) as draws:
            neg = None if r["negative_prompt"] is None else [r["negative_prompt"]] * len(PROMPTS)
            img = p(PROMPTS, image=images, mask_image=masks_l, strength=strength, negative_prompt=neg,
                    num_inference_steps=r["steps"], guidance_scale=r["guidance"], output_type="pt", height=32,
                    width=40, generator=torch.Generator().manual_seed(a.seed + 13)).images
        # which draw is which: the image's sample (when the pipeline encodes it), the noise, the masked image's
        encodes_image = r["model"] == "model" or strength < 1
        r["draw_roles"] = (["image"] if encodes_image else []) + ["noise", "masked"]
        assert len(draws) == len(r["draw_roles"]), (r["name"], len(draws))
        for role, d in zip(r["draw_roles"], draws):
            res[f"{r['name']}.draws.{role}"] = d
        res[f"{r['name']}.images"] = img

    sdxl = None
    if a.sdxl:
        from diffusers import StableDiffusionXLImg2ImgPipeline
        from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img
        xl = StableDiffusionXLImg2ImgPipeline.from_pretrained(a.sdxl)
        xl.set_progress_bar_config(disable=True)
        sdxl = dict(name="sdxl", model=os.path.abspath(a.sdxl), strength=0.6, steps=5, guidance=5.0,
                    negative_prompt=None)
        with torch.no_grad(), recorded_draws(vae_module, pipeline_stable_diffusion_xl_img2img) as draws:
            img = xl(PROMPTS, image=images, strength=sdxl["strength"], num_inference_steps=sdxl["steps"],
                     guidance_scale=sdxl["guidance"], output_type="pt",
                     generator=torch.Generator().manual_seed(a.seed + 12)).images
        assert len(draws) == 2, f"sdxl: expected 2 draws, got {len(draws)}"
        for k, d in enumerate(draws):
            res[f"sdxl.draws.{k}"] = d
        res["sdxl.images"] = img
        # SDXL inpainting (StableDiffusionXLInpaintPipeline): the SDXL folder's 4-channel UNet at the pipeline's
        # default strength (0.9999: the image noised to the second timestep), and a random 9-channel UNet on the
        # same components (DIR/sdxl-inpaint-model, saved as the Inpaint pipeline) at strength 1, both with the
        # folder's Euler
        from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel
        from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint
        xl_plain = StableDiffusionXLInpaintPipeline(**xl.components)
        torch.manual_seed(a.seed + 401)
        xl_unet9 = UNet2DConditionModel.from_config({**xl.unet.config, "in_channels": 9}).eval()
        with torch.no_grad():
            for prm in xl_unet9.parameters():
                prm.add_(torch.randn_like(prm) * 0.05)
        xl_nine = StableDiffusionXLInpaintPipeline(**{**xl.components, "unet": xl_unet9})
        xl_inpaint_model = os.path.join(a.out, "sdxl-inpaint-model")
        xl_nine.save_pretrained(xl_inpaint_model)
        for t in ("tokenizer", "tokenizer_2"):
            shutil.rmtree(os.path.join(xl_inpaint_model, t))
            shutil.copytree(os.path.join(a.sdxl, t), os.path.join(xl_inpaint_model, t))
        xl_runs = [dict(name="sdxl_blend", model=os.path.abspath(a.sdxl), sampler=None, strength=None, steps=5,
                        guidance=5.0, negative_prompt=None),
                   dict(name="sdxl_unet9", model="sdxl-inpaint-model", sampler=None, strength=1.0, steps=4,
                        guidance=4.0, negative_prompt="blurry")]
        for r in xl_runs:
            p = xl_plain if r["name"] == "sdxl_blend" else xl_nine
            p.set_progress_bar_config(disable=True)
            kw = {} if r["strength"] is None else {"strength": r["strength"]}
            with torch.no_grad(), recorded_draws(vae_module, pipeline_stable_diffusion_xl_inpaint) as draws:
                neg = None if r["negative_prompt"] is None else [r["negative_prompt"]] * len(PROMPTS)
                img = p(PROMPTS, image=images, mask_image=masks_l, negative_prompt=neg, height=32, width=40,
                        num_inference_steps=r["steps"], guidance_scale=r["guidance"], output_type="pt",
                        generator=torch.Generator().manual_seed(a.seed + 14), **kw).images
            encodes_image = r["model"] != "sdxl-inpaint-model" or r["strength"] != 1.0
            r["draw_roles"] = (["image"] if encodes_image else []) + ["noise", "masked"]
            assert len(draws) == len(r["draw_roles"]), (r["name"], len(draws))
            for role, d in zip(r["draw_roles"], draws):
                res[f"{r['name']}.draws.{role}"] = d
            res[f"{r['name']}.images"] = img
        sdxl["inpaint"] = xl_runs
        # the SDXL refiner (requires_aesthetics_score): text_encoder_2 alone and a UNet conditioned on (original size,
        # crop, aesthetic score), DIR/sdxl-refiner-model, saved as StableDiffusionXLImg2ImgPipeline; image-to-image at
        # the pipeline's default strength (0.3) and with its scores set, and inpainting through
        # StableDiffusionXLInpaintPipeline on the same components
        T, P = xl.unet.config.addition_time_embed_dim, xl.text_encoder_2.config.projection_dim
        torch.manual_seed(a.seed + 402)
        ref_unet = UNet2DConditionModel.from_config({
            **xl.unet.config, "cross_attention_dim": xl.text_encoder_2.config.hidden_size,
            "projection_class_embeddings_input_dim": P + 5 * T}).eval()
        with torch.no_grad():
            for prm in ref_unet.parameters():
                prm.add_(torch.randn_like(prm) * 0.05)
        refiner = StableDiffusionXLImg2ImgPipeline(
            vae=xl.vae, text_encoder=None, text_encoder_2=xl.text_encoder_2, tokenizer=None, tokenizer_2=xl.tokenizer_2,
            unet=ref_unet, scheduler=xl.scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
        refiner.set_progress_bar_config(disable=True)
        refiner_model = os.path.join(a.out, "sdxl-refiner-model")
        refiner.save_pretrained(refiner_model)
        shutil.rmtree(os.path.join(refiner_model, "tokenizer_2"))
        shutil.copytree(os.path.join(a.sdxl, "tokenizer_2"), os.path.join(refiner_model, "tokenizer_2"))
        ref_inpaint = StableDiffusionXLInpaintPipeline(**refiner.components, requires_aesthetics_score=True,
                                                       force_zeros_for_empty_prompt=False)
        ref_inpaint.set_progress_bar_config(disable=True)
        ref_runs = [dict(name="refiner_default", strength=None, steps=10, guidance=5.0, negative_prompt=None,
                         aesthetic_score=None, negative_aesthetic_score=None, mask=False),
                    dict(name="refiner_scores", strength=0.5, steps=6, guidance=6.0, negative_prompt="blurry",
                         aesthetic_score=7.5, negative_aesthetic_score=1.5, mask=False),
                    dict(name="refiner_inpaint", strength=0.75, steps=4, guidance=5.0, negative_prompt=None,
                         aesthetic_score=5.0, negative_aesthetic_score=None, mask=True)]
        for r in ref_runs:
            kw = {k: r[k] for k in ("strength", "aesthetic_score", "negative_aesthetic_score") if r[k] is not None}
            if r["negative_prompt"] is not None:
                kw["negative_prompt"] = [r["negative_prompt"]] * len(PROMPTS)
            module = pipeline_stable_diffusion_xl_inpaint if r["mask"] else pipeline_stable_diffusion_xl_img2img
            with torch.no_grad(), recorded_draws(vae_module, module) as draws:
                if r["mask"]:
                    img = ref_inpaint(PROMPTS, image=images, mask_image=masks_l, height=32, width=40,
                                      num_inference_steps=r["steps"], guidance_scale=r["guidance"], output_type="pt",
                                      generator=torch.Generator().manual_seed(a.seed + 15), **kw).images
                else:
                    img = refiner(PROMPTS, image=images, num_inference_steps=r["steps"], guidance_scale=r["guidance"],
                                  output_type="pt", generator=torch.Generator().manual_seed(a.seed + 15), **kw).images
            r["draw_roles"] = ["image", "noise", "masked"] if r["mask"] else ["image", "noise"]
            assert len(draws) == len(r["draw_roles"]), (r["name"], len(draws))
            for k, (role, d) in enumerate(zip(r["draw_roles"], draws)):
                res[f"{r['name']}.draws.{role}"] = d
                res[f"{r['name']}.draws.{k}"] = d
            res[f"{r['name']}.images"] = img
        sdxl["refiner"] = ref_runs
        # the base hands its latents to the refiner (golden.json's sdxl.handoff): StableDiffusionXLPipeline on the SDXL
        # folder with denoising_end and output_type "latent", then the refiner's StableDiffusionXLImg2ImgPipeline on
        # those latents with denoising_start (the ensemble of expert denoisers: no noise added), or, at denoising_end
        # 1, the base's finished latents refined image-to-image at a strength. R.base_latents: what the base handed over.
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
        from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl
        xl_base = StableDiffusionXLPipeline(**xl.components)
        xl_base.set_progress_bar_config(disable=True)
        euler = xl.scheduler
        hand_runs = [dict(name="handoff_euler", sampler=None, steps=8, refiner_steps=None, denoising_end=0.75,
                          refiner_strength=None, guidance=5.0, negative_prompt=None, aesthetic_score=None),
                     dict(name="handoff_dpmpp", sampler="dpmpp_2m", steps=6, refiner_steps=10, denoising_end=0.5,
                          refiner_strength=None, guidance=6.0, negative_prompt="blurry", aesthetic_score=7.0),
                     dict(name="refine_after", sampler=None, steps=5, refiner_steps=None, denoising_end=1.0,
                          refiner_strength=0.4, guidance=5.0, negative_prompt=None, aesthetic_score=None)]
        for r in hand_runs:
            # (DPM-Solver++ rather than DDIM: DDIM on this random SDXL UNet is unstable in bfloat16, diffusers' too)
            sched = euler if r["sampler"] is None else DPMSolverMultistepScheduler.from_config(euler.config)
            xl_base.scheduler = sched
            refiner.scheduler = sched
            neg = None if r["negative_prompt"] is None else [r["negative_prompt"]] * len(PROMPTS)
            gen = torch.Generator().manual_seed(a.seed + 16)
            with torch.no_grad(), recorded_draws(pipeline_stable_diffusion_xl, pipeline_stable_diffusion_xl_img2img,
                                                 vae_module) as draws:
                d = r["denoising_end"]
                calls = []

                def count(pipe, i, t, kw, calls=calls):
                    calls.append(int(t))
                    return kw
                lat = xl_base(PROMPTS, negative_prompt=neg, height=32, width=40, num_inference_steps=r["steps"],
                              guidance_scale=r["guidance"], output_type="latent", generator=gen,
                              callback_on_step_end=count, **({"denoising_end": d} if d < 1 else {})).images
                r["base_calls"] = len(calls)
                del calls[:]
                kw = {"denoising_start": d} if d < 1 else {"strength": r["refiner_strength"]}
                if r["aesthetic_score"] is not None:
                    kw["aesthetic_score"] = r["aesthetic_score"]
                img = refiner(PROMPTS, image=lat, negative_prompt=neg,
                              num_inference_steps=r["refiner_steps"] or r["steps"], guidance_scale=r["guidance"],
                              output_type="pt", generator=gen, callback_on_step_end=count, **kw).images
                r["refiner_calls"] = len(calls)
            r["draw_roles"] = ["noise"] + (["refiner_noise"] if d >= 1 else [])
            assert len(draws) == len(r["draw_roles"]), (r["name"], len(draws))
            for role, dr in zip(r["draw_roles"], draws):
                res[f"{r['name']}.draws.{role}"] = dr
            res[f"{r['name']}.base_latents"] = lat
            res[f"{r['name']}.images"] = img
        sdxl["handoff"] = hand_runs
    save_file({k: v.clone().contiguous() for k, v in res.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = {"prompts": PROMPTS, "images": [f"input_{k}.png" for k in range(len(PROMPTS))], "runs": RUNS, "sdxl": sdxl,
            "masks": ["mask_0.png", "mask_1.png"], "inpaint": inpaint_runs,
            "draw_order": "the VAE posterior's sample noise, then the noise added to the image latents",
            "source": f"diffusers {diffusers.__version__} StableDiffusionImg2ImgPipeline on {a.src}, "
                      f"torch {torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
