// LoRA (low-rank adaptation) files fused into a model folder's weights at load time: W += scale x alpha / rank x
// up @ down for every layer a file names (linear layers and convolutions, the UNet or SD3/Flux transformer and the text
// encoders). Reads diffusers' own format (peft keys "unet.<module>.lora_A.weight" / "lora_B.weight",
// "transformer.<module>...", "text_encoder.<module>...",
// ranks and alphas in the "lora_adapter_metadata" header; none: alpha = rank) and kohya-ss's
// ("lora_unet_<module_with_underscores>.lora_down.weight" / "lora_up.weight" / ".alpha", "lora_te_...",
// "lora_te1_"/"lora_te2_" for SDXL's two text encoders), resolving modules against the folder's own weight names.
// Thread-safety: plain functions; the result is read-only.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "diffpipe/stages/lora_spec.h"

namespace diffpipe {

class Weights;

// One layer's update, scale and alpha / rank already folded in: weight += scale_alpha x up @ down.
struct LoraLayer {
  std::string component;   // "unet", "transformer", "text_encoder", "text_encoder_2"
  std::string weight_key;  // the weight it changes, e.g. "down_blocks.0.attentions.0.proj_in.weight"
  at::Tensor down, up;     // [r, in], [out, r] (convolutions flattened), as the file stores them (mapped, not read
                           // until applied)
  double factor = 1.0;     // scale x alpha / rank (rsLoRA: alpha / sqrt(rank))
  int adapter = -1;        // -1: fused into the weight; >= 0: per-request adapter number (ModelAddons::adapters)
};

// Reads `spec` against the model folder `model_dir` (its components' weight names and shapes, from the safetensors
// headers: cheap, every rank checks). Throws naming the file and the key for an unknown format, a module that
// names no layer of the folder, a lora_A/lora_B (down/up) without its pair, ranks that disagree, shapes that do not
// fit the layer, and options this does not implement (DoRA, per-module alpha patterns).
std::vector<LoraLayer> read_lora(const LoraSpec& spec, const std::string& model_dir);

// Adds every fused layer of `component` to `w` (float32 arithmetic, then the weight's own dtype and device) and
// attaches every adapter layer as a branch of its weight (Weights::add_branch). Returns how many layers it applied.
size_t apply_lora(Weights& w, const std::vector<LoraLayer>& layers, const std::string& component);

}  // namespace diffpipe
