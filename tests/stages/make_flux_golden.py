#!/usr/bin/env python3
"""Makes a tiny FLUX.1 reference folder with diffusers (FluxPipeline), for the GoldenFlux tests:

    python3 tests/stages/make_flux_golden.py --out DIR [--seed 0]
    DIFFPIPE_GOLDEN_FLUX=DIR ./build/tests/test_stages --gtest_filter='GoldenFlux.*'

DIR/model/ is a diffusers Flux folder (random weights) laid out as FLUX.1-dev at a tiny size: tokenizer/ +
text_encoder/ (CLIPTextModel, hidden 32: its pooled output), tokenizer_2/ + text_encoder_2/ (make_t5_golden.make_t5,
d_model 48: the prompt's tokens), transformer/ (FluxTransformer2DModel: 2 double-stream and 2 single-stream blocks, 2
heads of 16, rotary axes (4, 6, 6), guidance_embeds), vae/ (AutoencoderKL, 4 latent channels, no quant convs, Flux's
scaling 0.3611 and shift 0.1159), scheduler/ (FlowMatchEulerDiscreteScheduler as FLUX.1-dev ships it: shift 3,
use_dynamic_shifting). DIR/transformer_schnell/: the same without guidance_embeds (FLUX.1-schnell's form).
DIR/golden.safetensors (float32 unless noted):
  text_encoder.input_ids (i64) -> text_encoder.pooled; text_encoder_2.input_ids (i64, 512) -> text_encoder_2.out;
  transformer.{latents [B, 4, h, w] (unpacked), timestep (sigma), encoder_hidden_states, pooled, guidance} ->
  transformer.out (unpacked), transformer_schnell.out (no guidance);
  for each pipeline run R: pipeline.R.initial_noise [B, 4, h, w], pipeline.R.final_latents (unpacked),
  pipeline.R.image_uint8 (u8, HWC) (run "true_cfg": a negative prompt and true_cfg_scale 4; "t5_256": 256 T5 tokens); for each image-to-image run R of golden.json's img2img_runs (FluxImg2ImgPipeline
  from DIR/input_K.png): R.draws.0 (the VAE posterior's sample), R.draws.1 (the initial noise, unpacked), R.images
  ([B, 3, H, W] in [0, 1]); for each inpainting run R of golden.json's inpaint_runs (the same images, DIR/inpaint_mask.png):
  R.draws.image / .noise / .masked, R.images; pipeline.lora.final_latents and .image_uint8: run "plain" with DIR/lora.safetensors active
  (transformer and CLIP, scale 1); pipeline.lora_kohya.*: the same with DIR/lora_kohya.safetensors (kohya-ss's format
  of FLUX.1 LoRAs, converted by diffusers' load_lora_weights).
"""
import json
import os
import shutil

import numpy as np
import torch

from golden_draws import tiny_sd_args
from make_t5_golden import make_t5

PROMPTS = ["a red circle on a blue square", "a small green triangle, top left"]


def kohya_flux_lora(seed, D=32, r=4):
    """A FLUX.1 LoRA as kohya-ss's sd-scripts saves one (the original model's layer names, fused projections, alphas)
    for the tiny transformer (inner width D): a block-sparse fused img qkv (each projection its own rank-r block), a
    dense fused txt qkv (one rank-r down shared), single layers of either block kind, the modulations and a layer
    without alpha. Not the embedders or the final layer: diffusers 0.42's converter names those without the
    "transformer." prefix and its loader then drops them silently (diffpipe applies them; test_golden_flux.cpp checks
    them against equivalent diffusers keys), nor a single block's linear1 (its converter assumes FLUX.1's widths)."""
    import torch
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.1
    sd = {}

    def add(name, down, up, alpha):
        sd[f"lora_unet_{name}.lora_down.weight"] = down
        sd[f"lora_unet_{name}.lora_up.weight"] = up
        if alpha is not None:
            sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(alpha))
    up = torch.zeros(3 * D, 3 * r)
    for k in range(3):
        up[k * D:(k + 1) * D, k * r:(k + 1) * r] = rnd(D, r)
    add("double_blocks_0_img_attn_qkv", rnd(3 * r, D), up, 6)
    for name, out, inn, alpha in (("double_blocks_0_txt_attn_qkv", 3 * D, D, 4), ("double_blocks_1_img_attn_proj", D, D, 2),
                                  ("double_blocks_1_txt_mlp_0", 4 * D, D, None), ("double_blocks_0_img_mod_lin", 6 * D, D, 8),
                                  ("single_blocks_1_linear2", D, 5 * D, 4), ("single_blocks_0_modulation_lin", 3 * D, D, 4)):
        add(name, rnd(r, inn), rnd(out, r), alpha)
    return sd


def xlabs_flux_lora(seed, D=32, r=4):
    """A FLUX.1 LoRA as XLabs-AI's trainer saves one (x-flux: its attention processors' qkv_lora / proj_lora, no
    alphas, lora_weight 1) for the tiny transformer (inner width D): both double blocks' image and text qkv (fused:
    one down, up rows split q/k/v) and output projections, block 1 under the "diffusion_model." prefix some files
    carry, and single block 0's qkv (three parts, not kohya's linear1 of four)."""
    import torch
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.1
    sd = {}
    for b, prefix in ((0, ""), (1, "diffusion_model.")):
        for name, out in (("qkv_lora1", 3 * D), ("qkv_lora2", 3 * D), ("proj_lora1", D), ("proj_lora2", D)):
            sd[f"{prefix}double_blocks.{b}.processor.{name}.down.weight"] = rnd(r, D)
            sd[f"{prefix}double_blocks.{b}.processor.{name}.up.weight"] = rnd(out, r)
    sd["single_blocks.0.processor.qkv_lora.down.weight"] = rnd(r, D)
    sd["single_blocks.0.processor.qkv_lora.up.weight"] = rnd(3 * D, r)
    return sd


def main():
    a = tiny_sd_args()
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    src = os.path.join(a.src, "model")
    model = os.path.join(a.out, "model")
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.makedirs(os.path.join(model, "tokenizer"))
    torch.manual_seed(a.seed)

    def nudged(m, scale=0.02):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * scale)
        return m.eval()

    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, "tokenizer", f), os.path.join(model, "tokenizer", f))
    tok = CLIPTokenizer.from_pretrained(os.path.join(model, "tokenizer"))
    te = nudged(CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                             num_attention_heads=4, hidden_act="quick_gelu", vocab_size=49408,
                                             max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                             pad_token_id=1)))
    tok2, te2 = make_t5(os.path.join(a.out, "t5tmp", "tokenizer"), os.path.join(a.out, "t5tmp", "text_encoder"),
                        a.seed, os.path.join(src, "tokenizer", "vocab.json"), d_model=48)
    torch.manual_seed(a.seed + 10)
    shape = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    tr = nudged(FluxTransformer2DModel(guidance_embeds=True, **shape), 0.05)
    schnell = nudged(FluxTransformer2DModel(guidance_embeds=False, **shape), 0.05)
    schnell.save_pretrained(os.path.join(a.out, "transformer_schnell"))
    vae = nudged(AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True), 0.02)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                        tokenizer_2=tok2, transformer=tr)
    pipe.save_pretrained(model)
    shutil.rmtree(os.path.join(a.out, "t5tmp"))
    for f in os.listdir(os.path.join(model, "tokenizer")):  # the slow tokenizer's files, as the source ships them
        os.remove(os.path.join(model, "tokenizer", f))
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, "tokenizer", f), os.path.join(model, "tokenizer", f))
    pipe.set_progress_bar_config(disable=True)

    out = {}
    g = torch.Generator().manual_seed(a.seed + 1)
    with torch.no_grad():
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out["text_encoder.input_ids"] = ids
        out["text_encoder.pooled"] = te(ids, output_hidden_states=False).pooler_output
        ids2 = tok2(PROMPTS, padding="max_length", max_length=512, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids
        out["text_encoder_2.input_ids"] = ids2
        out["text_encoder_2.out"] = te2(ids2, output_hidden_states=False)[0]

        # the transformer alone on unpacked 8x6 latents (4x3 tokens), three timesteps and guidance scales
        lat = torch.randn(3, 4, 8, 6, generator=g)
        ts = torch.tensor([1.0, 0.53125, 0.0125])
        ehs = torch.randn(3, 11, 48, generator=g)
        pooled = torch.randn(3, 32, generator=g)
        gd = torch.tensor([3.5, 1.0, 7.25])
        packed = FluxPipeline._pack_latents(lat, 3, 4, 8, 6)
        img_ids = FluxPipeline._prepare_latent_image_ids(3, 4, 3, "cpu", torch.float32)
        txt_ids = torch.zeros(11, 3)
        for name, m, guid in (("transformer", tr, gd), ("transformer_schnell", schnell, None)):
            o = m(packed, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=ts, img_ids=img_ids,
                  txt_ids=txt_ids, guidance=guid).sample
            out[f"{name}.out"] = FluxPipeline._unpack_latents(o, 32, 24, 4)  # (pixel size, vae_scale_factor)
        out.update({"transformer.latents": lat, "transformer.timestep": ts, "transformer.encoder_hidden_states": ehs,
                    "transformer.pooled": pooled, "transformer.guidance": gd})

        # "true_cfg": FluxPipeline's true CFG (an unconditional pass on the negative prompt, mixed at true_cfg_scale,
        # the guidance still embedded in both passes)
        runs = [dict(name="plain", guidance=3.5, steps=4, height=32, width=32),
                dict(name="wide", guidance=5.0, steps=3, height=32, width=48),
                dict(name="true_cfg", guidance=3.5, steps=3, height=32, width=32,
                     negative_prompt="a blurry dark photograph", true_cfg_scale=4.0),
                dict(name="t5_256", guidance=3.5, steps=3, height=32, width=32, max_sequence_length=256)]
        for r in runs:
            noise = torch.randn(len(PROMPTS), 4, r["height"] // 4, r["width"] // 4, generator=g)
            packed = FluxPipeline._pack_latents(noise, len(PROMPTS), 4, r["height"] // 4, r["width"] // 4)
            kw = {}
            if "true_cfg_scale" in r:
                kw = dict(negative_prompt=[r["negative_prompt"]] * len(PROMPTS), true_cfg_scale=r["true_cfg_scale"])
            if "max_sequence_length" in r:  # T5 tokens per prompt (FluxPipeline's max_sequence_length)
                kw["max_sequence_length"] = r["max_sequence_length"]
            lat = pipe(PROMPTS, num_inference_steps=r["steps"], guidance_scale=r["guidance"], height=r["height"],
                       width=r["width"], latents=packed.clone(), output_type="latent", **kw).images
            lat = FluxPipeline._unpack_latents(lat, r["height"], r["width"], 4)
            im = vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor).sample
            im = (im / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
            n = r["name"]
            out[f"pipeline.{n}.initial_noise"] = noise
            out[f"pipeline.{n}.final_latents"] = lat
            out[f"pipeline.{n}.image_uint8"] = torch.from_numpy((im * 255).round().clip(0, 255).astype(np.uint8))
        # image-to-image (FluxImg2ImgPipeline, the same components): 48x32 starting images, both random draws
        # recorded (the posterior sample, the initial noise); the default strength 0.6 and 0.3
        from diffusers import FluxImg2ImgPipeline
        from diffusers.models.autoencoders import vae as vae_module
        from diffusers.pipelines.flux import pipeline_flux_img2img as img2img_module
        from golden_draws import img2img_ramp_runs
        i2i = FluxImg2ImgPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                                  tokenizer_2=tok2, transformer=tr)
        i2i.set_progress_bar_config(disable=True)
        img2img_runs = [dict(name="i2i_default", strength=None, steps=5, guidance=3.5),
                        dict(name="i2i_03", strength=0.3, steps=5, guidance=5.0)]
        img2img_ramp_runs(i2i, a.out, a.seed, PROMPTS, img2img_runs, (vae_module, img2img_module), out)
        # inpainting (FluxInpaintPipeline, the same components): the default strength 0.6, and 1 (from pure noise)
        # with 4 steps
        from diffusers import FluxInpaintPipeline
        from diffusers.pipelines.flux import pipeline_flux_inpaint as inpaint_module
        from golden_draws import inpaint_ramp_runs
        inp = FluxInpaintPipeline.from_pipe(i2i)
        inp.set_progress_bar_config(disable=True)
        inpaint_runs = [dict(name="inp_default", strength=None, steps=5, guidance=3.5),
                        dict(name="inp_full", strength=1.0, steps=4, guidance=3.5)]
        inpaint_ramp_runs(inp, a.out, PROMPTS, inpaint_runs, (vae_module, inpaint_module), out)
        # LoRA (last: it changes the shared models): peft adapters on the transformer (rank 4, alpha 8) and the first
        # CLIP encoder (rank 2, alpha 4), saved as diffusers saves them (lora.safetensors, with their metadata); the
        # "plain" run again with them active (scale 1)
        from golden_draws import save_random_lora
        save_random_lora(FluxPipeline, a.out, tr, te, ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "proj_mlp", "ff.net.0.proj"], a.seed + 500)
        r = runs[0]
        lat = pipe(PROMPTS, num_inference_steps=r["steps"], guidance_scale=r["guidance"], height=r["height"],
                   width=r["width"], output_type="latent",
                   latents=FluxPipeline._pack_latents(out["pipeline.plain.initial_noise"].clone(), 2, 4, 8, 8)).images
        lat = FluxPipeline._unpack_latents(lat, r["height"], r["width"], 4)
        out["pipeline.lora.final_latents"] = lat
        im = vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor).sample
        out["pipeline.lora.image_uint8"] = torch.from_numpy(
            ((im / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8))
        # kohya-ss's FLUX.1 format (lora_kohya.safetensors) and XLabs-AI's (lora_xlabs.safetensors), each through
        # diffusers' own converter on a fresh pipeline: run "plain" again with it (pipeline.lora_kohya.*, .lora_xlabs.*)
        for name, sd in (("lora_kohya", kohya_flux_lora(a.seed + 600)), ("lora_xlabs", xlabs_flux_lora(a.seed + 700))):
            save_file(sd, os.path.join(a.out, f"{name}.safetensors"))
            fresh = FluxPipeline.from_pretrained(model)
            fresh.set_progress_bar_config(disable=True)
            fresh.load_lora_weights(os.path.join(a.out, f"{name}.safetensors"))
            lat = fresh(PROMPTS, num_inference_steps=r["steps"], guidance_scale=r["guidance"], height=r["height"],
                        width=r["width"], output_type="latent",
                        latents=FluxPipeline._pack_latents(out["pipeline.plain.initial_noise"].clone(), 2, 4, 8,
                                                           8)).images
            lat = FluxPipeline._unpack_latents(lat, r["height"], r["width"], 4)
            out[f"pipeline.{name}.final_latents"] = lat
            im = fresh.vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor).sample
            out[f"pipeline.{name}.image_uint8"] = torch.from_numpy(
                ((im / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8))
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = {"prompts": PROMPTS, "runs": runs, "img2img_runs": img2img_runs, "inpaint_runs": inpaint_runs,
            "source": f"diffusers {diffusers.__version__} FluxPipeline, transformers {transformers.__version__}, "
                      f"torch {torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
