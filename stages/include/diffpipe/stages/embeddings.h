// Textual inversion: learned token embeddings (diffusers' load_textual_inversion) added to a folder's tokenizers and
// CLIP text encoders at load time. Reads safetensors files in diffusers' layout ({"<token>": [D] or [n, D]}), the
// A1111/kohya layout ({"emb_params": [n, D]}) and SDXL's ({"clip_l": [n, 768], "clip_g": [n, 1280]}). A token of n
// vectors is n new tokens, TOKEN, TOKEN_1 ... TOKEN_{n-1}; TOKEN in a prompt stands for all n (diffusers'
// maybe_convert_prompt), TOKEN_k for its own. Thread-safety: plain functions; results are read-only.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "diffpipe/stages/lora_spec.h"

namespace diffpipe {

struct TextualInversion {
  std::string token;     // as prompts write it
  std::string file;      // where it came from
  at::Tensor vectors;    // [n, D] for text_encoder (float32, CPU)
  at::Tensor vectors_2;  // [n, D2] for SDXL's text_encoder_2 (undefined on other folders)
};

// Reads every spec against the model folder's text encoder configs (hidden sizes; SDXL's two); throws naming the file
// for a format it does not know (pickled .pt/.bin included), vectors of the wrong width, a missing clip_g/clip_l on
// SDXL, a token the tokenizer already has, or one given twice.
std::vector<TextualInversion> read_embeddings(const std::vector<EmbeddingSpec>& specs, const std::string& model_dir);

}  // namespace diffpipe
