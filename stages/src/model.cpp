#include "diffpipe/stages/model.h"

#include "diffpipe/stages/embeddings.h"
#include "diffpipe/stages/ip_adapter.h"

#include <cstdlib>
#include <numeric>
#include <fstream>
#include <string>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/log.h"
#include "diffpipe/runtime/profile.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/stages/unclip.h"
#include "cuda_ops.h"
#include "nn.h"

namespace diffpipe {

namespace {
std::string weights_file(const std::string& dir, const char* name) {
  const std::string p = path_join(dir, name);
  DP_CHECK(file_exists(p), p, ": weights file not found");
  return p;
}
}  // namespace

namespace {
// The pipeline class a folder's model_index.json names ("" without one).
std::string pipeline_class(const std::string& dir) {
  const std::string index = path_join(dir, "model_index.json");
  return file_exists(index) ? JsonConfig::load(index).string("_class_name", "") : std::string();
}

// A scheduler whose variance the model predicts (learned, learned_range) needs a UNet of twice in_channels outputs
// (DeepFloyd IF, Kandinsky 2.2's decoder).
void check_learned_variance(const std::string& dir, const SchedulerConfig& s, const UNetConfig& u) {
  const bool learned = s.variance_type == "learned" || s.variance_type == "learned_range";
  DP_CHECK(!learned || u.out_channels == 2 * u.in_channels, path_join(dir, "scheduler/scheduler_config.json"),
           ": variance_type ", s.variance_type, " needs a UNet with twice in_channels outputs (",
           path_join(dir, "unet/config.json"), " has ", u.out_channels, ")");
}

// DeepFloyd IF stage I: tokenizer/ (T5, tokenizer.json), text_encoder/ (T5EncoderModel), unet/ (pixel space),
// scheduler/ (DDPMScheduler); no VAE.
void validate_if(const std::string& dir, const JsonConfig& index) {
  for (const char* c : {"tokenizer", "text_encoder", "unet", "scheduler"})
    if (!index.has(c)) index.fail(c, "component missing from model_index.json");
  DP_CHECK(file_exists(path_join(dir, "tokenizer/tokenizer.json")) || file_exists(path_join(dir, "tokenizer/spiece.model")),
           path_join(dir, "tokenizer"), ": neither tokenizer.json nor spiece.model found (T5's tokenizer)");
  const auto t5 = T5Config::load(path_join(dir, "text_encoder/config.json"));
  const auto u = UNetConfig::load(path_join(dir, "unet/config.json"));
  const auto s = SchedulerConfig::load(path_join(dir, "scheduler/scheduler_config.json"));
  SafetensorsFile::open(weights_file(dir, "text_encoder/model.safetensors"));
  SafetensorsFile::open(weights_file(dir, "unet/diffusion_pytorch_model.safetensors"));
  const std::string uc = path_join(dir, "unet/config.json");
  DP_CHECK(u.encoder_hid_dim == t5.d_model || (u.encoder_hid_dim == 0 && u.cross_attention_dim[0] == t5.d_model), uc,
           ": encoder_hid_dim ", u.encoder_hid_dim, " does not match the T5 encoder's d_model ", t5.d_model);
  DP_CHECK(u.out_channels == u.in_channels || u.out_channels == 2 * u.in_channels, uc, ": out_channels ",
           u.out_channels, " must be in_channels ", u.in_channels, " (or twice, with a learned variance)");
  check_learned_variance(dir, s, u);
  if (SdModel::has_if_stage2(dir)) {  // stage II: its UNet (fitting stage I's), scheduler and image-noising schedule
    const std::string sr = path_join(dir, "super_resolution"), src = path_join(sr, "unet/config.json");
    const auto s2 = UNetConfig::load(src);
    (void)SchedulerConfig::load(path_join(sr, "scheduler/scheduler_config.json"));
    (void)SchedulerConfig::load_ddpm(path_join(sr, "image_noising_scheduler/scheduler_config.json"));
    SafetensorsFile::open(weights_file(sr, "unet/diffusion_pytorch_model.safetensors"));
    DP_CHECK(s2.in_channels == 2 * u.in_channels, src, ": in_channels ", s2.in_channels, " should be twice stage I's ",
             u.in_channels, " (the sample and the upscaled image)");
    DP_CHECK(s2.class_embed_type == "timestep", src, ": class_embed_type must be \"timestep\" (the noise level)");
    const int64_t f = s2.sample_size / std::max<int64_t>(1, u.sample_size);
    DP_CHECK(f >= 1 && s2.sample_size == f * u.sample_size, src, ": sample_size ", s2.sample_size,
             " is not a whole multiple of stage I's ", u.sample_size);
  } else if (dir_exists(path_join(dir, "super_resolution"))) {
    DP_FAIL(path_join(dir, "super_resolution"), ": not an IFSuperResolutionPipeline folder (model_index.json's ",
            "_class_name), which a DeepFloyd IF folder's stage II must be");
  }
  if (SdModel::has_if_stage3(dir)) SdModel::validate(path_join(dir, "upscaler"));  // stage III: an x4 upscaler folder
  else if (dir_exists(path_join(dir, "upscaler")))
    DP_FAIL(path_join(dir, "upscaler"), ": not a StableDiffusionUpscalePipeline folder (model_index.json's ",
            "_class_name), which a DeepFloyd IF folder's stage III must be");
}

// Whether model_index.json lists component `k` (present, and not saved as unset: null or [null, null])
bool lists_component(const JsonConfig& index, const char* k) {
  if (!index.has(k)) return false;
  const auto& v = index.json()[k];
  return !(v.is_array() && !v.empty() && v[0].is_null());
}

// Stable Diffusion 3: tokenizer/ + text_encoder/ and tokenizer_2/ + text_encoder_2/ (CLIP with projections),
// optionally tokenizer_3/ + text_encoder_3/ (T5), transformer/ (SD3Transformer2DModel), vae/, scheduler/
// (FlowMatchEulerDiscreteScheduler); the widths must join up as the pipeline joins the embeddings.
void validate_sd3(const std::string& dir, const JsonConfig& index) {
  for (const char* c : {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "vae", "scheduler"})
    if (!lists_component(index, c)) index.fail(c, "component missing from model_index.json (an SD3 folder needs it)");
  int64_t clip_width = 0, pooled = 0;
  for (const char* te : {"text_encoder", "text_encoder_2"}) {
    const std::string cfg = path_join(dir, std::string(te) + "/config.json");
    const auto t = ClipTextConfig::load(cfg);
    DP_CHECK(t.projection_dim > 0, cfg, ": projection_dim must be > 0 (SD3's pooled embedding is both encoders' ",
             "projected ones)");
    clip_width += t.hidden_size;
    pooled += t.projection_dim;
    SafetensorsFile::open(weights_file(dir, (std::string(te) + "/model.safetensors").c_str()));
  }
  for (const char* f : {"tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt"})
    DP_CHECK(file_exists(path_join(dir, f)), path_join(dir, f), ": file not found");
  const std::string tc = path_join(dir, "transformer/config.json");
  const auto tr = Sd3TransformerConfig::load(tc);
  const auto v = VaeConfig::load(path_join(dir, "vae/config.json"));
  const auto s = SchedulerConfig::load(path_join(dir, "scheduler/scheduler_config.json"));
  SafetensorsFile::open(weights_file(dir, "transformer/diffusion_pytorch_model.safetensors"));
  SafetensorsFile::open(weights_file(dir, "vae/diffusion_pytorch_model.safetensors"));
  DP_CHECK(s.flow_matching(), path_join(dir, "scheduler/scheduler_config.json"), ": _class_name ", s.class_name,
           " is not FlowMatchEulerDiscreteScheduler (SD3's transformer predicts a flow-matching velocity)");
  DP_CHECK(tr.pooled_projection_dim == pooled, tc, ": pooled_projection_dim ", tr.pooled_projection_dim,
           " should be the two text encoders' projection_dim together, ", pooled);
  DP_CHECK(tr.joint_attention_dim >= clip_width, tc, ": joint_attention_dim ", tr.joint_attention_dim,
           " is narrower than the two CLIP encoders' hidden sizes together, ", clip_width,
           " (their states are zero-padded to it)");
  if (lists_component(index, "text_encoder_3")) {
    if (!lists_component(index, "tokenizer_3")) index.fail("tokenizer_3", "missing beside text_encoder_3");
    DP_CHECK(file_exists(path_join(dir, "tokenizer_3/tokenizer.json")) ||
                 file_exists(path_join(dir, "tokenizer_3/spiece.model")),
             path_join(dir, "tokenizer_3"), ": neither tokenizer.json nor spiece.model found (T5's tokenizer)");
    const std::string t5c = path_join(dir, "text_encoder_3/config.json");
    const auto t5 = T5Config::load(t5c);
    SafetensorsFile::open(weights_file(dir, "text_encoder_3/model.safetensors"));
    DP_CHECK(t5.d_model == tr.joint_attention_dim, t5c, ": d_model ", t5.d_model, " does not match ", tc,
             "'s joint_attention_dim ", tr.joint_attention_dim);
  }
  DP_CHECK(tr.in_channels == v.latent_channels && tr.out_channels == v.latent_channels, tc, ": in_channels/",
           "out_channels ", tr.in_channels, "/", tr.out_channels, " and ", path_join(dir, "vae/config.json"),
           " latent_channels ", v.latent_channels, " disagree");
}

// FLUX.1: tokenizer/ + text_encoder/ (CLIP: the pooled output), tokenizer_2/ + text_encoder_2/ (T5), transformer/
// (FluxTransformer2DModel), vae/, scheduler/ (FlowMatchEulerDiscreteScheduler); the widths must join up.
void validate_flux(const std::string& dir, const JsonConfig& index) {
  for (const char* c : {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "vae", "scheduler"})
    if (!lists_component(index, c)) index.fail(c, "component missing from model_index.json (a Flux folder needs it)");
  for (const char* f : {"tokenizer/vocab.json", "tokenizer/merges.txt"})
    DP_CHECK(file_exists(path_join(dir, f)), path_join(dir, f), ": file not found");
  DP_CHECK(file_exists(path_join(dir, "tokenizer_2/tokenizer.json")) ||
               file_exists(path_join(dir, "tokenizer_2/spiece.model")),
           path_join(dir, "tokenizer_2"), ": neither tokenizer.json nor spiece.model found (T5's tokenizer)");
  const auto clip = ClipTextConfig::load(path_join(dir, "text_encoder/config.json"));
  const std::string t5c = path_join(dir, "text_encoder_2/config.json");
  const auto t5 = T5Config::load(t5c);
  const std::string tc = path_join(dir, "transformer/config.json");
  const auto tr = FluxTransformerConfig::load(tc);
  const auto v = VaeConfig::load(path_join(dir, "vae/config.json"));
  const auto s = SchedulerConfig::load(path_join(dir, "scheduler/scheduler_config.json"));
  for (const char* w : {"text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                        "transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"})
    SafetensorsFile::open(weights_file(dir, w));
  DP_CHECK(s.flow_matching(), path_join(dir, "scheduler/scheduler_config.json"), ": _class_name ", s.class_name,
           " is not FlowMatchEulerDiscreteScheduler (Flux's transformer predicts a flow-matching velocity)");
  DP_CHECK(tr.pooled_projection_dim == clip.hidden_size, tc, ": pooled_projection_dim ", tr.pooled_projection_dim,
           " should be the CLIP text encoder's hidden_size ", clip.hidden_size, " (its pooled output)");
  DP_CHECK(t5.d_model == tr.joint_attention_dim, t5c, ": d_model ", t5.d_model, " does not match ", tc,
           "'s joint_attention_dim ", tr.joint_attention_dim);
  DP_CHECK(tr.in_channels == 4 * v.latent_channels && tr.out_channels == tr.in_channels, tc, ": in_channels/",
           "out_channels ", tr.in_channels, "/", tr.out_channels, " should be 4 x ", path_join(dir, "vae/config.json"),
           "'s latent_channels ", v.latent_channels, " (2x2-packed latents)");
}

// Kandinsky 2.2: the decoder's unet/ (conditioned on the prior's image embedding), scheduler/ and movq/ (VQModel);
// a KandinskyV22CombinedPipeline folder's prior components too (a decoder folder's prior comes with the run:
// check_kandinsky_prior).
void validate_kandinsky(const std::string& dir, const JsonConfig& index) {
  for (const char* c : {"unet", "scheduler", "movq"})
    if (!index.has(c)) index.fail(c, "component of a Kandinsky 2.2 pipeline missing from model_index.json");
  if (pipeline_class(dir) == "KandinskyV22CombinedPipeline") UnclipParts::validate_kandinsky(dir, "");
  const std::string uc = path_join(dir, "unet/config.json"), mc = path_join(dir, "movq/config.json");
  const auto u = UNetConfig::load(uc);
  const auto v = VaeConfig::load(mc);
  const auto s = SchedulerConfig::load(path_join(dir, "scheduler/scheduler_config.json"));
  SafetensorsFile::open(weights_file(dir, "unet/diffusion_pytorch_model.safetensors"));
  SafetensorsFile::open(weights_file(dir, "movq/diffusion_pytorch_model.safetensors"));
  DP_CHECK(v.vq, mc, ": _class_name must be VQModel (Kandinsky 2.2's MoVQ)");
  DP_CHECK(u.image_conditioned(), uc, ": a Kandinsky 2.2 UNet needs encoder_hid_dim_type \"image_proj\"");
  DP_CHECK(u.in_channels == v.latent_channels && (u.out_channels == v.latent_channels ||
                                                  u.out_channels == 2 * v.latent_channels),
           uc, ": in_channels/out_channels ", u.in_channels, "/", u.out_channels, " do not fit ", mc,
           "'s latent_channels ", v.latent_channels, " (out: the same, or twice with the variance)");
  check_learned_variance(dir, s, u);
}

// The run's Kandinsky prior (addons.prior, or the folder's own prior_* components): there, checked, and of the
// embedding width the decoder's UNet takes.
void check_kandinsky_prior(const std::string& dir, const std::string& prior_dir) {
  if (prior_dir.empty())
    DP_CHECK(pipeline_class(dir) == "KandinskyV22CombinedPipeline", dir, " is a Kandinsky 2.2 decoder folder ",
             "(KandinskyV22Pipeline): give its prior with --prior DIR (a KandinskyV22PriorPipeline folder, ",
             "kandinsky-2-2-prior's layout)");
  else
    UnclipParts::validate_kandinsky(dir, prior_dir);
  const std::string pc = UnclipParts::kandinsky_part(dir, prior_dir, "prior") + "/config.json";
  const auto p = PriorConfig::load(pc);
  const auto u = UNetConfig::load(path_join(dir, "unet/config.json"));
  DP_CHECK(u.encoder_hid_dim == p.embedding_dim, path_join(dir, "unet/config.json"), ": encoder_hid_dim ",
           u.encoder_hid_dim, " does not match the prior's embedding_dim ", p.embedding_dim, " (", pc, ")");
}
}  // namespace

// The SDXL refiner's layout: model_index.json names neither tokenizer nor text_encoder (absent, null or [null, null],
// as diffusers saves an unset component), only their second ones.
static bool second_encoder_only_folder(const std::string& dir) {
  if (!SdModel::is_sdxl(dir)) return false;
  const JsonConfig index = JsonConfig::load(path_join(dir, "model_index.json"));
  return !lists_component(index, "text_encoder") && !lists_component(index, "tokenizer");
}

void SdModel::validate(const std::string& dir) {
  DP_CHECK(dir_exists(dir), dir, ": model folder not found");
  const JsonConfig index = JsonConfig::load(path_join(dir, "model_index.json"));
  if (is_if(dir)) return validate_if(dir, index);
  if (is_kandinsky(dir)) return validate_kandinsky(dir, index);
  if (is_sd3(dir)) return validate_sd3(dir, index);
  if (is_flux(dir)) return validate_flux(dir, index);
  const bool second_only = second_encoder_only_folder(dir);
  std::vector<const char*> needed{"unet", "vae", "scheduler"};
  if (!second_only) needed.insert(needed.end(), {"tokenizer", "text_encoder"});
  for (const char* c : needed)
    if (!index.has(c)) index.fail(c, "component missing from model_index.json");
  const auto ucfg = UNetConfig::load(path_join(dir, "unet/config.json"));
  const auto vcfg = VaeConfig::load(path_join(dir, "vae/config.json"));
  (void)SchedulerConfig::load(path_join(dir, "scheduler/scheduler_config.json"));
  int64_t context_dim = 0;
  if (!second_only) {
    const auto tcfg = ClipTextConfig::load(path_join(dir, "text_encoder/config.json"));
    context_dim = tcfg.hidden_size;
    for (const char* f : {"tokenizer/vocab.json", "tokenizer/merges.txt"})
      DP_CHECK(file_exists(path_join(dir, f)), path_join(dir, f), ": file not found");
    // Opening validates each safetensors header (cheap: the data is mapped, not read).
    SafetensorsFile::open(weights_file(dir, "text_encoder/model.safetensors"));
  }
  SafetensorsFile::open(weights_file(dir, "unet/diffusion_pytorch_model.safetensors"));
  SafetensorsFile::open(weights_file(dir, "vae/diffusion_pytorch_model.safetensors"));
  if (is_unclip(dir)) UnclipParts::validate(dir);
  if (has_super_resolution(dir)) {
    (void)SuperResConfig::load(path_join(dir, "super_resolution/config.json"));
    SafetensorsFile::open(weights_file(dir, "super_resolution/diffusion_pytorch_model.safetensors"));
  }
  const bool sdxl = is_sdxl(dir);
  if (sdxl) {
    for (const char* c : {"tokenizer_2", "text_encoder_2"})
      if (!index.has(c)) index.fail(c, "component missing from model_index.json (an SDXL folder needs it)");
    for (const char* f : {"tokenizer_2/vocab.json", "tokenizer_2/merges.txt"})
      DP_CHECK(file_exists(path_join(dir, f)), path_join(dir, f), ": file not found");
    const auto t2 = ClipTextConfig::load(path_join(dir, "text_encoder_2/config.json"));
    SafetensorsFile::open(weights_file(dir, "text_encoder_2/model.safetensors"));
    context_dim += t2.hidden_size;
    // the refiner's time ids: original size, crop corner and aesthetic score (5) instead of the target size (6)
    const int64_t ids = index.boolean("requires_aesthetics_score", false) ? 5 : 6;
    const std::string u = path_join(dir, "unet/config.json");
    DP_CHECK(ucfg.text_time(), u, ": an SDXL UNet needs addition_embed_type \"text_time\"");
    DP_CHECK(t2.projection_dim > 0, path_join(dir, "text_encoder_2/config.json"),
             ": projection_dim must be > 0 (SDXL's pooled embedding is the projected one)");
    DP_CHECK(t2.projection_dim + ids * ucfg.addition_time_embed_dim == ucfg.projection_class_embeddings_input_dim, u,
             ": projection_class_embeddings_input_dim ", ucfg.projection_class_embeddings_input_dim,
             " should be text_encoder_2's projection_dim ", t2.projection_dim, " + ", ids,
             " x addition_time_embed_dim ", ucfg.addition_time_embed_dim, ids == 5 ? " (model_index.json's "
             "requires_aesthetics_score: 5 time ids)" : " (6 time ids; a refiner's model_index.json says "
             "requires_aesthetics_score)");
  } else {
    DP_CHECK(!ucfg.text_time(), path_join(dir, "unet/config.json"), ": addition_embed_type \"text_time\" needs an ",
             "SDXL folder (model_index.json's _class_name StableDiffusionXLPipeline or its Img2Img/Inpaint variant, "
             "text_encoder_2/)");
  }
  for (auto d : ucfg.cross_attention_dim)
    DP_CHECK(d == context_dim, path_join(dir, "unet/config.json"), ": cross_attention_dim ", d,
             " does not match the text encoder", sdxl && !second_only ? "s' hidden sizes together " : "'s hidden_size ",
             context_dim);
  if (is_upscaler(dir)) {  // the SD x4 upscaler: the low-resolution image joins the latents, its level the class
    if (!index.has("low_res_scheduler")) index.fail("low_res_scheduler", "component missing from model_index.json");
    const auto lr = SchedulerConfig::load_ddpm(path_join(dir, "low_res_scheduler/scheduler_config.json"));
    const int64_t max_level = index.integer("max_noise_level", 350);
    index.at_least("max_noise_level", max_level, 0);
    const std::string u = path_join(dir, "unet/config.json");
    DP_CHECK(ucfg.in_channels == vcfg.latent_channels + 3 && ucfg.out_channels == vcfg.latent_channels, u,
             " in_channels/out_channels ", ucfg.in_channels, "/", ucfg.out_channels, " should be ",
             vcfg.latent_channels + 3, "/", vcfg.latent_channels, " (", path_join(dir, "vae/config.json"),
             " latent_channels ", vcfg.latent_channels, ", plus the image's 3 channels in)");
    DP_CHECK(ucfg.num_class_embeds > max_level, u, ": num_class_embeds ", ucfg.num_class_embeds,
             " must exceed model_index.json's max_noise_level ", max_level, " (the noise level is the class label)");
    DP_CHECK(lr.num_train_timesteps > max_level, path_join(dir, "low_res_scheduler/scheduler_config.json"),
             ": num_train_timesteps ", lr.num_train_timesteps, " must exceed max_noise_level ", max_level);
    return;
  }
  // Either file may be the wrong one: name both values. An inpainting UNet (StableDiffusionInpaintPipeline) also
  // takes the mask and the masked image's latents.
  const bool inpaint = ucfg.in_channels == 2 * vcfg.latent_channels + 1;
  DP_CHECK((ucfg.in_channels == vcfg.latent_channels || inpaint) && ucfg.out_channels == vcfg.latent_channels,
           path_join(dir, "unet/config.json"), " in_channels/out_channels ", ucfg.in_channels, "/", ucfg.out_channels,
           " and ", path_join(dir, "vae/config.json"), " latent_channels ", vcfg.latent_channels,
           " disagree (in_channels is latent_channels, or 2 x latent_channels + 1 for an inpainting UNet)");
}

// Native bfloat16 matrix units on this CPU (AMX or AVX-512 BF16, from /proc/cpuinfo's flags): without them
// LibTorch emulates bfloat16 and it runs slower than float32.
static bool cpu_has_native_bf16() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("flags", 0) == 0)
      return line.find(" amx_bf16") != std::string::npos || line.find(" avx512_bf16") != std::string::npos;
  return false;
}

// On a GPU, "float32" means float32 (no TF32 in cuDNN convolutions or cuBLAS), and 16-bit matrix products
// accumulate without reduced-precision split-K reductions: the reference outputs are float32.
static void configure_cuda_numerics() {
  auto& ctx = at::globalContext();
  ctx.setAllowTF32CuDNN(false);
  ctx.setFloat32MatmulPrecision("highest");
  // DIFFPIPE_FP16_REDUCTION=1 allows them (PyTorch's default, so diffusers' too), to compare the two on a GPU.
  const char* reduce = std::getenv("DIFFPIPE_FP16_REDUCTION");
  const bool reduced = reduce && std::string(reduce) == "1";
  ctx.setAllowFP16ReductionCuBLAS(reduced);
  ctx.setAllowBF16ReductionCuBLAS(reduced);
  // cuDNN's autotuner (DIFFPIPE_CUDNN_BENCHMARK=1) times the algorithms for each new shape; its choice can differ
  // between processes, and with it the last bits of an image, so the default keeps cuDNN's heuristic choice.
  const char* bench = std::getenv("DIFFPIPE_CUDNN_BENCHMARK");
  ctx.setBenchmarkCuDNN(bench && std::string(bench) == "1");
  // Attention kernels: LibTorch picks cuDNN's fused attention on Hopper where it applies; DIFFPIPE_SDP_CUDNN=0 leaves
  // it out (then the flash / memory-efficient kernels), to compare them on a GPU.
  const char* sdp = std::getenv("DIFFPIPE_SDP_CUDNN");
  if (sdp && std::string(sdp) == "0") ctx.setSDPUseCuDNN(false);
}

// The run's SDXL refiner (ModelAddons::refiner) beside `base`: configs always, its text encoder(s) and UNet with
// kRefiner. Its latents must be the base's (the base's VAE decodes them).
static SdModel load_refiner(const SdModel& base, const std::string& dir, unsigned components) {
  DP_CHECK(base.sdxl, "refiner: ", base.dir, " is not an SDXL folder; a refiner continues an SDXL base's latents");
  DP_CHECK(!base.inpaint_unet, "refiner: ", base.dir, " is an inpainting folder; the refiner follows text-to-image ",
           "and image-to-image SDXL folders");
  DP_CHECK(dir_exists(dir), "refiner: ", dir, ": model folder not found");
  DP_CHECK(SdModel::is_sdxl(dir), "refiner: ", path_join(dir, "model_index.json"), ": _class_name ",
           pipeline_class(dir), " is not an SDXL pipeline (StableDiffusionXLImg2ImgPipeline, as the refiner's folder ",
           "names it, or StableDiffusionXLPipeline)");
  SdModel r = SdModel::load(dir, base.spec, (components & kRefiner) ? (kTextEncoder | kUNet) : 0u);
  DP_CHECK(!r.inpaint_unet && r.unet_config.in_channels == base.vae_config.latent_channels, "refiner: ",
           path_join(dir, "unet/config.json"), ": in_channels ", r.unet_config.in_channels, " is not the base's ",
           "latent_channels ", base.vae_config.latent_channels, " (", path_join(base.dir, "vae/config.json"), ")");
  DP_CHECK(r.vae_config.latent_channels == base.vae_config.latent_channels &&
               r.vae_config.scaling_factor == base.vae_config.scaling_factor &&
               r.latent_factor() == base.latent_factor(),
           "refiner: ", path_join(dir, "vae/config.json"), " (latent_channels ", r.vae_config.latent_channels,
           ", scaling_factor ", r.vae_config.scaling_factor, ", factor ", r.latent_factor(), ") differs from ",
           path_join(base.dir, "vae/config.json"), " (", base.vae_config.latent_channels, ", ",
           base.vae_config.scaling_factor, ", ", base.latent_factor(), "): the latents would not mean the same");
  return r;
}

// The diffusion-transformer folders (validated): Stable Diffusion 3 and FLUX.1. The text encoders with kTextEncoder,
// the transformer with kUNet, the VAE's halves as for Stable Diffusion.
static SdModel load_flux(SdModel m, unsigned components, const std::vector<LoraLayer>& lora);
static SdModel load_sd3(SdModel m, unsigned components, const std::vector<LoraLayer>& lora);
// `lora`: the run's LoRA layers (fused and per-request), for the transformer and the CLIP text encoders
static SdModel load_transformer_folder(SdModel m, unsigned components, const ModelAddons& addons,
                                       const std::vector<LoraLayer>& lora) {
  const std::string& dir = m.dir;
  const DeviceSpec& spec = m.spec;
  const bool flux = SdModel::is_flux(dir);
  DP_CHECK(addons.embeddings.empty() && addons.ip_adapter.empty() && addons.controlnets.empty() &&
               addons.refiner.empty() && addons.prior.empty(),
           dir, " is a ", flux ? "FLUX.1" : "Stable Diffusion 3", " folder: textual inversion, IP-Adapter, ",
           "ControlNet, refiner and prior files apply to other folders");
  for (const LoraLayer& l : lora)  // Flux's text_encoder_2 is T5, which takes no LoRA here
    DP_CHECK(!flux || l.component != "text_encoder_2", "lora: a layer of text_encoder_2 (", l.weight_key, ") in ",
             dir, ": FLUX.1's second text encoder is T5, which diffpipe does not adapt (transformer and CLIP layers ",
             "only)");
  m.scheduler = SchedulerConfig::load(path_join(dir, "scheduler/scheduler_config.json"));
  m.text_config = ClipTextConfig::load(path_join(dir, "text_encoder/config.json"));
  m.vae_config = VaeConfig::load(path_join(dir, "vae/config.json"));
  m.vae_dtype = m.vae_config.force_upcast && spec.dtype == at::kHalf ? at::kFloat : spec.dtype;
  DeviceSpec vspec = spec;
  vspec.dtype = m.vae_dtype;
  const bool encoder = (components & (kVaeEncoder | kImageLatents)) != 0;  // image-to-image's encode stage
  if ((components & kVae) || encoder)
    m.vae = AutoencoderKL::load(path_join(dir, "vae"), vspec, encoder, (components & kVae) != 0);
  m.addons = addons;
  SdModel out = flux ? load_flux(std::move(m), components, lora) : load_sd3(std::move(m), components, lora);
  if (addons.max_sequence_length > 0) out.max_sequence_length = addons.max_sequence_length;
  return out;
}

// FLUX.1: CLIP (pooled) and T5, the Flux transformer, the pipelines' own sigmas
static SdModel load_flux(SdModel m, unsigned components, const std::vector<LoraLayer>& lora) {
  const std::string& dir = m.dir;
  m.flux = true;
  m.scheduler.linspace_sigmas = true;
  m.max_sequence_length = 512;  // FluxPipeline's default
  m.flux_config = FluxTransformerConfig::load(path_join(dir, "transformer/config.json"));
  m.unet_config.in_channels = m.flux_config.in_channels / 4;
  m.unet_config.out_channels = m.flux_config.out_channels / 4;
  m.unet_config.sample_size = 128;  // FluxPipeline's default_sample_size
  m.t5_config = T5Config::load(path_join(dir, "text_encoder_2/config.json"));
  if (components & kTextEncoder) {
    m.tokenizer = std::make_shared<ClipTokenizer>(ClipTokenizer::load(path_join(dir, "tokenizer")));
    m.text_encoder = ClipTextModel::load(path_join(dir, "text_encoder"), m.spec, lora);
    m.t5_tokenizer = std::make_shared<T5Tokenizer>(T5Tokenizer::load(path_join(dir, "tokenizer_2")));
    m.t5 = T5EncoderModel::load(path_join(dir, "text_encoder_2"), m.spec);
  }
  if (components & kUNet)
    m.flux_transformer = FluxTransformer2DModel::load(path_join(dir, "transformer"), m.spec, lora);
  return m;
}

// Stable Diffusion 3: two CLIP encoders with projections and the optional T5, the MMDiT transformer
static SdModel load_sd3(SdModel m, unsigned components, const std::vector<LoraLayer>& lora) {
  const std::string& dir = m.dir;
  const DeviceSpec& spec = m.spec;
  m.sd3 = true;
  m.sd3_t5 = dir_exists(path_join(dir, "text_encoder_3")) &&
             lists_component(JsonConfig::load(path_join(dir, "model_index.json")), "text_encoder_3");
  m.transformer_config = Sd3TransformerConfig::load(path_join(dir, "transformer/config.json"));
  m.unet_config.in_channels = m.transformer_config.in_channels;
  m.unet_config.out_channels = m.transformer_config.out_channels;
  m.unet_config.sample_size = m.transformer_config.sample_size;
  m.text_config_2 = ClipTextConfig::load(path_join(dir, "text_encoder_2/config.json"));
  if (m.sd3_t5) m.t5_config = T5Config::load(path_join(dir, "text_encoder_3/config.json"));
  if (components & kTextEncoder) {
    m.tokenizer = std::make_shared<ClipTokenizer>(ClipTokenizer::load(path_join(dir, "tokenizer")));
    m.text_encoder = ClipTextModel::load(path_join(dir, "text_encoder"), spec, lora);
    m.tokenizer_2 = std::make_shared<ClipTokenizer>(ClipTokenizer::load(path_join(dir, "tokenizer_2")));
    m.text_encoder_2 = ClipTextModel::load(path_join(dir, "text_encoder_2"), spec, lora);
    if (m.sd3_t5) {
      m.t5_tokenizer = std::make_shared<T5Tokenizer>(T5Tokenizer::load(path_join(dir, "tokenizer_3")));
      m.t5 = T5EncoderModel::load(path_join(dir, "text_encoder_3"), spec);
    }
  }
  if (components & kUNet) m.transformer = Sd3Transformer2DModel::load(path_join(dir, "transformer"), spec, lora);
  return m;
}

SdModel SdModel::load(const std::string& dir, const DeviceSpec& spec, unsigned components,
                      const ModelAddons& addons) {
  validate(dir);
  const std::vector<LoraSpec>& loras = addons.loras;
  const bool kandinsky = is_kandinsky(dir);
  DP_CHECK((loras.empty() && addons.adapters.empty()) || (!is_if(dir) && !is_upscaler(dir) && !kandinsky), "lora: ",
           dir, " is a ", is_if(dir) ? "DeepFloyd IF" : kandinsky ? "Kandinsky 2.2" : "x4 upscaler",
           " folder; LoRA files apply to Stable Diffusion, SDXL and Stable unCLIP folders");
  DP_CHECK(addons.prior.empty() || kandinsky, "prior: ", dir, " is not a Kandinsky 2.2 folder; --prior gives a ",
           "Kandinsky 2.2 decoder its prior");
  DP_CHECK(!kandinsky || (addons.embeddings.empty() && addons.ip_adapter.empty() && addons.controlnets.empty()),
           dir, " is a Kandinsky 2.2 folder: textual inversion, IP-Adapter and ControlNet files apply to Stable ",
           "Diffusion and SDXL folders");
  DP_CHECK(addons.refiner.empty() || is_sdxl(dir), "refiner: ", dir, " is not an SDXL folder; a refiner continues an ",
           "SDXL base's latents");
  DP_CHECK(addons.max_sequence_length == 0 || is_sd3(dir) || is_flux(dir), "max-sequence-length: ", dir, " is not an ",
           "SD3 or FLUX.1 folder (it sets their T5 tokens per prompt)");
  DP_CHECK(addons.max_sequence_length >= 0 && addons.max_sequence_length <= 512, "max-sequence-length: must be in ",
           "[1, 512] (the pipelines' limit), got ", addons.max_sequence_length);
  std::vector<LoraLayer> lora;  // fused ones, then each adapter's (scale 1: the request's scale multiplies it)
  for (const LoraSpec& l : loras) {
    auto layers = read_lora(l, dir);
    lora.insert(lora.end(), std::make_move_iterator(layers.begin()), std::make_move_iterator(layers.end()));
  }
  for (size_t i = 0; i < addons.adapters.size(); ++i) {
    auto layers = read_lora({addons.adapters[i].path, 1.0}, dir);
    for (LoraLayer& l : layers) l.adapter = static_cast<int>(i);
    lora.insert(lora.end(), std::make_move_iterator(layers.begin()), std::make_move_iterator(layers.end()));
  }
  if (spec.device.is_cuda()) {
    configure_cuda_numerics();
    const at::Device device = spec.device;
    profile::set_sync([device] { nn::sync_current_stream(device); });
  }
  DP_CHECK(spec.device.is_cuda() || spec.dtype != at::kHalf, dir, ": float16 runs on GPUs only (CPUs: float32 or bfloat16)");
  if (!spec.device.is_cuda() && spec.dtype == at::kBFloat16) {
    static const bool native = cpu_has_native_bf16();
    if (!native) DP_LOG(Warn, "bfloat16 on a CPU without AMX or AVX-512 BF16: emulated, expect it slower than float32");
  }
  nn::set_batch_invariant(spec.batch_invariant && !spec.device.is_cuda());
  SdModel m;
  m.dir = dir;
  m.spec = spec;
  if (is_sd3(dir) || is_flux(dir)) return load_transformer_folder(std::move(m), components, addons, lora);
  m.unet_config = UNetConfig::load(path_join(dir, "unet/config.json"));
  m.scheduler = SchedulerConfig::load(path_join(dir, "scheduler/scheduler_config.json"));
  if (is_if(dir)) {  // DeepFloyd IF stage I: T5 + the pixel-space UNet; no VAE, no super-resolution here
    m.deepfloyd_if = true;
    m.vae_dtype = spec.dtype;
    m.t5_config = T5Config::load(path_join(dir, "text_encoder/config.json"));
    if (components & kTextEncoder) {
      m.t5_tokenizer = std::make_shared<T5Tokenizer>(T5Tokenizer::load(path_join(dir, "tokenizer")));
      m.t5 = T5EncoderModel::load(path_join(dir, "text_encoder"), spec);
    }
    if (components & kUNet) m.unet = UNet2DConditionModel::load(path_join(dir, "unet"), spec);
    const std::string sr = path_join(dir, "super_resolution");
    if (has_if_stage2(dir)) {  // configs always (requests are checked against them); the UNet with kSuperRes
      auto s = std::make_shared<SdModel>();
      s->dir = sr;
      s->spec = spec;
      s->deepfloyd_if = true;
      s->vae_dtype = spec.dtype;
      s->unet_config = UNetConfig::load(path_join(sr, "unet/config.json"));
      s->scheduler = SchedulerConfig::load(path_join(sr, "scheduler/scheduler_config.json"));
      s->image_noising = SchedulerConfig::load_ddpm(path_join(sr, "image_noising_scheduler/scheduler_config.json"));
      if (components & kSuperRes) s->unet = UNet2DConditionModel::load(path_join(sr, "unet"), spec);
      m.stage2 = s;
    }
    if (has_if_stage3(dir))  // configs always (requests are checked against them); the weights with kStage3
      m.stage3 = std::make_shared<const SdModel>(
          load(path_join(dir, "upscaler"), spec, (components & kStage3) ? (kTextEncoder | kUNet | kVae) : 0u));
    return m;
  }
  if (kandinsky) {  // prior parts as the components say; the decoder's UNet and MoVQ
    check_kandinsky_prior(dir, addons.prior);
    auto part = [&](const char* p) { return UnclipParts::kandinsky_part(dir, addons.prior, p); };
    m.kandinsky = true;
    m.text_config = ClipTextConfig::load(part("text_encoder") + "/config.json");
    m.vae_config = VaeConfig::load(path_join(dir, "movq/config.json"));
    m.prior_train_timesteps = SchedulerConfig::load_ddpm(part("scheduler") + "/scheduler_config.json").num_train_timesteps;
    m.vae_dtype = spec.dtype;  // MoVQ's config says force_upcast false
    m.image_variations = true;  // an image prompt's embedding from the prior's image encoder
    m.tokenizer = std::make_shared<ClipTokenizer>(ClipTokenizer::load(part("tokenizer")));
    if (components & (kTextEncoder | kPrior))
      m.unclip = UnclipParts::load_kandinsky(dir, addons.prior, spec, (components & kTextEncoder) != 0,
                                             (components & kPrior) != 0);
    if (components & kUNet) m.unet = UNet2DConditionModel::load(path_join(dir, "unet"), spec);
    // MoVQ: its decoder for decode, its encoder where image-to-image's starting images become latents (encode)
    const bool encoder = (components & (kVaeEncoder | kImageLatents)) != 0;
    if ((components & kVae) || encoder)
      m.vae = AutoencoderKL::load(path_join(dir, "movq"), spec, encoder, (components & kVae) != 0);
    m.addons = addons;
    return m;
  }
  m.sdxl = is_sdxl(dir);
  m.second_encoder_only = second_encoder_only_folder(dir);
  // the refiner: the second encoder's config stands in (clip_skip's range; SDXL refuses clip_skip anyway)
  m.text_config = ClipTextConfig::load(path_join(dir, m.second_encoder_only ? "text_encoder_2/config.json"
                                                                            : "text_encoder/config.json"));
  m.vae_config = VaeConfig::load(path_join(dir, "vae/config.json"));
  if (is_unclip(dir)) {
    if (UnclipParts::has_prior(dir))
      m.prior_train_timesteps =
          SchedulerConfig::load_ddpm(path_join(dir, "prior_scheduler/scheduler_config.json")).num_train_timesteps;
    m.image_variations = UnclipParts::has_image_encoder(dir);
    m.noise_levels =
        SchedulerConfig::load_ddpm(path_join(dir, "image_noising_scheduler/scheduler_config.json")).num_train_timesteps;
  }
  m.inpaint_unet = !is_upscaler(dir) && m.unet_config.in_channels == 2 * m.vae_config.latent_channels + 1;
  if (is_upscaler(dir)) {
    m.upscaler = true;
    m.image_noising = SchedulerConfig::load_ddpm(path_join(dir, "low_res_scheduler/scheduler_config.json"));
    m.max_noise_level = static_cast<int>(JsonConfig::load(path_join(dir, "model_index.json")).integer("max_noise_level", 350));
  }
  m.lcm_pipeline = is_lcm_pipeline(dir);
  if (m.sdxl) {
    m.text_config_2 = ClipTextConfig::load(path_join(dir, "text_encoder_2/config.json"));
    const JsonConfig index = JsonConfig::load(path_join(dir, "model_index.json"));
    m.force_zeros_for_empty_prompt = index.boolean("force_zeros_for_empty_prompt", true);
    m.aesthetic = index.boolean("requires_aesthetics_score", false);
  }
  DP_CHECK(!m.second_encoder_only || addons.embeddings.empty(), "embeddings: ", dir, " has no text_encoder/ (an SDXL ",
           "refiner); textual inversion files need both SDXL text encoders");
  const std::vector<TextualInversion> embeddings = read_embeddings(addons.embeddings, dir);  // checked on every rank
  for (const TextualInversion& ti : embeddings) m.embedding_tokens.push_back(ti.token);
  if (components & kTextEncoder) {
    // textual inversion: each token's ids after the vocabulary (the same in both SDXL tokenizers), its vectors the
    // text encoders' new rows
    auto add = [&](ClipTokenizer& tok, bool second) {
      std::vector<at::Tensor> rows;
      int64_t next = tok.total_ids();
      for (const TextualInversion& ti : embeddings) {
        const at::Tensor& v = second ? ti.vectors_2 : ti.vectors;
        std::vector<int64_t> ids;
        for (int64_t k = 0; k < v.size(0); ++k) {
          ids.push_back(next + k);
          if (k > 0) tok.add_token(ti.token + "_" + std::to_string(k), {next + k});
        }
        tok.add_token(ti.token, ids);  // the name stands for all its vectors (maybe_convert_prompt)
        next += v.size(0);
        rows.push_back(v);
      }
      return rows.empty() ? at::Tensor() : at::cat(rows, 0);
    };
    if (!m.second_encoder_only) {
      ClipTokenizer tok = ClipTokenizer::load(path_join(dir, "tokenizer"));
      const at::Tensor rows = add(tok, false);
      m.tokenizer = std::make_shared<ClipTokenizer>(std::move(tok));
      m.text_encoder = ClipTextModel::load(path_join(dir, "text_encoder"), spec, lora, rows);
    }
    if (m.sdxl) {
      ClipTokenizer tok2 = ClipTokenizer::load(path_join(dir, "tokenizer_2"));
      const at::Tensor rows_2 = add(tok2, true);
      m.tokenizer_2 = std::make_shared<ClipTokenizer>(std::move(tok2));
      m.text_encoder_2 = ClipTextModel::load(path_join(dir, "text_encoder_2"), spec, lora, rows_2);
    }
  }
  IpAdapterFile ip;
  if (!addons.ip_adapter.empty()) {  // checked on every rank; the layers go to the UNet, the encoder to encode
    DP_CHECK(!m.upscaler && m.noise_levels == 0 && !m.deepfloyd_if, "ip_adapter: ", dir, " is not a Stable Diffusion ",
             "1.x/2.x or SDXL folder; an IP-Adapter applies to those");
    ip = read_ip_adapter(addons.ip_adapter, m.unet_config);
    const std::string enc = ip_image_encoder_dir(addons);
    DP_CHECK(dir_exists(enc), enc, ": the IP-Adapter's image encoder folder is not there (--ip-image-encoder DIR, or ",
             "image_encoder/ beside the adapter file as h94/IP-Adapter lays it out)");
    const ClipVisionConfig vc = ClipVisionConfig::load(path_join(enc, "config.json"));
    // the plain adapter projects the image embedding, Plus resamples the hidden states
    const int64_t in = ip.plus ? vc.hidden_size : vc.projection_dim;
    DP_CHECK(in == ip.embed_dim, path_join(enc, "config.json"), ": ", ip.plus ? "hidden_size " : "projection_dim ", in,
             " does not match ", addons.ip_adapter, "'s image_proj input ", ip.embed_dim,
             ip.plus ? " (IP-Adapter Plus reads the image encoder's hidden states)" : "");
    DP_CHECK(!ip.plus || vc.num_hidden_layers >= 2, path_join(enc, "config.json"), ": IP-Adapter Plus reads the ",
             "penultimate layer's hidden states; num_hidden_layers ", vc.num_hidden_layers, " is too few");
    m.ip_adapter = true;
    m.ip_plus = ip.plus;
    // diffusers: the pipeline's feature_extractor, or CLIPImageProcessor(size=crop_size=the encoder's image_size)
    const std::string fe = path_join(dir, "feature_extractor/preprocessor_config.json");
    m.ip_image_processor = ClipImageProcessorConfig::load_or_default(fe, vc.image_size);
    DP_CHECK(m.ip_image_processor.crop_height == vc.image_size && m.ip_image_processor.crop_width == vc.image_size, fe,
             ": crop_size ", m.ip_image_processor.crop_width, "x", m.ip_image_processor.crop_height,
             " does not match the IP-Adapter's image encoder (image_size ", vc.image_size, ")");
    if (components & kTextEncoder) m.ip_image_encoder = ClipVisionModel::load(enc, spec);
  }
  if (components & kUNet)
    m.unet = UNet2DConditionModel::load(path_join(dir, "unet"), spec, lora, ip.unet_tensors, addons.ip_adapter);
  m.addons = addons;
  for (const std::string& cn : addons.controlnets) {  // configs on every rank (requests are checked against them), weights with the UNet
    DP_CHECK(!m.upscaler && m.noise_levels == 0, "controlnet: ", dir, " is not a Stable Diffusion 1.x/2.x or SDXL ",
             "folder (an upscaler or unCLIP one); a ControlNet applies to those");
    const ControlNetConfig cc = ControlNetConfig::load(path_join(cn, "config.json"));
    DP_CHECK(cc.unet.block_out_channels == m.unet_config.block_out_channels &&
                 cc.unet.cross_attention_dim == m.unet_config.cross_attention_dim &&
                 cc.unet.layers_per_block == m.unet_config.layers_per_block &&
                 cc.unet.in_channels == m.vae_config.latent_channels &&  // the latents (not an inpainting UNet's extras)
                 cc.unet.addition_embed_type == m.unet_config.addition_embed_type &&
                 cc.unet.addition_time_embed_dim == m.unet_config.addition_time_embed_dim &&
                 cc.unet.projection_class_embeddings_input_dim == m.unet_config.projection_class_embeddings_input_dim,
             "controlnet: ", path_join(cn, "config.json"), " does not fit ", path_join(dir, "unet/config.json"),
             " (block_out_channels, layers_per_block, cross_attention_dim, addition_embed_type, ",
             "addition_time_embed_dim and projection_class_embeddings_input_dim must agree: an SDXL ControlNet for an ",
             "SDXL UNet; its in_channels the VAE's latent_channels)");
    DP_CHECK(int64_t(1) << (cc.conditioning_embedding_out_channels.size() - 1) == m.latent_factor(), "controlnet: ",
             path_join(cn, "config.json"), ": conditioning_embedding_out_channels has ",
             cc.conditioning_embedding_out_channels.size(), " entries; its downsampling must be the VAE's factor ",
             m.latent_factor());
    if (components & kUNet) m.controlnets.push_back(ControlNetModel::load(cn, spec));
  }
  // As diffusers: force_upcast decodes in float32 only under float16 (its range overflows); bfloat16 has float32's.
  m.vae_dtype = m.vae_config.force_upcast && spec.dtype == at::kHalf ? at::kFloat : spec.dtype;
  DeviceSpec vspec = spec;  // the decoder side (VAE, super-resolution) runs in the VAE's dtype
  vspec.dtype = m.vae_dtype;
  // the encoder where images become latents (image-to-image's encode stage), the decoder where latents become images
  const bool encoder = (components & kVaeEncoder) || ((components & kImageLatents) && m.img2img());
  if ((components & kVae) || encoder)
    m.vae = AutoencoderKL::load(path_join(dir, "vae"), vspec, encoder, (components & kVae) != 0);
  if ((components & kPrior) && is_unclip(dir)) m.unclip = UnclipParts::load(dir, spec);
  if ((components & kSuperRes) && m.has_super_resolution())
    m.super_res = SuperResolution::load(path_join(dir, "super_resolution"), vspec);
  if (!addons.refiner.empty()) m.refiner = std::make_shared<const SdModel>(load_refiner(m, addons.refiner, components));
  return m;
}

bool SdModel::is_img2img_folder(const std::string& dir) {
  return !is_if(dir) && !is_upscaler(dir) && !is_unclip(dir) && !is_kandinsky(dir);
}
bool SdModel::has_super_resolution(const std::string& dir) { return dir_exists(path_join(dir, "super_resolution")); }
bool SdModel::is_unclip(const std::string& dir) { return UnclipParts::is_unclip_folder(dir); }
bool SdModel::is_kandinsky(const std::string& dir) { return UnclipParts::is_kandinsky_folder(dir); }
std::string SdModel::prompt_tokenizer_dir(const std::string& dir, const std::string& prior_dir) {
  if (is_kandinsky(dir)) {
    check_kandinsky_prior(dir, prior_dir);
    return UnclipParts::kandinsky_part(dir, prior_dir, "tokenizer");
  }
  return path_join(dir, dir_exists(path_join(dir, "tokenizer")) ? "tokenizer" : "tokenizer_2");
}
bool SdModel::has_if_stage2(const std::string& dir) {
  return pipeline_class(path_join(dir, "super_resolution")) == "IFSuperResolutionPipeline";
}
bool SdModel::is_if(const std::string& dir) { return pipeline_class(dir) == "IFPipeline"; }
bool SdModel::has_if_stage3(const std::string& dir) { return is_upscaler(path_join(dir, "upscaler")); }
bool SdModel::is_sdxl(const std::string& dir) {
  const std::string c = pipeline_class(dir);
  return c == "StableDiffusionXLPipeline" || c == "StableDiffusionXLImg2ImgPipeline" ||
         c == "StableDiffusionXLInpaintPipeline";
}
bool SdModel::is_sd3(const std::string& dir) { return pipeline_class(dir) == "StableDiffusion3Pipeline"; }
bool SdModel::is_flux(const std::string& dir) { return pipeline_class(dir) == "FluxPipeline"; }
double SdModel::default_guidance(const std::string& dir) {
  if (is_flux(dir)) return 3.5;
  if (is_kandinsky(dir)) return 4.0;
  if (is_sdxl(dir)) return 5.0;
  if (is_sd3(dir) || is_if(dir)) return 7.0;
  return 7.5;
}
bool SdModel::is_lcm_pipeline(const std::string& dir) {
  const std::string c = pipeline_class(dir);
  return c == "LatentConsistencyModelPipeline" || c == "LatentConsistencyModelImg2ImgPipeline";
}
bool SdModel::is_upscaler(const std::string& dir) { return pipeline_class(dir) == "StableDiffusionUpscalePipeline"; }

int64_t SdModel::size_multiple() const {
  const int64_t m = latent_factor() * denoiser_downscale();
  // Kandinsky 2.2's pipelines round a size up to a multiple of the MoVQ factor squared (downscale_height_and_width):
  // sizes that are multiples of it mean the same image there
  const int64_t f2 = latent_factor() * latent_factor();
  return kandinsky ? std::lcm(m, f2) : m;
}

void device_sync(const at::Device& device) {
  if (device.is_cuda()) nn::sync_current_stream(device);
}

}  // namespace diffpipe
