#!/usr/bin/env python3
"""Makes a LoRA reference with diffusers (load_lora_weights + fuse_lora, peft) on the tiny-sd folder, for the
GoldenLora tests:

    python3 tests/stages/make_lora_golden.py --out DIR [--src ../shared/golden/tiny-sd] [--seed 0]
    DIFFPIPE_GOLDEN_LORA=DIR ./build/tests/test_stages --gtest_filter='GoldenLora.*'

DIR/model links to the source folder. DIR/lora_peft.safetensors: a random LoRA in diffusers' own format (peft keys
"unet.<module>.lora_A.weight" / "lora_B.weight", "text_encoder.<module>...", ranks and alphas in the
"lora_adapter_metadata" header: UNet rank 4, alpha 8 on attention projections, proj_in, the feed-forward input and the
resnets' conv1 (3x3 convolutions); text encoder rank 2, alpha 4 on q_proj, v_proj, fc1). DIR/lora_kohya.safetensors:
the same deltas in kohya-ss's format ("lora_unet_<module_with_underscores>.lora_down.weight" / "lora_up.weight" /
".alpha", "lora_te_text_model_..."), as most published SD 1.x LoRAs are; DIR/lora_kohya_unet.safetensors its UNet part
(diffusers here drops converted kohya text-encoder keys, so its kohya run has the UNet part only). DIR/golden.safetensors: for each run R of
golden.json (a file and a scale, diffusers fuse_lora(lora_scale)), R.images [B, 3, 32, 32] in [0, 1] made from the
given initial latents `latents` [B, 4, 8, 8] (DDIM, 4 steps, guidance 7.5), and `base.images` without a LoRA.
Textual inversion (golden.json's textual_inversion, ti.images): see textual_inversion_run.
"""
import json
import os

import torch

from golden_draws import out_linked_to, tiny_sd_args

PROMPTS = ["a red circle above a blue square", "two small green triangles"]


def textual_inversion_run(a, fresh, latents, res):
    """Textual inversion (load_textual_inversion): DIR/ti_shape.safetensors in diffusers' layout (one vector under
    the key "<shape-style>") and DIR/ti_multi.safetensors in A1111's (emb_params, two vectors, loaded as the token
    "badstyle": the prompt's "badstyle" becomes "badstyle badstyle_1"); the prompts below, a negative prompt using
    the second; the token ids of `texts` (as the pipeline converts and tokenizes them) and the images."""
    from safetensors.torch import save_file
    p = fresh()
    D = p.text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(a.seed + 700)
    save_file({"<shape-style>": torch.randn(D, generator=g) * 0.5}, os.path.join(a.out, "ti_shape.safetensors"))
    save_file({"emb_params": torch.randn(2, D, generator=g) * 0.5}, os.path.join(a.out, "ti_multi.safetensors"))
    p.load_textual_inversion(os.path.join(a.out, "ti_shape.safetensors"))
    p.load_textual_inversion(os.path.join(a.out, "ti_multi.safetensors"), token="badstyle")
    prompts = ["a <shape-style> circle above a blue square", "two small green triangles, badstyle"]
    # (not "badstyle_1" written out: maybe_convert_prompt's text replacement turns it into "badstyle badstyle_1_1")
    texts = prompts + ["A RED <Shape-Style>circle", "badstyle and badstyle,<shape-style>", "plain words only"]
    ids = [p.tokenizer(p.maybe_convert_prompt(t, p.tokenizer)).input_ids for t in texts]
    with torch.no_grad():
        res["ti.images"] = p(prompts, negative_prompt=["badstyle"] * len(prompts), num_inference_steps=4,
                             guidance_scale=7.5, latents=latents.clone(), output_type="pt").images
    return {"files": [{"file": "ti_shape.safetensors", "token": None},
                      {"file": "ti_multi.safetensors", "token": "badstyle"}],
            "prompts": prompts, "negative_prompt": "badstyle", "texts": texts, "ids": ids}


def main():
    a = tiny_sd_args("an SDXL model folder for the kohya/SGM-named run")
    import diffusers
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    src = out_linked_to(a.out, a.src)

    def fresh():
        p = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
        p.set_progress_bar_config(disable=True)
        return p

    # the LoRA: random deltas large enough to change the images
    pipe = fresh()
    torch.manual_seed(a.seed + 500)
    ucfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1"])
    tcfg = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj", "fc1"])
    pipe.unet.add_adapter(ucfg)
    inject_adapter_in_model(tcfg, pipe.text_encoder)
    with torch.no_grad():
        for n, prm in list(pipe.unet.named_parameters()) + list(pipe.text_encoder.named_parameters()):
            if "lora_" in n:
                prm.mul_(0.5)
    u, t = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(a.out, unet_lora_layers=u, text_encoder_lora_layers=t,
                                              weight_name="lora_peft.safetensors",
                                              unet_lora_adapter_metadata=ucfg.to_dict(),
                                              text_encoder_lora_adapter_metadata=tcfg.to_dict())
    # the same deltas as kohya-ss names them (text encoder modules under text_model., as transformers 4 named them)
    peft = load_file(os.path.join(a.out, "lora_peft.safetensors"))
    kohya = {}
    for k, v in peft.items():
        comp, rest = k.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        if comp == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module
        name = ("lora_unet_" if comp == "unet" else "lora_te_") + module.replace(".", "_")
        kohya[name + (".lora_down.weight" if kind.startswith("A") else ".lora_up.weight")] = v
        kohya[name + ".alpha"] = torch.tensor(float(ucfg.lora_alpha if comp == "unet" else tcfg.lora_alpha))
    save_file(kohya, os.path.join(a.out, "lora_kohya.safetensors"))
    # diffusers 0.42 with transformers 5 drops converted kohya text-encoder keys (it warns "UNEXPECTED"), so its
    # kohya image reference uses the UNet's part alone; the text encoder's kohya keys are checked against the peft file
    save_file({k: v for k, v in kohya.items() if k.startswith("lora_unet_")},
              os.path.join(a.out, "lora_kohya_unet.safetensors"))

    g = torch.Generator().manual_seed(a.seed + 9)
    latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=g)
    res = {"latents": latents}
    runs = [dict(name="peft_07", file="lora_peft.safetensors", scale=0.7),
            dict(name="kohya_unet_10", file="lora_kohya_unet.safetensors", scale=1.0)]
    for r in [dict(name="base", file=None, scale=0.0)] + runs:
        p = fresh()
        if r["file"]:
            p.load_lora_weights(a.out, weight_name=r["file"])
            p.fuse_lora(lora_scale=r["scale"])
        with torch.no_grad():
            img = p(PROMPTS, num_inference_steps=4, guidance_scale=7.5, latents=latents.clone(),
                    output_type="pt").images
        res[f"{r['name']}.images"] = img
    ti = textual_inversion_run(a, fresh, latents, res)
    sdxl = sdxl_run(a, res) if a.sdxl else None
    save_file({k: v.contiguous() for k, v in res.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = {"prompts": PROMPTS, "steps": 4, "guidance": 7.5, "runs": runs, "sdxl": sdxl, "textual_inversion": ti,
            "source": f"diffusers {diffusers.__version__} load_lora_weights + fuse_lora on {a.src}, "
                      f"torch {torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta))


RESNET_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sgm_module(m, layers, up_layers, up_attn):
    """A diffusers UNet module path in the original (SGM/LDM) layout's names, as kohya-ss names SDXL LoRAs."""
    p = m.split(".")
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if m in fixed:
        return fixed[m]

    def inner(kind, rest):
        return (RESNET_SGM[rest[0]] + "." * (len(rest) > 1) + ".".join(rest[1:])) if kind == "resnets" else ".".join(rest)
    if p[0] == "down_blocks":
        b = int(p[1])
        start = 1 + sum(l + 1 for l in layers[:b])
        if p[2] == "downsamplers":
            return f"input_blocks.{start + layers[b]}.0.op"
        j = int(p[3])
        return f"input_blocks.{start + j}.{0 if p[2] == 'resnets' else 1}." + inner(p[2], p[4:])
    if p[0] == "mid_block":
        idx = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(p[1], p[2])]
        return f"middle_block.{idx}." + inner(p[1], p[3:])
    if p[0] == "up_blocks":
        b = int(p[1])
        start = sum(up_layers[:b])
        if p[2] == "upsamplers":
            return f"output_blocks.{start + up_layers[b] - 1}.{2 if up_attn[b] else 1}.conv"
        j = int(p[3])
        return f"output_blocks.{start + j}.{0 if p[2] == 'resnets' else 1}." + inner(p[2], p[4:])
    raise ValueError(m)


def sdxl_run(a, res):
    """A random LoRA on an SDXL UNet, saved in diffusers' format and in kohya's SGM-layout names; diffusers must give
    the same images from both (which checks the SGM naming here against its own conversion back)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def fresh():
        p = StableDiffusionXLPipeline.from_pretrained(a.sdxl)
        p.set_progress_bar_config(disable=True)
        return p
    pipe = fresh()
    torch.manual_seed(a.seed + 700)
    cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                     target_modules=["to_q", "to_v", "proj_in", "conv1", "conv2", "ff.net.0.proj", "linear_1"])
    pipe.unet.add_adapter(cfg)
    with torch.no_grad():
        for n, prm in pipe.unet.named_parameters():
            if "lora_" in n:
                prm.mul_(0.5)
    StableDiffusionXLPipeline.save_lora_weights(a.out, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                                weight_name="lora_sdxl_peft.safetensors",
                                                unet_lora_adapter_metadata=cfg.to_dict())
    uc = pipe.unet.config
    layers = [uc.layers_per_block] * len(uc.block_out_channels) if isinstance(uc.layers_per_block, int) \
        else list(uc.layers_per_block)
    up_layers = [l + 1 for l in reversed(layers)]
    up_attn = ["CrossAttn" in t for t in uc.up_block_types]
    kohya = {}
    for k, v in load_file(os.path.join(a.out, "lora_sdxl_peft.safetensors")).items():
        module, kind = k.split(".", 1)[1].rsplit(".lora_", 1)
        name = "lora_unet_" + sgm_module(module, layers, up_layers, up_attn).replace(".", "_")
        kohya[name + (".lora_down.weight" if kind.startswith("A") else ".lora_up.weight")] = v
        kohya[name + ".alpha"] = torch.tensor(float(cfg.lora_alpha))
    save_file(kohya, os.path.join(a.out, "lora_sdxl_kohya.safetensors"))
    g = torch.Generator().manual_seed(a.seed + 10)
    latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=g)
    res["sdxl.latents"] = latents
    images = {}
    for f in ["lora_sdxl_peft.safetensors", "lora_sdxl_kohya.safetensors"]:
        p = fresh()
        p.load_lora_weights(a.out, weight_name=f)
        p.fuse_lora(lora_scale=0.8)
        with torch.no_grad():
            images[f] = p(PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=latents.clone(), height=32,
                          width=32, output_type="pt").images
    diff = float((images["lora_sdxl_peft.safetensors"] - images["lora_sdxl_kohya.safetensors"]).abs().max())
    assert diff < 1e-4, f"diffusers reads the SGM-named file differently from the peft one: {diff}"
    res["sdxl.images"] = images["lora_sdxl_kohya.safetensors"]
    # textual inversion in SDXL's layout (clip_l / clip_g, two vectors each), loaded into both text encoders as
    # diffusers' SDXL documentation does, the token "xlstyle"
    p = fresh()
    g = torch.Generator().manual_seed(a.seed + 701)
    emb = {"clip_l": torch.randn(2, p.text_encoder.config.hidden_size, generator=g) * 0.5,
           "clip_g": torch.randn(2, p.text_encoder_2.config.hidden_size, generator=g) * 0.5}
    save_file(emb, os.path.join(a.out, "ti_sdxl.safetensors"))
    p.load_textual_inversion(emb["clip_l"], token="xlstyle", text_encoder=p.text_encoder, tokenizer=p.tokenizer)
    p.load_textual_inversion(emb["clip_g"], token="xlstyle", text_encoder=p.text_encoder_2, tokenizer=p.tokenizer_2)
    ti_prompts = ["a red circle, xlstyle", "xlstyle: two small green triangles"]
    with torch.no_grad():
        res["sdxl.ti.images"] = p(ti_prompts, num_inference_steps=4, guidance_scale=5.0, latents=latents.clone(),
                                  height=32, width=32, output_type="pt").images
    return dict(model=os.path.abspath(a.sdxl), file="lora_sdxl_kohya.safetensors", scale=0.8, steps=4, guidance=5.0,
                size=32, ti=dict(file="ti_sdxl.safetensors", token="xlstyle", prompts=ti_prompts))


if __name__ == "__main__":
    main()
