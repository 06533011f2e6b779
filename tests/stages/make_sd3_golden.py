#!/usr/bin/env python3
"""Makes a tiny Stable Diffusion 3 reference folder with diffusers (StableDiffusion3Pipeline), for the GoldenSd3 tests:

    python3 tests/stages/make_sd3_golden.py --out DIR [--seed 0]
    DIFFPIPE_GOLDEN_SD3=DIR ./build/tests/test_stages --gtest_filter='GoldenSd3.*'

DIR/model/ is a diffusers SD3 folder (random weights), laid out as stable-diffusion-3.5-medium at a tiny size:
tokenizer/ and tokenizer_2/ (the real CLIP BPE vocabulary of ../shared/golden/tiny-sd; tokenizer_2 pads with "!"),
text_encoder/ (CLIPTextModelWithProjection, hidden 32, projection 24) and text_encoder_2/ (hidden 40, gelu,
projection 16), tokenizer_3/ + text_encoder_3/ (make_t5_golden.make_t5: a Unigram T5 tokenizer and a random
T5EncoderModel, d_model 80), transformer/ (SD3Transformer2DModel: patch 2, 3 joint blocks, the first two with SD3.5's
dual attention, qk_norm "rms_norm", pos_embed_max_size 12), vae/ (AutoencoderKL with 16 latent channels, no quant
convs, SD3's scaling 1.5305 and shift 0.0609) and scheduler/ (FlowMatchEulerDiscreteScheduler, shift 3).
DIR/model_no_t5/: the same folder without tokenizer_3/text_encoder_3 (model_index.json says null for them; the
pipeline's T5 embeddings are zeros).
DIR/transformer_sd30/: an SD3.0-style transformer (no dual attention, no qk norm, pos_embed_max_size 8).
DIR/golden.safetensors (float32 unless noted, batch first):
  text_encoder.input_ids (i64) -> text_encoder.hidden_states_m2, text_encoder.text_embeds; the same for
  text_encoder_2 (ids padded with "!"); text_encoder_3.input_ids (i64, 256 tokens) -> text_encoder_3.out;
  transformer.{sample, timestep, encoder_hidden_states, pooled_projections} -> transformer.out (and
  transformer_sd30.out for the same inputs, at 8x8 latents: transformer_sd30.sample);
  scheduler.R.timesteps / scheduler.R.sigmas for the sampler schedules in golden.json;
  for each pipeline run R: pipeline.R.initial_noise, pipeline.R.prompt_embeds (the conditional rows),
  pipeline.R.pooled, pipeline.R.final_latents, pipeline.R.image_uint8 (u8, HWC) (run "t5_512": T5 at 512 tokens, the
  pipeline's max_sequence_length); for each image-to-image run R of
  golden.json's img2img_runs (StableDiffusion3Img2ImgPipeline from DIR/input_K.png): R.draws.0 (the VAE posterior's
  sample), R.draws.1 (the initial noise), R.images ([B, 3, H, W] in [0, 1]); for each inpainting run R of golden.json's inpaint_runs (the same images, DIR/inpaint_mask.png):
  R.draws.image / .noise / .masked, R.images; pipeline.lora.final_latents and
  .image_uint8: run "plain" with DIR/lora.safetensors active (transformer and first CLIP encoder, scale 1).
"""
import json
import os
import shutil

import numpy as np
import torch

from golden_draws import clip_tokenizers, keep_slow_tokenizer_files, tiny_sd_args
from make_t5_golden import make_t5

PROMPTS = ["a red circle on a blue square", "a small green triangle, top left"]
PADS = [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")]  # the second CLIP tokenizer pads with "!" (id 0)


def main():
    a = tiny_sd_args()
    import diffusers
    import transformers
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    src = os.path.join(a.src, "model")
    model = os.path.join(a.out, "model")
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.makedirs(model)
    torch.manual_seed(a.seed)

    def nudged(m, scale=0.02):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * scale)
        return m.eval()

    tok, tok2 = clip_tokenizers(model, src, PADS)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=1)
    te = nudged(CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                                           num_attention_heads=4, hidden_act="quick_gelu",
                                                           projection_dim=24, **common)))
    te2 = nudged(CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=40, intermediate_size=53, num_hidden_layers=3,
                                                            num_attention_heads=5, hidden_act="gelu",
                                                            projection_dim=16, **common)))
    here = os.path.dirname(os.path.abspath(__file__))
    tok3, te3 = make_t5(os.path.join(a.out, "t5tmp", "tokenizer"), os.path.join(a.out, "t5tmp", "text_encoder"),
                        a.seed, os.path.join(src, "tokenizer", "vocab.json"), d_model=80)
    POOLED, JOINT = 24 + 16, 80
    torch.manual_seed(a.seed + 10)
    tr = nudged(SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=JOINT, caption_projection_dim=32, pooled_projection_dim=POOLED, out_channels=16,
        pos_embed_max_size=12, dual_attention_layers=(0, 1), qk_norm="rms_norm"), 0.05)
    tr30 = nudged(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=JOINT, caption_projection_dim=16, pooled_projection_dim=POOLED, out_channels=16,
        pos_embed_max_size=8), 0.05)
    tr30.save_pretrained(os.path.join(a.out, "transformer_sd30"))
    vae = nudged(AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
        latent_channels=16, norm_num_groups=8, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True), 0.02)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok,
                                    text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)
    pipe.save_pretrained(model)
    shutil.rmtree(os.path.join(a.out, "t5tmp"))
    keep_slow_tokenizer_files(model, PADS)
    # the folder without T5 (stable-diffusion-3-medium-diffusers loaded with text_encoder_3=None, saved)
    no_t5 = os.path.join(a.out, "model_no_t5")
    # (files linked, relative, to model/'s: the same weights; model_index.json a file of its own)
    shutil.copytree(model, no_t5, ignore=shutil.ignore_patterns("tokenizer_3", "text_encoder_3", "model_index.json"),
                    copy_function=lambda s, d: os.symlink(os.path.relpath(s, os.path.dirname(d)), d))
    index = json.load(open(os.path.join(model, "model_index.json")))
    index["tokenizer_3"] = index["text_encoder_3"] = [None, None]
    json.dump(index, open(os.path.join(no_t5, "model_index.json"), "w"), indent=1)
    pipe.set_progress_bar_config(disable=True)
    pipe_no_t5 = StableDiffusion3Pipeline(transformer=tr, scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok,
                                          text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None)
    pipe_no_t5.set_progress_bar_config(disable=True)

    out = {}
    g = torch.Generator().manual_seed(a.seed + 1)
    with torch.no_grad():
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids2 = tok2(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        for name, enc, i in (("text_encoder", te, ids), ("text_encoder_2", te2, ids2)):
            o = enc(i, output_hidden_states=True)
            out[f"{name}.input_ids"] = i
            out[f"{name}.hidden_states_m2"] = o.hidden_states[-2]
            out[f"{name}.text_embeds"] = o.text_embeds
        ids3 = tok3(PROMPTS, padding="max_length", max_length=256, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids
        out["text_encoder_3.input_ids"] = ids3
        out["text_encoder_3.out"] = te3(ids3)[0]

        # the transformer alone: a non-square 12x8 latent (6x4 patches cropped from the 12x12 position table)
        x = torch.randn(3, 16, 12, 8, generator=g)
        ts = torch.tensor([1000.0, 512.25, 3.0])
        ehs = torch.randn(3, 21, JOINT, generator=g)
        pooled = torch.randn(3, POOLED, generator=g)
        out.update({"transformer.sample": x, "transformer.timestep": ts, "transformer.encoder_hidden_states": ehs,
                    "transformer.pooled_projections": pooled})
        out["transformer.out"] = tr(x, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=ts).sample
        x30 = torch.randn(3, 16, 8, 6, generator=g)
        out["transformer_sd30.sample"] = x30
        out["transformer_sd30.out"] = tr30(x30, encoder_hidden_states=ehs, pooled_projections=pooled,
                                           timestep=ts).sample

        # schedules: the folder's (shift 3), shift 1, and dynamic shifting at a 16-token image (mu from
        # calculate_shift with the config's defaults)
        schedules = [dict(name="shift3", config={"shift": 3.0}, steps=7),
                     dict(name="shift1", config={"shift": 1.0}, steps=5),
                     dict(name="dynamic", config={"use_dynamic_shifting": True, "base_shift": 0.5,
                                                  "max_shift": 1.15}, steps=6, image_seq_len=16)]
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
        for s in schedules:
            sc = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **s["config"])
            kw = {}
            if s["config"].get("use_dynamic_shifting"):
                kw["mu"] = calculate_shift(s["image_seq_len"], 256, 4096, 0.5, 1.15)
            sc.set_timesteps(s["steps"], **kw)
            out[f"scheduler.{s['name']}.timesteps"] = sc.timesteps.clone()
            out[f"scheduler.{s['name']}.sigmas"] = sc.sigmas.clone()

        runs = [dict(name="plain", negative_prompt=None, guidance=5.0, steps=6, height=32, width=32),
                dict(name="negative", negative_prompt="blurry, dark", guidance=4.0, steps=5, height=32, width=32),
                dict(name="unguided", negative_prompt=None, guidance=1.0, steps=4, height=32, width=48),
                dict(name="clip_skip", negative_prompt="blurry, dark", guidance=6.0, steps=4, height=32, width=32,
                     clip_skip=1),
                dict(name="no_t5", negative_prompt=None, guidance=5.0, steps=5, height=32, width=32, model="no_t5"),
                dict(name="t5_512", negative_prompt="blurry, dark", guidance=5.0, steps=4, height=32, width=32,
                     max_sequence_length=512),  # T5 at 512 tokens (the pipeline's max_sequence_length; default 256)
                # skip-layer guidance: block 1 of 3 skipped in a third row on loop steps 1-3 of 8 (8 x 0.01 < i < 8 x 0.5)
                dict(name="slg", negative_prompt="blurry, dark", guidance=5.0, steps=8, height=32, width=32,
                     skip_guidance_layers=[1], skip_layer_guidance_scale=3.5, skip_layer_guidance_start=0.01,
                     skip_layer_guidance_stop=0.5)]
        for r in runs:
            p = pipe_no_t5 if r.get("model") == "no_t5" else pipe
            noise = torch.randn(len(PROMPTS), 16, r["height"] // 4, r["width"] // 4, generator=g)
            neg = None if r["negative_prompt"] is None else [r["negative_prompt"]] * len(PROMPTS)
            msl = r.get("max_sequence_length", 256)
            pe, _, pp, _ = p.encode_prompt(PROMPTS, None, None, negative_prompt=neg, do_classifier_free_guidance=False,
                                           clip_skip=r.get("clip_skip"), max_sequence_length=msl)
            slg = {k: r[k] for k in ("skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_start",
                                     "skip_layer_guidance_stop") if k in r}
            lat = p(PROMPTS, negative_prompt=neg, num_inference_steps=r["steps"], guidance_scale=r["guidance"],
                    height=r["height"], width=r["width"], latents=noise.clone(), output_type="latent",
                    clip_skip=r.get("clip_skip"), max_sequence_length=msl, **slg).images
            im = vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor).sample
            im = (im / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
            n = r["name"]
            out[f"pipeline.{n}.initial_noise"] = noise
            out[f"pipeline.{n}.prompt_embeds"] = pe
            out[f"pipeline.{n}.pooled"] = pp
            out[f"pipeline.{n}.final_latents"] = lat
            out[f"pipeline.{n}.image_uint8"] = torch.from_numpy((im * 255).round().clip(0, 255).astype(np.uint8))
        # image-to-image (StableDiffusion3Img2ImgPipeline, the same components): 48x32 starting images; every random
        # draw recorded (the posterior sample, the initial noise); strength 0.6 (the default) and 0.3 (5 x 0.3 = 1.5
        # steps: int(5 - 1.5) = 3 skipped, 2 run -- not SD's int(1.5) = 1)
        from diffusers import StableDiffusion3Img2ImgPipeline
        from diffusers.models.autoencoders import vae as vae_module
        from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_img2img as img2img_module
        from golden_draws import img2img_ramp_runs
        i2i = StableDiffusion3Img2ImgPipeline(transformer=tr, scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok,
                                              text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3,
                                              tokenizer_3=tok3)
        i2i.set_progress_bar_config(disable=True)
        img2img_runs = [dict(name="i2i_default", strength=None, steps=5, guidance=5.0, negative_prompt=None),
                        dict(name="i2i_03", strength=0.3, steps=5, guidance=4.0, negative_prompt="blurry, dark")]
        img2img_ramp_runs(i2i, a.out, a.seed, PROMPTS, img2img_runs, (vae_module, img2img_module), out)
        # inpainting (StableDiffusion3InpaintPipeline, the same components): the default strength 0.6, and 1 (from
        # pure noise) with 4 steps and a negative prompt; its final latents decoded as the other SD3 pipelines do
        # (its own decode drops the VAE's shift_factor: diffusers issue #13611)
        from diffusers import StableDiffusion3InpaintPipeline
        from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_inpaint as inpaint_module
        from golden_draws import inpaint_ramp_runs
        inp = StableDiffusion3InpaintPipeline.from_pipe(i2i)
        inp.set_progress_bar_config(disable=True)
        inpaint_runs = [dict(name="inp_default", strength=None, steps=5, guidance=5.0, negative_prompt=None),
                        dict(name="inp_full", strength=1.0, steps=4, guidance=4.0, negative_prompt="blurry, dark")]
        inpaint_ramp_runs(inp, a.out, PROMPTS, inpaint_runs, (vae_module, inpaint_module), out,
                          decode=lambda lat: vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor).sample)
        # LoRA (last: it changes the shared models): peft adapters on the transformer (rank 4, alpha 8) and the first
        # CLIP encoder (rank 2, alpha 4), saved as diffusers saves them (lora.safetensors, with their metadata); the
        # "plain" run again with them active (scale 1)
        from golden_draws import save_random_lora
        save_random_lora(StableDiffusion3Pipeline, a.out, tr, te, ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "ff.net.0.proj"], a.seed + 500)
        r = runs[0]
        lat = pipe(PROMPTS, num_inference_steps=r["steps"], guidance_scale=r["guidance"], height=r["height"],
                   width=r["width"], latents=out["pipeline.plain.initial_noise"].clone(), output_type="latent").images
        out["pipeline.lora.final_latents"] = lat
        im = vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor).sample
        out["pipeline.lora.image_uint8"] = torch.from_numpy(
            ((im / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8))
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = {"prompts": PROMPTS, "runs": runs, "schedules": schedules, "img2img_runs": img2img_runs, "inpaint_runs": inpaint_runs,
            "source": f"diffusers {diffusers.__version__} StableDiffusion3Pipeline, transformers "
                      f"{transformers.__version__}, torch {torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
