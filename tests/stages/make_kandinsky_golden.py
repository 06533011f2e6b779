#!/usr/bin/env python3
"""Makes a tiny Kandinsky 2.2 reference with diffusers, for the GoldenKandinsky tests:

    python3 tests/stages/make_kandinsky_golden.py --out DIR [--seed 0] [--src ../shared/golden/tiny-sd]
    DIFFPIPE_GOLDEN_KANDINSKY=DIR ./build/tests/test_stages --gtest_filter='GoldenKandinsky.*'

DIR/model/: a KandinskyV22CombinedPipeline folder as save_pretrained writes it (the DALL-E 2 design in its open
form): prior_tokenizer/ (the real CLIP vocabulary, --src's tokenizer), prior_text_encoder/
(CLIPTextModelWithProjection), prior_prior/ (PriorTransformer), prior_scheduler/ (UnCLIPScheduler: the prior predicts
the sample, fixed_small_log variance, clip range 10), prior_image_encoder/ (CLIPVisionModelWithProjection: the zero
image's embedding is the negative image embedding), prior_image_processor/; the decoder: unet/
(UNet2DConditionModel conditioned on the image embedding alone: encoder_hid_dim_type "image_proj" makes its 10
cross-attention tokens, addition_embed_type "image" adds it to the time embedding; 8 output channels of which the
pipeline keeps 4), scheduler/ (DDPMScheduler as kandinsky-2-2-decoder ships it) and movq/ (VQModel with
norm_type "spatial": the decoder's norms are modulated by the latents, MoVQ). Random weights. The same parts also
as the hub publishes them: DIR/decoder/ (KandinskyV22Pipeline: unet/, scheduler/, movq/) and DIR/prior/
(KandinskyV22PriorPipeline: prior/, text_encoder/, tokenizer/, image_encoder/, scheduler/, image_processor/).

DIR/golden.safetensors: unet.{sample, timesteps, image_embeds} -> unet.out; movq.latents -> movq.decoded (decode
with force_not_quantize); for each run R of golden.json (KandinskyV22PriorPipeline then KandinskyV22Pipeline with
one generator, as the combined pipeline calls them): pipeline.R.draws.K (every random draw in order: the prior's
initial latents [B or 2B, E] (2B: the negative prompts' rows after the prompts'), each prior step's variance noise but
the last's, the decoder's initial latents, each DDPM step's variance noise but the last's; run "variation" varies
DIR/input.png (KandinskyV22PriorPipeline.interpolate of the one image: its draws are those of the prior run on ""
that makes the negative embedding, then the decoder's); run "img2img" starts KandinskyV22Img2ImgPipeline from
DIR/input32.png at its strength (the decoder's draws: the noise of the MoVQ latents, then each step's)),
movq.image -> movq.encoded (VQModel.encode: the latents, not quantised), pipeline.R.image_embeds
and .negative_image_embeds (the prior's outputs), pipeline.R.final_latents and pipeline.R.image_uint8
(round(clamp(decoded / 2 + 0.5) x 255), HWC).
"""
import json
import os
import shutil

import numpy as np
import torch

from golden_draws import recorded_draws, tiny_sd_args

PROMPTS = ["A Red Circle above a blue square", "  two small GREEN triangles  "]


def nudge(module, scale, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def main():
    a = tiny_sd_args()
    tok_dir = os.path.join(a.src, "model", "tokenizer")
    import diffusers
    from diffusers import (DDPMScheduler, KandinskyV22CombinedPipeline, PriorTransformer, UNet2DConditionModel,
                           UnCLIPScheduler, VQModel)
    from diffusers.pipelines.kandinsky2_2 import pipeline_kandinsky2_2, pipeline_kandinsky2_2_prior
    from diffusers.schedulers import scheduling_ddpm, scheduling_unclip
    from safetensors.torch import save_file
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.makedirs(a.out)
    gen = torch.Generator().manual_seed(a.seed + 300)
    torch.manual_seed(a.seed + 301)
    E = 32  # the CLIP embedding width (1280 in kandinsky-2-2-prior)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    text = nudge(CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=E, max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407)), 0.02, gen)
    vision = nudge(CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=E, hidden_act="gelu")), 0.02, gen)
    processor = CLIPImageProcessor(crop_size=32, size=32)
    prior = nudge(PriorTransformer(num_attention_heads=2, attention_head_dim=16, embedding_dim=E, num_layers=2), 0.05,
                  gen)
    with torch.no_grad():
        prior.clip_mean.copy_(torch.randn(1, E, generator=gen) * 0.1)
        prior.clip_std.copy_(1 + torch.rand(1, E, generator=gen))
    prior_sched = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                                  clip_sample=True, clip_sample_range=10.0)
    unet = nudge(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=8, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", addition_embed_type="image", encoder_hid_dim=E,
        encoder_hid_dim_type="image_proj", cross_attention_dim=48, attention_head_dim=8,
        resnet_time_scale_shift="scale_shift", class_embed_type=None, norm_num_groups=8), 0.05, gen)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, steps_offset=1, prediction_type="epsilon",
                          thresholding=False, variance_type="fixed_small")
    movq = nudge(VQModel(
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D",
                                                           "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"), in_channels=3,
        latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial", num_vq_embeddings=12,
        out_channels=3, vq_embed_dim=4), 0.05, gen)
    pipe = KandinskyV22CombinedPipeline(unet=unet, scheduler=sched, movq=movq, prior_prior=prior,
                                        prior_image_encoder=vision, prior_text_encoder=text, prior_tokenizer=tok,
                                        prior_scheduler=prior_sched, prior_image_processor=processor)
    model = os.path.join(a.out, "model")
    pipe.save_pretrained(model)
    # the same parts as the hub publishes them: kandinsky-2-2-decoder's layout and kandinsky-2-2-prior's
    pipe.decoder_pipe.save_pretrained(os.path.join(a.out, "decoder"))
    pipe.prior_pipe.save_pretrained(os.path.join(a.out, "prior"))
    for t in (os.path.join(model, "prior_tokenizer"), os.path.join(a.out, "prior", "tokenizer")):
        for f in ("vocab.json", "merges.txt"):  # as the hub's kandinsky-2-2-prior/tokenizer has them (transformers 5
            shutil.copy(os.path.join(tok_dir, f), os.path.join(t, f))  # writes tokenizer.json alone)
    pipe.set_progress_bar_config(disable=True)

    g = torch.Generator().manual_seed(a.seed + 1)
    res = {}
    with torch.no_grad():
        x = torch.randn(3, 4, 8, 8, generator=g)
        ts = torch.tensor([999, 500, 3])
        emb = torch.randn(3, E, generator=g)
        res.update({"unet.sample": x, "unet.timesteps": ts, "unet.image_embeds": emb,
                    "unet.out": unet(x, ts, encoder_hidden_states=None,
                                     added_cond_kwargs={"image_embeds": emb}).sample})
        lat = torch.randn(2, 4, 8, 8, generator=g)
        res.update({"movq.latents": lat, "movq.decoded": movq.decode(lat, force_not_quantize=True).sample})
        img = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        res.update({"movq.image": img, "movq.encoded": movq.encode(img).latents})

    runs = [dict(name="plain", negative_prompt=None, prior_guidance=4.0, prior_steps=6, guidance=4.0, steps=5,
                 size=32),
            dict(name="negative", negative_prompt="Blurry, DARK", prior_guidance=3.0, prior_steps=5, guidance=5.0,
                 steps=4, size=32),
            dict(name="unguided", negative_prompt=None, prior_guidance=1.0, prior_steps=4, guidance=1.0, steps=3,
                 size=48),
            # a variation of an image (interpolate of one image, weight 1): its embedding from the image encoder; the
            # negative from a prior run on "" (the zero image's embedding), whose draws come first
            dict(name="variation", image="input.png", negative_prompt=None, prior_guidance=4.0, prior_steps=3,
                 guidance=4.0, steps=4, size=32),
            # image-to-image (KandinskyV22Img2ImgPipeline) from a 32x32 image (its own size: no resize) at strength 0.6
            dict(name="img2img", start="input32.png", strength=0.6, negative_prompt=None, prior_guidance=4.0,
                 prior_steps=3, guidance=4.0, steps=5, size=32)]
    from diffusers import KandinskyV22Img2ImgPipeline
    from diffusers.pipelines.kandinsky2_2 import pipeline_kandinsky2_2_img2img
    i2i = KandinskyV22Img2ImgPipeline(unet=unet, scheduler=sched, movq=movq)
    i2i.set_progress_bar_config(disable=True)
    from PIL import Image
    yy, xx = np.mgrid[0:40, 0:48]
    rgb = np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1) + np.random.default_rng(a.seed).integers(0, 40, (40, 48, 3))
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(os.path.join(a.out, "input.png"))
    Image.fromarray(rgb[4:36, 8:40].clip(0, 255).astype(np.uint8)).save(os.path.join(a.out, "input32.png"))
    for r in runs:
        n = r["name"]
        last = {}

        def keep(p, i, t, kw):
            last["latents"] = kw["latents"]
            return kw
        with torch.no_grad(), recorded_draws(pipeline_kandinsky2_2_prior, scheduling_unclip, pipeline_kandinsky2_2,
                                             pipeline_kandinsky2_2_img2img, scheduling_ddpm) as draws:
            gen_run = torch.Generator().manual_seed(a.seed + 7)
            neg = None if r["negative_prompt"] is None else [r["negative_prompt"]] * len(PROMPTS)
            if "image" in r:
                out = pipe.prior_pipe.interpolate([Image.open(os.path.join(a.out, r["image"]))], [1.0],
                                                  num_inference_steps=r["prior_steps"], generator=gen_run,
                                                  guidance_scale=r["prior_guidance"])
                emb, neg_emb = out.image_embeds, out.negative_image_embeds
            else:
                emb, neg_emb = pipe.prior_pipe(PROMPTS, negative_prompt=neg, num_inference_steps=r["prior_steps"],
                                               guidance_scale=r["prior_guidance"], generator=gen_run,
                                               output_type="pt", return_dict=False)
            if "start" in r:
                start = Image.open(os.path.join(a.out, r["start"]))
                img = i2i(image_embeds=emb, negative_image_embeds=neg_emb, image=[start] * len(PROMPTS),
                          width=r["size"], height=r["size"], num_inference_steps=r["steps"], strength=r["strength"],
                          guidance_scale=r["guidance"], generator=gen_run, output_type="np",
                          callback_on_step_end=keep).images
            else:
                img = pipe.decoder_pipe(image_embeds=emb, negative_image_embeds=neg_emb, width=r["size"],
                                        height=r["size"], num_inference_steps=r["steps"], guidance_scale=r["guidance"],
                                        generator=gen_run, output_type="np", callback_on_step_end=keep).images
        for k, d in enumerate(draws):
            res[f"pipeline.{n}.draws.{k}"] = d
        res[f"pipeline.{n}.image_embeds"] = emb
        res[f"pipeline.{n}.negative_image_embeds"] = neg_emb
        res[f"pipeline.{n}.final_latents"] = last["latents"]
        res[f"pipeline.{n}.image_uint8"] = torch.from_numpy((img * 255).round().clip(0, 255).astype(np.uint8))
        r["draws"] = len(draws)
    save_file({k: v.clone().contiguous() for k, v in res.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = {"prompts": PROMPTS, "runs": runs,
            "draw_order": "the prior's initial latents, each prior step's variance noise but the last's, the "
                          "decoder's initial latents, each DDPM step's variance noise but the last's",
            "source": f"diffusers {diffusers.__version__} KandinskyV22PriorPipeline + KandinskyV22Pipeline "
                      f"(KandinskyV22CombinedPipeline's parts, one generator), torch {torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps({k: meta[k] for k in ("source",)}), {r["name"]: r["draws"] for r in runs})


if __name__ == "__main__":
    main()
