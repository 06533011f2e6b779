"""Shared by the golden generators in this folder: their common options, a recorder of every random draw a diffusers
pipeline makes, and an output folder beside a source model."""
import argparse
import contextlib
import os
import shutil

TINY_SD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "golden", "tiny-sd")


def tiny_sd_args(sdxl_help=None):
    """The generators' common options, parsed: --out (required), --seed (0), --src (a tiny-sd folder, default the one in
    ../shared/golden beside the repository) and, with `sdxl_help`, --sdxl (an SDXL model folder for extra runs)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--src", default=TINY_SD)
    if sdxl_help:
        ap.add_argument("--sdxl", help=sdxl_help)
    return ap.parse_args()


def out_linked_to(out, src_folder):
    """Empties `out` and links out/model to src_folder/model (a reference that reuses a model it does not change);
    returns that model folder's absolute path."""
    src = os.path.abspath(os.path.join(src_folder, "model"))
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    os.symlink(src, os.path.join(out, "model"))
    return src


@contextlib.contextmanager
def recorded_draws(*modules):
    """Within the block, each module's `randn_tensor` (diffusers' helper, imported by name into pipelines and
    schedulers) also appends a copy of every tensor it returns to the yielded list, in the order drawn."""
    from diffusers.utils import torch_utils
    draws, real = [], torch_utils.randn_tensor

    def recording(*args, **kw):
        t = real(*args, **kw)
        draws.append(t.clone())
        return t
    saved = [(m, m.randn_tensor) for m in modules]
    for m, _ in saved:
        m.randn_tensor = recording
    try:
        yield draws
    finally:
        for m, f in saved:
            m.randn_tensor = f


def clip_tokenizers(model, src, pads):
    """Writes model/NAME/ for each (NAME, PAD) of `pads` from the tiny-sd source's CLIP BPE files (its vocab.json,
    merges.txt and tokenizer_config.json with pad_token PAD: "!" for SDXL's and SD3's second tokenizer) and returns
    transformers' CLIPTokenizers read from them, in order."""
    import json
    from transformers import CLIPTokenizer
    out = []
    for name, pad in pads:
        d = os.path.join(model, name)
        os.makedirs(d, exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(src, "tokenizer", f), os.path.join(d, f))
        cfg = json.load(open(os.path.join(src, "tokenizer", "tokenizer_config.json")))
        cfg["pad_token"] = pad
        json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=1)
        out.append(CLIPTokenizer.from_pretrained(d))
    return out


def keep_slow_tokenizer_files(model, pads):
    """After a pipeline's save_pretrained: each CLIP tokenizer folder of `pads` (NAME, PAD) holds the slow tokenizer's
    three files only, its pad_token PAD, as the source ships them (diffpipe reads vocab.json and merges.txt)."""
    import json
    for name, pad in pads:
        d = os.path.join(model, name)
        for f in os.listdir(d):
            if f not in ("vocab.json", "merges.txt", "tokenizer_config.json"):
                os.remove(os.path.join(d, f))
        cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
        cfg["pad_token"] = pad
        json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=1)


def img2img_ramp_runs(pipe, out_dir, seed, prompts, runs, modules, res):
    """SD3's and Flux's image-to-image references: colour ramps with a little noise (48 wide, 32 high), one per prompt,
    written to out_dir/input_K.png, through `pipe` (an Img2Img pipeline) for each run of `runs` (name, steps,
    guidance, strength or None for the pipeline's default, optional negative_prompt) with every random draw of
    `modules` recorded (the VAE posterior's sample, then the initial noise) into res[NAME.draws.K], the images into
    res[NAME.images]."""
    import numpy as np
    import torch
    from PIL import Image
    yy, xx = np.mgrid[0:32, 0:48].astype(np.float32)
    rng = np.random.default_rng(seed)
    images = []
    for k in range(len(prompts)):
        rgb = np.stack([xx / 47, yy / 31, (xx / 47 + yy / 31) / 2 if k == 0 else 1 - xx / 47], -1) * 200 + 30
        im = Image.fromarray((rgb + rng.normal(0, 12, rgb.shape)).clip(0, 255).astype(np.uint8), "RGB")
        im.save(os.path.join(out_dir, f"input_{k}.png"))
        images.append(im)
    for r in runs:
        kw = {} if r["strength"] is None else {"strength": r["strength"]}
        if r.get("negative_prompt") is not None:
            kw["negative_prompt"] = [r["negative_prompt"]] * len(prompts)
        with recorded_draws(*modules) as draws:
            # (height/width: the images' own size; the pipelines resize them to these, by default to their own)
            img = pipe(prompts, image=images, num_inference_steps=r["steps"], height=32, width=48,
                       guidance_scale=r["guidance"], output_type="pt", generator=torch.Generator().manual_seed(5),
                       **kw).images
        assert len(draws) == 2, f"{r['name']}: expected 2 draws (posterior sample, noise), got {len(draws)}"
        for k, d in enumerate(draws):
            res[f"{r['name']}.draws.{k}"] = d
        res[f"{r['name']}.images"] = img


def inpaint_ramp_runs(pipe, out_dir, prompts, runs, modules, res, decode=None):
    """SD3's and Flux's inpainting references (StableDiffusion3InpaintPipeline, FluxInpaintPipeline: a 16-channel
    transformer, the kept region blended back after every step): img2img_ramp_runs' images (out_dir/input_K.png, made
    first) with out_dir/inpaint_mask.png (white where repainted: a 24x16 rectangle at (8, 8) of the 48x32 image, and a
    2-pixel column of grey 127, kept, beside one of 128, repainted), for each run of `runs` (name, steps, guidance,
    strength or None for the pipeline's default, optional negative_prompt), every random draw of `modules` recorded
    by role into res[NAME.draws.ROLE] ("image": the image's posterior sample, "noise", "masked": the masked image's
    sample, which these pipelines draw but their transformers do not read), the images into res[NAME.images].
    `decode` (latents -> images in [-1, 1]), when given, decodes the pipeline's final latents instead of its own
    decoder call (StableDiffusion3InpaintPipeline in diffusers 0.42 decodes without the VAE's shift_factor, which its
    encoder and every other SD3 pipeline apply: diffusers issue #13611, item 1)."""
    import numpy as np
    import torch
    from PIL import Image
    m = np.zeros((32, 48), np.uint8)
    m[8:24, 8:32] = 255
    m[8:24, 32:34] = 127
    m[8:24, 34:36] = 128
    Image.fromarray(m, "L").save(os.path.join(out_dir, "inpaint_mask.png"))
    images = [Image.open(os.path.join(out_dir, f"input_{k}.png")).convert("RGB") for k in range(len(prompts))]
    masks = [Image.fromarray(m, "L")] * len(prompts)
    for r in runs:
        kw = {} if r["strength"] is None else {"strength": r["strength"]}
        if r.get("negative_prompt") is not None:
            kw["negative_prompt"] = [r["negative_prompt"]] * len(prompts)
        with recorded_draws(*modules) as draws:
            img = pipe(prompts, image=images, mask_image=masks, num_inference_steps=r["steps"], height=32, width=48,
                       guidance_scale=r["guidance"], output_type="latent" if decode else "pt",
                       generator=torch.Generator().manual_seed(6), **kw).images
        if decode:
            with torch.no_grad():
                img = (decode(img) / 2 + 0.5).clamp(0, 1)
        assert len(draws) == 3, f"{r['name']}: expected 3 draws (posterior, noise, masked image), got {len(draws)}"
        for role, d in zip(("image", "noise", "masked"), draws):
            res[f"{r['name']}.draws.{role}"] = d
        res[f"{r['name']}.images"] = img
        r["mask"] = "inpaint_mask.png"


def save_random_lora(pipeline_class, out_dir, transformer, text_encoder, targets, seed):
    """SD3's and Flux's LoRA references: peft adapters with random deltas (halved) on `transformer` (rank 4, alpha 8,
    modules `targets`) and `text_encoder` (CLIP: rank 2, alpha 4 on q_proj, v_proj, fc1), left active, saved by
    pipeline_class.save_lora_weights as out_dir/lora.safetensors with their metadata."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    torch.manual_seed(seed)
    tcfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    ecfg = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj", "fc1"])
    transformer.add_adapter(tcfg)
    inject_adapter_in_model(ecfg, text_encoder)
    with torch.no_grad():
        for n, prm in list(transformer.named_parameters()) + list(text_encoder.named_parameters()):
            if "lora_" in n:
                prm.mul_(0.5)
    pipeline_class.save_lora_weights(out_dir, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
                                     weight_name="lora.safetensors", transformer_lora_adapter_metadata=tcfg.to_dict(),
                                     text_encoder_lora_adapter_metadata=ecfg.to_dict())
