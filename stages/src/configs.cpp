// The config.json parsers of every model component, in one translation unit with no model code, so the fuzz
// suite builds them with AddressSanitizer and UndefinedBehaviorSanitizer (tests/fuzz). Each rejects values it
// does not support or that make no sense, naming the file and the key.
#include <cmath>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/stages/clip_text.h"
#include "diffpipe/stages/sampler.h"
#include "diffpipe/stages/super_res.h"
#include "diffpipe/stages/unet.h"
#include "diffpipe/stages/vae.h"

namespace diffpipe {

ClipTextConfig ClipTextConfig::load(const std::string& path) {
  const JsonConfig j = JsonConfig::load(path);
  ClipTextConfig c;
  c.vocab_size = j.integer("vocab_size", c.vocab_size);
  c.hidden_size = j.integer("hidden_size", c.hidden_size);
  c.intermediate_size = j.integer("intermediate_size", c.intermediate_size);
  c.num_hidden_layers = j.integer("num_hidden_layers", c.num_hidden_layers);
  c.num_attention_heads = j.integer("num_attention_heads", c.num_attention_heads);
  c.max_position_embeddings = j.integer("max_position_embeddings", c.max_position_embeddings);
  c.layer_norm_eps = j.number("layer_norm_eps", c.layer_norm_eps);
  c.hidden_act = j.string("hidden_act", c.hidden_act);
  c.eos_token_id = j.integer("eos_token_id", c.eos_token_id);
  c.projection_dim = j.integer("projection_dim", 0);
  if (c.hidden_act != "quick_gelu" && c.hidden_act != "gelu")
    j.fail("hidden_act", "unsupported activation '" + c.hidden_act + "' (supported: quick_gelu, gelu)");
  if (c.hidden_size <= 0 || c.num_attention_heads <= 0 || c.hidden_size % c.num_attention_heads != 0)
    j.fail("num_attention_heads", "hidden_size " + std::to_string(c.hidden_size) + " is not divisible by " +
                                      std::to_string(c.num_attention_heads) + " heads");
  if (c.num_hidden_layers <= 0) j.fail("num_hidden_layers", "must be positive");
  j.at_least("vocab_size", c.vocab_size, 1);
  j.at_least("intermediate_size", c.intermediate_size, 1);
  j.at_least("max_position_embeddings", c.max_position_embeddings, 1);
  j.at_least("projection_dim", c.projection_dim, 0);
  j.positive("layer_norm_eps", c.layer_norm_eps);
  if (c.eos_token_id < 0 || c.eos_token_id >= c.vocab_size)
    j.fail("eos_token_id", "must be a token id in [0, vocab_size " + std::to_string(c.vocab_size) + ")");
  return c;
}

static SchedulerConfig parse_scheduler(const std::string& path, bool ddpm);
SchedulerConfig SchedulerConfig::load(const std::string& path) { return parse_scheduler(path, false); }
SchedulerConfig SchedulerConfig::load_ddpm(const std::string& path) { return parse_scheduler(path, true); }

static SchedulerConfig parse_scheduler(const std::string& path, bool ddpm) {
  const JsonConfig j = JsonConfig::load(path);
  SchedulerConfig c;
  c.class_name = j.string("_class_name", ddpm ? "DDPMScheduler" : c.class_name);
  ddpm = ddpm || c.class_name == "DDPMScheduler";
  if (ddpm) {  // DeepFloyd IF's scheduler, Stable unCLIP's prior's, Kandinsky 2.2's prior's (UnCLIPScheduler)
    const bool unclip = c.class_name == "UnCLIPScheduler";
    if (c.class_name != "DDPMScheduler" && !unclip)
      j.fail("_class_name", "expected DDPMScheduler or UnCLIPScheduler, got '" + c.class_name + "'");
    c.beta_schedule = unclip ? "squaredcos_cap_v2" : "linear";  // their defaults
    c.beta_start = 0.0001;
    c.beta_end = 0.02;
    c.variance_type = j.string("variance_type", unclip ? "fixed_small_log" : "fixed_small");
    if (unclip && c.variance_type != "fixed_small_log" && c.variance_type != "learned_range")
      j.fail("variance_type", "unsupported '" + c.variance_type + "' for UnCLIPScheduler (supported: fixed_small_log, "
             "learned_range)");
    // (fixed_large_log is refused: diffusers' step takes the square root of a negative log there, NaN noise)
    if (c.variance_type != "fixed_small" && c.variance_type != "fixed_small_log" && c.variance_type != "fixed_large" &&
        c.variance_type != "learned" && c.variance_type != "learned_range")
      j.fail("variance_type", "unsupported '" + c.variance_type + "' (supported: fixed_small, fixed_small_log, "
             "fixed_large, learned, learned_range)");
    c.thresholding = j.boolean("thresholding", false);
    c.dynamic_thresholding_ratio = j.number("dynamic_thresholding_ratio", c.dynamic_thresholding_ratio);
    c.sample_max_value = j.number("sample_max_value", c.sample_max_value);
    if (!(c.dynamic_thresholding_ratio > 0 && c.dynamic_thresholding_ratio <= 1))
      j.fail("dynamic_thresholding_ratio", "must be in (0, 1]");
    if (!(c.sample_max_value >= 1)) j.fail("sample_max_value", "must be at least 1");
  }  // another class than the samplers': refused by the requests that would use it (resolve_params), so a folder
     // whose own scheduler is not supported still runs with a sampler chosen per request
  c.num_train_timesteps = j.integer("num_train_timesteps", c.num_train_timesteps);
  c.beta_start = j.number("beta_start", c.beta_start);
  c.beta_end = j.number("beta_end", c.beta_end);
  c.beta_schedule = j.string("beta_schedule", c.beta_schedule);
  if (j.has("trained_betas")) {
    if (!j.json()["trained_betas"].is_array()) j.fail("trained_betas", "expected a list of numbers");
    for (const auto& b : j.json()["trained_betas"]) {
      if (!b.is_number()) j.fail("trained_betas", "expected a list of numbers");
      c.trained_betas.push_back(b.get<double>());
    }
    if (static_cast<int64_t>(c.trained_betas.size()) != c.num_train_timesteps)
      j.fail("trained_betas", "needs num_train_timesteps entries");
  }
  c.prediction_type = j.string("prediction_type", c.prediction_type);
  c.timestep_spacing = j.string("timestep_spacing", "");
  c.steps_offset = j.integer("steps_offset", 0);
  if (j.has("set_alpha_to_one")) c.set_alpha_to_one = j.boolean("set_alpha_to_one", false);
  if (j.has("clip_sample")) c.clip_sample = j.boolean("clip_sample", false);
  c.clip_sample_range = j.number("clip_sample_range", 1.0);
  c.rescale_betas_zero_snr = j.boolean("rescale_betas_zero_snr", false);
  c.use_karras_sigmas = j.boolean("use_karras_sigmas", false);
  c.skip_prk_steps = j.boolean("skip_prk_steps", c.class_name == "PNDMScheduler" ? false : true);
  c.solver_order = j.integer("solver_order", 2);
  c.algorithm_type = j.string("algorithm_type", c.algorithm_type);
  c.solver_type = j.string("solver_type", c.solver_type);
  c.lower_order_final = j.boolean("lower_order_final", true);
  c.euler_at_final = j.boolean("euler_at_final", false);
  c.final_sigmas_type = j.string("final_sigmas_type", "zero");
  c.interpolation_type = j.string("interpolation_type", "linear");
  c.original_inference_steps = j.integer("original_inference_steps", c.original_inference_steps);
  c.timestep_scaling = j.number("timestep_scaling", c.timestep_scaling);
  if (c.num_train_timesteps < 2) j.fail("num_train_timesteps", "must be at least 2");
  if (c.num_train_timesteps > 100000) j.fail("num_train_timesteps", "must be at most 100000");
  j.positive("beta_start", c.beta_start);  // a negative or zero beta makes NaN noise levels
  j.positive("beta_end", c.beta_end);
  if (c.beta_start >= 1 || c.beta_end >= 1) j.fail("beta_end", "betas must be below 1");
  for (double b : c.trained_betas)
    if (!(std::isfinite(b) && b > 0 && b < 1)) j.fail("trained_betas", "every beta must be in (0, 1)");
  j.at_least("steps_offset", c.steps_offset, 0);
  j.positive("clip_sample_range", c.clip_sample_range);
  j.at_least("original_inference_steps", c.original_inference_steps, 1);
  if (c.original_inference_steps > c.num_train_timesteps)
    j.fail("original_inference_steps",
           "must be at most num_train_timesteps (" + std::to_string(c.num_train_timesteps) + ")");
  j.positive("timestep_scaling", c.timestep_scaling);
  if (c.beta_schedule != "linear" && c.beta_schedule != "scaled_linear" && c.beta_schedule != "squaredcos_cap_v2")
    j.fail("beta_schedule", "unsupported '" + c.beta_schedule + "' (supported: linear, scaled_linear, squaredcos_cap_v2)");
  if (c.prediction_type != "epsilon" && c.prediction_type != "v_prediction" && c.prediction_type != "sample")
    j.fail("prediction_type", "unsupported '" + c.prediction_type + "' (supported: epsilon, v_prediction, sample)");
  if (!c.timestep_spacing.empty() && c.timestep_spacing != "leading" && c.timestep_spacing != "linspace" &&
      c.timestep_spacing != "trailing")
    j.fail("timestep_spacing", "unsupported '" + c.timestep_spacing + "' (supported: leading, linspace, trailing)");
  if (!ddpm && j.boolean("thresholding", false))
    j.fail("thresholding", "dynamic thresholding is supported with DDPMScheduler only");
  if (c.algorithm_type != "dpmsolver++" && c.algorithm_type != "sde-dpmsolver++")
    j.fail("algorithm_type", "unsupported '" + c.algorithm_type + "' (supported: dpmsolver++, sde-dpmsolver++)");
  if (c.solver_type != "midpoint" && c.solver_type != "heun" && c.solver_type != "logrho" && c.solver_type != "bh1" &&
      c.solver_type != "bh2")
    j.fail("solver_type", "unsupported '" + c.solver_type + "' (supported: midpoint, heun, logrho, bh1, bh2)");
  if (c.solver_order < 1 || c.solver_order > 3) j.fail("solver_order", "supported: 1, 2 or 3");
  if (j.has("disable_corrector")) {  // UniPC
    const auto& v = j.json()["disable_corrector"];
    if (!v.is_array()) j.fail("disable_corrector", "expected a list of step indices");
    for (const auto& k : v) {
      if (!k.is_number_integer() || k.get<int64_t>() < 0) j.fail("disable_corrector", "expected step indices >= 0");
      c.disable_corrector.push_back(k.get<int64_t>());
    }
  }
  if (!j.boolean("predict_x0", true)) j.fail("predict_x0", "false (UniPC on the noise prediction) is not supported");
  if (c.final_sigmas_type != "zero" && c.final_sigmas_type != "sigma_min")
    j.fail("final_sigmas_type", "unsupported '" + c.final_sigmas_type + "' (supported: zero, sigma_min)");
  if (c.interpolation_type != "linear")
    j.fail("interpolation_type", "unsupported '" + c.interpolation_type + "' (supported: linear)");
  for (const char* k : {"use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"})
    if (j.boolean(k, false)) j.fail(k, "not supported");
  if (c.flow_matching()) {  // FlowMatchEulerDiscreteScheduler (Stable Diffusion 3): sigmas shifted toward noise
    c.shift = j.number("shift", 1.0);
    c.use_dynamic_shifting = j.boolean("use_dynamic_shifting", false);
    c.base_shift = j.number("base_shift", c.base_shift);
    c.max_shift = j.number("max_shift", c.max_shift);
    c.base_image_seq_len = j.integer("base_image_seq_len", c.base_image_seq_len);
    c.max_image_seq_len = j.integer("max_image_seq_len", c.max_image_seq_len);
    j.positive("shift", c.shift);
    j.finite("base_shift", c.base_shift);
    j.finite("max_shift", c.max_shift);
    j.at_least("base_image_seq_len", c.base_image_seq_len, 1);
    if (c.max_image_seq_len <= c.base_image_seq_len)
      j.fail("max_image_seq_len", "must exceed base_image_seq_len (" + std::to_string(c.base_image_seq_len) + ")");
    for (const char* k : {"invert_sigmas", "stochastic_sampling", "use_karras_sigmas"})
      if (j.boolean(k, false)) j.fail(k, "not supported for FlowMatchEulerDiscreteScheduler");
    if (j.has("shift_terminal")) j.fail("shift_terminal", "not supported (null only)");
    if (j.string("time_shift_type", "exponential") != "exponential")
      j.fail("time_shift_type", "supported: exponential");
  } else if (j.boolean("use_dynamic_shifting", false)) {
    j.fail("use_dynamic_shifting", "not supported");
  }
  if (j.has("timestep_type") && j.string("timestep_type") != "discrete") j.fail("timestep_type", "supported: discrete");
  if (j.has("variance_type") && c.class_name == "DPMSolverMultistepScheduler")
    j.fail("variance_type", "learned variance is not supported");
  return c;
}

SuperResConfig SuperResConfig::load(const std::string& path) {
  const JsonConfig j = JsonConfig::load(path);
  SuperResConfig c;
  c.scale = j.integer("scale", 2);
  c.channels = j.integer("channels", 32);
  c.layers = j.integer("layers", 4);
  if (c.scale < 1 || c.scale > 8) j.fail("scale", "must be in [1, 8]");
  if (c.channels < 1 || c.layers < 2) j.fail("layers", "need channels >= 1 and layers >= 2");
  return c;
}

UNetConfig UNetConfig::load(const std::string& path) { return from(JsonConfig::load(path)); }

UNetConfig UNetConfig::from(const JsonConfig& j) {
  UNetConfig c;
  c.in_channels = j.integer("in_channels", 4);
  c.out_channels = j.integer("out_channels", 4);
  c.block_out_channels = j.int_list("block_out_channels");
  c.down_block_types = j.string_list("down_block_types");
  c.up_block_types = j.string_list("up_block_types");
  const size_t n = c.block_out_channels.size();
  if (n == 0) j.fail("block_out_channels", "must not be empty");
  if (c.down_block_types.size() != n) j.fail("down_block_types", "needs one entry per block_out_channels entry");
  if (c.up_block_types.size() != n) j.fail("up_block_types", "needs one entry per block_out_channels entry");
  for (const auto& t : c.down_block_types)
    if (t != "CrossAttnDownBlock2D" && t != "DownBlock2D" && t != "SimpleCrossAttnDownBlock2D" &&
        t != "ResnetDownsampleBlock2D")
      j.fail("down_block_types", "unsupported block type '" + t + "' (supported: CrossAttnDownBlock2D, DownBlock2D, "
             "SimpleCrossAttnDownBlock2D, ResnetDownsampleBlock2D)");
  for (const auto& t : c.up_block_types)
    if (t != "CrossAttnUpBlock2D" && t != "UpBlock2D" && t != "SimpleCrossAttnUpBlock2D" && t != "ResnetUpsampleBlock2D")
      j.fail("up_block_types", "unsupported block type '" + t + "' (supported: CrossAttnUpBlock2D, UpBlock2D, "
             "SimpleCrossAttnUpBlock2D, ResnetUpsampleBlock2D)");
  c.mid_block_type = j.string("mid_block_type", "UNetMidBlock2DCrossAttn");
  if (c.mid_block_type != "UNetMidBlock2DCrossAttn" && c.mid_block_type != "UNetMidBlock2DSimpleCrossAttn")
    j.fail("mid_block_type", "unsupported mid block '" + c.mid_block_type +
           "' (supported: UNetMidBlock2DCrossAttn, UNetMidBlock2DSimpleCrossAttn)");
  c.layers_per_block = j.int_or_list("layers_per_block", n, 2);
  // diffusers: num_attention_heads = num_attention_heads or attention_head_dim
  c.heads = j.has("num_attention_heads") ? j.int_or_list("num_attention_heads", n, 8)
                                         : j.int_or_list("attention_head_dim", n, 8);
  c.attention_head_dim = j.int_or_list("attention_head_dim", n, 8);
  c.cross_attention_dim = j.int_or_list("cross_attention_dim", n, 1280);
  c.transformer_layers_per_block = j.int_or_list("transformer_layers_per_block", n, 1);
  c.use_linear_projection = j.boolean("use_linear_projection", false);
  c.upcast_attention = j.boolean("upcast_attention", false);  // no effect: fused attention (see nn::attention)
  c.flip_sin_to_cos = j.boolean("flip_sin_to_cos", true);
  c.freq_shift = j.number("freq_shift", 0);
  c.norm_num_groups = j.integer("norm_num_groups", 32);
  c.norm_eps = j.number("norm_eps", 1e-5);
  c.mid_block_scale_factor = j.number("mid_block_scale_factor", 1.0);
  c.downsample_padding = j.integer("downsample_padding", 1);
  c.sample_size = j.integer("sample_size", 64);
  // Values this implementation does not support are rejected rather than ignored.
  auto nullable_string = [&](const char* k) {
    return j.has(k) && !j.json()[k].is_null() ? j.string(k, "") : std::string();
  };
  c.act_fn = j.string("act_fn", "silu");
  if (c.act_fn != "silu" && c.act_fn != "gelu") j.fail("act_fn", "unsupported '" + c.act_fn + "' (supported: silu, gelu)");
  c.time_embedding_act_fn = nullable_string("time_embedding_act_fn");
  if (!c.time_embedding_act_fn.empty() && c.time_embedding_act_fn != "silu" && c.time_embedding_act_fn != "gelu")
    j.fail("time_embedding_act_fn", "unsupported '" + c.time_embedding_act_fn + "' (supported: null, silu, gelu)");
  const std::string shift = j.string("resnet_time_scale_shift", "default");
  if (shift != "default" && shift != "scale_shift")
    j.fail("resnet_time_scale_shift", "unsupported '" + shift + "' (supported: default, scale_shift)");
  c.resnet_scale_shift = shift == "scale_shift";
  c.resnet_skip_time_act = j.boolean("resnet_skip_time_act", false);
  c.resnet_out_scale_factor = j.number("resnet_out_scale_factor", 1.0);
  j.positive("resnet_out_scale_factor", c.resnet_out_scale_factor);
  c.encoder_hid_dim = j.has("encoder_hid_dim") && !j.json()["encoder_hid_dim"].is_null() ? j.integer("encoder_hid_dim", 0) : 0;
  if (c.encoder_hid_dim > 0) {
    const std::string t = nullable_string("encoder_hid_dim_type");
    if (t != "text_proj" && t != "image_proj" && !t.empty())
      j.fail("encoder_hid_dim_type", "unsupported '" + t + "' (supported: text_proj, image_proj)");
    c.image_proj = t == "image_proj";
  }
  const std::string xnorm = nullable_string("cross_attention_norm");
  if (!xnorm.empty() && xnorm != "group_norm")
    j.fail("cross_attention_norm", "unsupported '" + xnorm + "' (supported: null, group_norm)");
  c.cross_attention_norm = xnorm == "group_norm";
  c.addition_embed_type_num_heads = j.integer("addition_embed_type_num_heads", 64);
  j.require("time_embedding_type", "positional");
  c.class_embed_type = nullable_string("class_embed_type");
  if (!c.class_embed_type.empty() && c.class_embed_type != "projection" && c.class_embed_type != "timestep")
    j.fail("class_embed_type", "unsupported value \"" + c.class_embed_type +
           "\" (supported: null, \"projection\", \"timestep\")");
  if (c.class_embed_type == "projection") {
    c.projection_class_embeddings_input_dim = j.integer("projection_class_embeddings_input_dim", 0);
    j.at_least("projection_class_embeddings_input_dim", c.projection_class_embeddings_input_dim, 1);
    j.require("class_embeddings_concat", false);
  }
  // num_class_embeds (the SD x4 upscaler's noise level): a table of learned class embeddings, added to the time
  // embedding, when class_embed_type is null
  c.num_class_embeds = j.has("num_class_embeds") && !j.json()["num_class_embeds"].is_null()
                           ? j.integer("num_class_embeds", 0) : 0;
  if (c.num_class_embeds != 0) {
    j.at_least("num_class_embeds", c.num_class_embeds, 1);
    if (!c.class_embed_type.empty()) j.fail("num_class_embeds", "must be null when class_embed_type is set");
  }
  c.addition_embed_type = nullable_string("addition_embed_type");
  if (!c.addition_embed_type.empty() && c.addition_embed_type != "text_time" && c.addition_embed_type != "text" &&
      c.addition_embed_type != "image")
    j.fail("addition_embed_type", "unsupported value \"" + c.addition_embed_type +
           "\" (supported: null, \"text_time\", \"text\", \"image\")");
  // both read the image embedding (Kandinsky 2.2), which arrives in place of the text states
  if ((c.addition_embed_type == "image") != c.image_proj)
    j.fail("addition_embed_type", "\"image\" goes with encoder_hid_dim_type \"image_proj\" (Kandinsky 2.2), and only "
           "with it");
  if (c.addition_embed_type == "text") {
    if (c.encoder_hid_dim <= 0 || c.image_proj)
      j.fail("addition_embed_type", "\"text\" needs encoder_hid_dim (the T5 width) and text_proj");
    if (c.addition_embed_type_num_heads <= 0 || c.encoder_hid_dim % c.addition_embed_type_num_heads != 0)
      j.fail("addition_embed_type_num_heads", "must divide encoder_hid_dim " + std::to_string(c.encoder_hid_dim));
  }
  if (c.text_time()) {
    if (!c.class_embed_type.empty()) j.fail("class_embed_type", "must be null with addition_embed_type \"text_time\"");
    c.addition_time_embed_dim = j.integer("addition_time_embed_dim", 0);
    j.at_least("addition_time_embed_dim", c.addition_time_embed_dim, 1);
    c.projection_class_embeddings_input_dim = j.integer("projection_class_embeddings_input_dim", 0);
    j.at_least("projection_class_embeddings_input_dim", c.projection_class_embeddings_input_dim, 1);
  }
  // LCM-distilled UNets: the guidance scale's embedding of this width joins the time embedding (cond_proj)
  c.time_cond_proj_dim = j.integer("time_cond_proj_dim", 0);
  if (j.has("time_cond_proj_dim")) j.at_least("time_cond_proj_dim", c.time_cond_proj_dim, 4);  // sin, cos pairs
  j.require("time_embedding_dim", nullptr);
  j.require("timestep_post_act", nullptr);
  // only_cross_attention (the SD x4 upscaler): a block's first attention attends to the text too; a bool or one per
  // down block (up blocks in reverse); the mid block: diffusers' default (the bool, or false for a list)
  c.only_cross_attention.assign(n, false);
  if (j.has("only_cross_attention")) {
    const auto& v = j.json()["only_cross_attention"];
    if (v.is_boolean()) {
      c.only_cross_attention.assign(n, v.get<bool>());
    } else if (v.is_array() && v.size() == n && std::all_of(v.begin(), v.end(), [](const auto& b) { return b.is_boolean(); })) {
      for (size_t i = 0; i < n; ++i) c.only_cross_attention[i] = v[i].get<bool>();
    } else {
      j.fail("only_cross_attention", "must be a boolean or one boolean per block_out_channels entry");
    }
  }
  for (size_t i = 0; i < n; ++i)
    if (c.only_cross_attention[i] && c.down_block_types[i] != "CrossAttnDownBlock2D" && c.down_block_types[i] != "DownBlock2D")
      j.fail("only_cross_attention", "is supported for CrossAttn blocks only, not " + c.down_block_types[i]);
  // the mid block takes it only as a single boolean (or mid_block_only_cross_attention), and only its SimpleCrossAttn
  // form uses it
  bool mid_only = j.has("only_cross_attention") && j.json()["only_cross_attention"].is_boolean() && c.only_cross_attention[0];
  if (j.has("mid_block_only_cross_attention") && !j.json()["mid_block_only_cross_attention"].is_null())
    mid_only = j.boolean("mid_block_only_cross_attention", false);
  if (mid_only && c.mid_block_type == "UNetMidBlock2DSimpleCrossAttn")
    j.fail("only_cross_attention", "is not supported for UNetMidBlock2DSimpleCrossAttn");
  j.require("dual_cross_attention", false);
  j.require("center_input_sample", false);
  j.require("conv_in_kernel", 3);
  j.require("conv_out_kernel", 3);
  j.require("attention_type", "default");
  j.require("class_embeddings_concat", false);
  j.require("reverse_transformer_layers_per_block", nullptr);
  // Values that would crash or silently break the forward pass are refused here, naming the key.
  j.at_least("in_channels", c.in_channels, 1);
  j.at_least("out_channels", c.out_channels, 1);
  j.at_least("block_out_channels", c.block_out_channels, 1);
  j.at_least("layers_per_block", c.layers_per_block, 1);
  j.at_least("cross_attention_dim", c.cross_attention_dim, 1);
  j.at_least("transformer_layers_per_block", c.transformer_layers_per_block, 1);
  j.at_least("norm_num_groups", c.norm_num_groups, 1);
  j.at_least("sample_size", c.sample_size, 1);
  j.positive("norm_eps", c.norm_eps);
  j.positive("mid_block_scale_factor", c.mid_block_scale_factor);
  j.finite("freq_shift", c.freq_shift);
  if (c.downsample_padding != 0 && c.downsample_padding != 1) j.fail("downsample_padding", "must be 0 or 1");
  for (size_t i = 0; i < n; ++i) {
    if (c.block_out_channels[i] % c.norm_num_groups != 0)
      j.fail("block_out_channels", "channels " + std::to_string(c.block_out_channels[i]) +
                                       " are not divisible by norm_num_groups " + std::to_string(c.norm_num_groups));
    const bool simple = c.down_block_types[i] == "SimpleCrossAttnDownBlock2D" ||
                        (i + 1 == n && c.mid_block_type == "UNetMidBlock2DSimpleCrossAttn");
    if (simple && (c.attention_head_dim[i] <= 0 || c.block_out_channels[i] % c.attention_head_dim[i] != 0))
      j.fail("attention_head_dim", "block " + std::to_string(i) + ": " + std::to_string(c.block_out_channels[i]) +
                                       " channels are not a multiple of the head width " +
                                       std::to_string(c.attention_head_dim[i]));
    if (c.heads[i] <= 0 || c.block_out_channels[i] % c.heads[i] != 0)
      j.fail("attention_head_dim", "block " + std::to_string(i) + ": " + std::to_string(c.block_out_channels[i]) +
                                       " channels are not divisible by " + std::to_string(c.heads[i]) + " heads");
  }
  return c;
}

VaeConfig VaeConfig::load(const std::string& path) {
  const JsonConfig j = JsonConfig::load(path);
  VaeConfig c;
  c.in_channels = j.integer("in_channels", 3);
  c.out_channels = j.integer("out_channels", 3);
  c.latent_channels = j.integer("latent_channels", 4);
  c.block_out_channels = j.int_list("block_out_channels");
  if (c.block_out_channels.empty()) j.fail("block_out_channels", "must not be empty");
  c.layers_per_block = j.integer("layers_per_block", 1);
  c.norm_num_groups = j.integer("norm_num_groups", 32);
  c.scaling_factor = j.number("scaling_factor", 0.18215);
  c.shift_factor = j.number("shift_factor", 0.0);
  c.use_quant_conv = j.boolean("use_quant_conv", true);
  c.use_post_quant_conv = j.boolean("use_post_quant_conv", true);
  c.mid_block_add_attention = j.boolean("mid_block_add_attention", true);
  c.force_upcast = j.boolean("force_upcast", true);
  if (j.has("act_fn") && j.string("act_fn") != "silu") j.fail("act_fn", "unsupported activation (supported: silu)");
  c.vq = j.string("_class_name", "AutoencoderKL") == "VQModel";
  const std::string norm = j.string("norm_type", "group");
  if (norm != "group" && norm != "spatial") j.fail("norm_type", "unsupported '" + norm + "' (supported: group, spatial)");
  c.spatial_norm = norm == "spatial";
  if (c.vq) {
    const int64_t vq_dim = j.has("vq_embed_dim") && !j.json()["vq_embed_dim"].is_null()
                               ? j.integer("vq_embed_dim", c.latent_channels) : c.latent_channels;
    if (vq_dim != c.latent_channels)
      j.fail("vq_embed_dim", std::to_string(vq_dim) + " differs from latent_channels " + std::to_string(c.latent_channels) +
             " (not supported)");
    if (j.boolean("lookup_from_codebook", false)) j.fail("lookup_from_codebook", "is not supported (true)");
  }
  auto block_types = [&](const char* key, const char* plain, const char* attn, std::vector<bool>& attention) {
    attention.assign(c.block_out_channels.size(), false);
    if (!j.has(key)) return;
    const auto types = j.string_list(key);
    if (types.size() != c.block_out_channels.size()) j.fail(key, "needs one entry per block_out_channels entry");
    for (size_t i = 0; i < types.size(); ++i) {
      if (types[i] != plain && types[i] != attn)
        j.fail(key, "unsupported block type '" + types[i] + "' (supported: " + plain + ", " + attn + ")");
      attention[i] = types[i] == attn;
    }
  };
  block_types("down_block_types", "DownEncoderBlock2D", "AttnDownEncoderBlock2D", c.down_attention);
  block_types("up_block_types", "UpDecoderBlock2D", "AttnUpDecoderBlock2D", c.up_attention);
  if (j.has("latents_mean") || j.has("latents_std")) j.fail("latents_mean", "per-channel latent statistics are not supported");
  j.at_least("in_channels", c.in_channels, 1);
  j.at_least("out_channels", c.out_channels, 1);
  j.at_least("latent_channels", c.latent_channels, 1);
  j.at_least("block_out_channels", c.block_out_channels, 1);
  j.at_least("layers_per_block", c.layers_per_block, 1);
  j.at_least("norm_num_groups", c.norm_num_groups, 1);
  j.positive("scaling_factor", c.scaling_factor);  // 0 would divide the latents into inf (black images)
  j.finite("shift_factor", c.shift_factor);
  for (auto ch : c.block_out_channels) {
    if (ch % c.norm_num_groups != 0)
      j.fail("block_out_channels", std::to_string(ch) + " channels are not divisible by norm_num_groups");
    if (c.spatial_norm && ch % 32 != 0)  // SpatialNorm's group norm has 32 groups whatever norm_num_groups says
      j.fail("block_out_channels", std::to_string(ch) + " channels are not divisible by 32 (norm_type spatial)");
  }
  return c;
}

}  // namespace diffpipe
