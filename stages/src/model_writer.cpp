#include "diffpipe/stages/model_writer.h"

#include <sys/stat.h>

#include <fstream>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/super_res.h"
#include "diffpipe/stages/unet.h"
#include "diffpipe/stages/vae.h"

namespace diffpipe {

namespace {

std::string byte_symbol(int b) {  // bytes_to_unicode, as UTF-8
  static const std::vector<std::string> table = [] {
    std::vector<int> cp(256, -1);
    for (int x = '!'; x <= '~'; ++x) cp[x] = x;
    for (int x = 0xA1; x <= 0xAC; ++x) cp[x] = x;
    for (int x = 0xAE; x <= 0xFF; ++x) cp[x] = x;
    int n = 0;
    for (int x = 0; x < 256; ++x)
      if (cp[x] < 0) cp[x] = 256 + n++;
    std::vector<std::string> out(256);
    for (int x = 0; x < 256; ++x) {
      const int c = cp[x];
      std::string s;
      if (c < 0x80) s += static_cast<char>(c);
      else {
        s += static_cast<char>(0xC0 | (c >> 6));
        s += static_cast<char>(0x80 | (c & 0x3F));
      }
      out[x] = s;
    }
    return out;
  }();
  return table[b];
}
}  // namespace

void write_json(const std::string& path, const nlohmann::json& j) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    DP_CHECK(f.good(), tmp, ": cannot open for writing");
    f << j.dump(2) << "\n";
    DP_CHECK(f.good(), tmp, ": write failed");
  }
  DP_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, path, ": rename failed");
}

int64_t write_clip_tokenizer(const std::string& dir, const std::vector<std::string>& merges) {
  make_dirs(dir);
  nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
  int64_t id = 0;
  for (int b = 0; b < 256; ++b) vocab[byte_symbol(b)] = id++;
  for (int b = 0; b < 256; ++b) vocab[byte_symbol(b) + "</w>"] = id++;
  for (const auto& m : merges) {
    const auto sp = m.find(' ');
    DP_CHECK(sp != std::string::npos, "tokenizer merge '", m, "' needs two symbols");
    const std::string merged = m.substr(0, sp) + m.substr(sp + 1);
    if (!vocab.contains(merged)) vocab[merged] = id++;
  }
  vocab["<|startoftext|>"] = id++;
  vocab["<|endoftext|>"] = id++;
  {
    std::ofstream f(path_join(dir, "vocab.json"));
    f << vocab.dump() << "\n";
  }
  {
    std::ofstream f(path_join(dir, "merges.txt"));
    f << "#version: 0.2\n";
    for (const auto& m : merges) f << m << "\n";
  }
  write_json(path_join(dir, "tokenizer_config.json"),
             {{"bos_token", "<|startoftext|>"}, {"eos_token", "<|endoftext|>"}, {"pad_token", "<|endoftext|>"},
              {"unk_token", "<|endoftext|>"}, {"model_max_length", 77}, {"tokenizer_class", "CLIPTokenizer"}});
  return id;
}

void write_component(const std::string& dir, const nlohmann::json& config, const std::string& weights_name,
                     const std::map<std::string, at::Tensor>& weights, at::ScalarType dtype) {
  make_dirs(dir);
  write_json(path_join(dir, "config.json"), config);
  std::map<std::string, at::Tensor> cpu;
  for (const auto& [k, v] : weights)
    cpu[k] = v.detach().to(at::kCPU, at::isFloatingType(v.scalar_type()) ? dtype : v.scalar_type()).contiguous();
  save_safetensors(path_join(dir, weights_name), cpu, {{"format", "pt"}});
}

void write_random_model(const std::string& dir, const RandomModelOptions& o) {
  make_dirs(dir);
  const bool big = o.preset == "sd15" || o.preset == "sdxl", xl = o.preset == "sdxl" || o.preset == "tiny-xl";
  DP_CHECK(o.preset == "tiny" || o.preset == "sd15" || xl, "init-model: unknown preset '", o.preset,
           "' (tiny, sd15, sdxl or tiny-xl)");
  nlohmann::json index = {{"_class_name", xl ? "StableDiffusionXLPipeline" : "StableDiffusionPipeline"},
                          {"text_encoder", {"transformers", "CLIPTextModel"}},
                          {"tokenizer", {"transformers", "CLIPTokenizer"}},
                          {"unet", {"diffusers", "UNet2DConditionModel"}},
                          {"vae", {"diffusers", "AutoencoderKL"}},
                          {"scheduler", {"diffusers", o.scheduler_class}}};
  if (xl) {
    index["text_encoder_2"] = {"transformers", "CLIPTextModelWithProjection"};
    index["tokenizer_2"] = {"transformers", "CLIPTokenizer"};
    index["force_zeros_for_empty_prompt"] = true;
  }
  if (o.super_resolution) index["super_resolution"] = {"diffpipe", "SuperResolution"};
  write_json(path_join(dir, "model_index.json"), index);
  const int64_t vocab = write_clip_tokenizer(path_join(dir, "tokenizer"));
  // CLIP text encoders: SD 1.5's ViT-L/14 (or a tiny one); SDXL adds OpenCLIP bigG/14 with its projection
  auto text_encoder = [&](const std::string& name, int64_t D, int64_t layers, int64_t heads, const char* act,
                          int64_t projection, uint64_t seed) {
    nlohmann::json tc = {{"architectures", {projection ? "CLIPTextModelWithProjection" : "CLIPTextModel"}},
                         {"model_type", "clip_text_model"}, {"vocab_size", vocab}, {"hidden_size", D},
                         {"intermediate_size", 4 * D}, {"num_hidden_layers", layers}, {"num_attention_heads", heads},
                         {"max_position_embeddings", 77}, {"hidden_act", act}, {"layer_norm_eps", 1e-5},
                         {"bos_token_id", vocab - 2}, {"eos_token_id", vocab - 1}, {"pad_token_id", vocab - 1}};
    if (projection) tc["projection_dim"] = projection;
    Weights w = Weights::initializer(seed);
    ClipTextConfig cfg;
    cfg.vocab_size = vocab;
    cfg.hidden_size = D;
    cfg.intermediate_size = 4 * D;
    cfg.num_hidden_layers = layers;
    cfg.num_attention_heads = heads;
    cfg.hidden_act = act;
    cfg.eos_token_id = vocab - 1;
    cfg.projection_dim = projection;
    ClipTextModel m(cfg, w.sub("text_model"));
    if (projection) (void)w.get("text_projection.weight", {projection, D});  // drawn too: the writer saves it
    write_component(path_join(dir, name), tc, "model.safetensors", w.all(), o.save_dtype);
  };
  const int64_t D = big ? 768 : 32;
  text_encoder("text_encoder", D, big ? 12 : 2, big ? 12 : 4, "quick_gelu", 0, o.seed * 3 + 1);
  const int64_t D2 = big ? 1280 : 40, P = big ? 1280 : 24, T = big ? 256 : 8;  // SDXL: pooled width, time-id sinusoid
  if (xl) {
    const int64_t v2 = write_clip_tokenizer(path_join(dir, "tokenizer_2"));
    DP_CHECK(v2 == vocab, "init-model: the two tokenizers disagree");
    nlohmann::json tk = JsonConfig::load(path_join(dir, "tokenizer_2/tokenizer_config.json")).json();
    tk["pad_token"] = "!";  // SDXL's second tokenizer pads with "!"
    write_json(path_join(dir, "tokenizer_2/tokenizer_config.json"), tk);
    text_encoder("text_encoder_2", D2, big ? 32 : 2, big ? 20 : 5, "gelu", P, o.seed * 3 + 5);
  }
  nlohmann::json uc = {{"_class_name", "UNet2DConditionModel"}, {"in_channels", 4}, {"out_channels", 4},
                       {"mid_block_type", "UNetMidBlock2DCrossAttn"}, {"cross_attention_dim", xl ? D + D2 : D},
                       {"norm_num_groups", 32}, {"norm_eps", 1e-5}, {"flip_sin_to_cos", true}, {"freq_shift", 0},
                       {"act_fn", "silu"}, {"use_linear_projection", xl}, {"upcast_attention", false}};
  if (xl) {  // SDXL's base UNet (or a tiny one of the same kind)
    uc["addition_embed_type"] = "text_time";
    uc["addition_time_embed_dim"] = T;
    uc["projection_class_embeddings_input_dim"] = P + 6 * T;
    uc["layers_per_block"] = 2;
    if (big) {
      uc["block_out_channels"] = {320, 640, 1280};
      uc["down_block_types"] = {"DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"};
      uc["up_block_types"] = {"CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"};
      uc["transformer_layers_per_block"] = {1, 2, 10};
      uc["attention_head_dim"] = {5, 10, 20};
      uc["sample_size"] = 128;
    } else {
      uc["block_out_channels"] = {32, 64};
      uc["down_block_types"] = {"DownBlock2D", "CrossAttnDownBlock2D"};
      uc["up_block_types"] = {"CrossAttnUpBlock2D", "UpBlock2D"};
      uc["transformer_layers_per_block"] = {1, 2};
      uc["attention_head_dim"] = {2, 4};
      uc["sample_size"] = 8;
    }
  } else if (big) {
    uc["block_out_channels"] = {320, 640, 1280, 1280};
    uc["down_block_types"] = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"};
    uc["up_block_types"] = {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"};
    uc["layers_per_block"] = 2;
    uc["attention_head_dim"] = 8;
    uc["sample_size"] = 64;
  } else {
    uc["block_out_channels"] = {32, 64};
    uc["down_block_types"] = {"CrossAttnDownBlock2D", "DownBlock2D"};
    uc["up_block_types"] = {"UpBlock2D", "CrossAttnUpBlock2D"};
    uc["layers_per_block"] = 1;
    uc["attention_head_dim"] = 4;
    uc["sample_size"] = 8;
  }
  // A diffusers-style component (config.json + diffusion_pytorch_model.safetensors) whose weights are the ones
  // the module's constructor draws from the initializer.
  auto random_component = [&](const std::string& name, const nlohmann::json& config, uint64_t seed, auto build) {
    const std::string p = path_join(dir, name);
    make_dirs(p);
    write_json(path_join(p, "config.json"), config);
    Weights w = Weights::initializer(seed);
    build(path_join(p, "config.json"), w);
    write_component(p, config, "diffusion_pytorch_model.safetensors", w.all(), o.save_dtype);
  };
  random_component("unet", uc, o.seed * 3 + 2,
                   [](const std::string& c, Weights& w) { UNet2DConditionModel(UNetConfig::load(c), w); });
  nlohmann::json vc = {{"_class_name", "AutoencoderKL"}, {"in_channels", 3}, {"out_channels", 3},
                       {"latent_channels", 4}, {"norm_num_groups", 32}, {"act_fn", "silu"},
                       {"scaling_factor", xl ? 0.13025 : 0.18215}};
  if (big) {
    vc["block_out_channels"] = {128, 256, 512, 512};
    vc["layers_per_block"] = 2;
    vc["down_block_types"] = std::vector<std::string>(4, "DownEncoderBlock2D");
    vc["up_block_types"] = std::vector<std::string>(4, "UpDecoderBlock2D");
    vc["sample_size"] = xl ? 1024 : 512;
  } else {
    vc["block_out_channels"] = {32, 64};
    vc["layers_per_block"] = 1;
    vc["down_block_types"] = std::vector<std::string>(2, "DownEncoderBlock2D");
    vc["up_block_types"] = std::vector<std::string>(2, "UpDecoderBlock2D");
    vc["sample_size"] = 16;
  }
  random_component("vae", vc, o.seed * 3 + 3,
                   [](const std::string& c, Weights& w) { AutoencoderKL(VaeConfig::load(c), w, true); });
  if (o.super_resolution)  // an Imagen-style cascade: decoded images are enlarged 2x by the upscale stage
    random_component("super_resolution", {{"_class_name", "SuperResolution"}, {"scale", 2}, {"channels", 8}, {"layers", 2}},
                     o.seed * 3 + 4,
                     [](const std::string& c, Weights& w) { SuperResolution(SuperResConfig::load(c), w); });
  const std::string sp = path_join(dir, "scheduler");
  make_dirs(sp);
  write_json(path_join(sp, "scheduler_config.json"),
             {{"_class_name", o.scheduler_class}, {"num_train_timesteps", 1000}, {"beta_start", 0.00085},
              {"beta_end", 0.012}, {"beta_schedule", "scaled_linear"}, {"clip_sample", false},
              {"set_alpha_to_one", false}, {"steps_offset", 1}, {"prediction_type", o.prediction_type},
              {"timestep_spacing", o.timestep_spacing}, {"skip_prk_steps", true}});
}

}  // namespace diffpipe
