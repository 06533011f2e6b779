// Which LoRA files a run fuses into its model, and how strongly (stages/lora.h reads and applies them), which it
// keeps as adapters a request may choose, and which ControlNet it loads beside it. No LibTorch.
#pragma once
#include <string>
#include <vector>

namespace diffpipe {

struct LoraSpec {
  std::string path;
  double scale = 1.0;
};
// "FILE" or "FILE:SCALE" (a number after the last ':'); throws naming the text when the scale is not a finite number.
LoraSpec parse_lora_spec(const std::string& text);
// A comma-separated list of those ("" = none).
std::vector<LoraSpec> parse_lora_list(const std::string& text);

// Comma-separated entries ("" = none); an empty entry throws "WHAT: an empty entry in "TEXT" (FORM)".
std::vector<std::string> parse_path_list(const std::string& text, const std::string& what, const std::string& form);

// A LoRA file that requests may choose by name (per-request adapters, --lora-adapters), kept apart from the weights.
struct LoraAdapter {
  std::string name;
  std::string path;
};
// "NAME=FILE,..." (a FILE alone is named after its file name without .safetensors); throws naming the entry for an
// empty name or file, or a name given twice.
std::vector<LoraAdapter> parse_lora_adapters(const std::string& text);

// A textual-inversion file (stages/embeddings.h) and the token prompts use for it ("" = the file's own name for it:
// a diffusers file's key, else the file name without .safetensors).
struct EmbeddingSpec {
  std::string path;
  std::string token;
};
// "FILE[:TOKEN],..." ("" = none).
std::vector<EmbeddingSpec> parse_embedding_list(const std::string& text);

// What a run adds to a model folder as it loads: LoRA files fused into its weights, adapters requests may choose,
// ControlNet folders beside it.
struct ModelAddons {
  std::vector<LoraSpec> loras;
  // ControlNetModel folders (config.json + diffusion_pytorch_model.safetensors); requests' controls entries in order
  std::vector<std::string> controlnets;
  std::vector<LoraAdapter> adapters;
  std::vector<EmbeddingSpec> embeddings;  // textual inversion: tokens added to the tokenizers and text encoders
  // IP-Adapter (ip_adapter.h): the adapter file ("" = none) and its image encoder folder ("" = image_encoder/ beside
  // the file); requests bring their image prompt (GenerationParams::ip_adapter_image)
  std::string ip_adapter, ip_image_encoder;
  // SDXL refiner (an SDXL folder, typically stable-diffusion-xl-refiner-1.0; "" = none): the base's latents go on to
  // its UNet (the refine stage, between denoise and decode; GenerationParams::denoising_end)
  std::string refiner;
  // Kandinsky 2.2: the prior's folder (a KandinskyV22PriorPipeline, kandinsky-2-2-prior's layout) beside a decoder
  // folder (KandinskyV22Pipeline); "" = the model folder's own prior_* components (KandinskyV22CombinedPipeline)
  std::string prior;
  // SD3 and FLUX.1: T5 tokens per prompt, the pipelines' max_sequence_length, in [1, 512] (0 = their default: SD3 256,
  // FLUX.1 512; FLUX.1-schnell is commonly run at 256). Fewer tokens: a shorter joint sequence, a faster transformer.
  int max_sequence_length = 0;
};

}  // namespace diffpipe
