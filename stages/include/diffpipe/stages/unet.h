// UNet2DConditionModel (diffusers) for the Stable Diffusion 1.x/2.x family, on ATen.
// Blocks: CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D, CrossAttnUpBlock2D.
// attention_head_dim means the number of heads (the diffusers SD quirk), an int or one per block.
// Loads unet/config.json + diffusion_pytorch_model.safetensors; every shape is checked against the config.
// Thread-safety: forward() is const and reentrant.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "diffpipe/stages/lora.h"
#include "diffpipe/stages/weights.h"

namespace diffpipe {

class JsonConfig;

struct UNetConfig {
  int64_t in_channels = 4, out_channels = 4;
  std::vector<int64_t> block_out_channels;
  std::vector<std::string> down_block_types, up_block_types;
  std::string mid_block_type = "UNetMidBlock2DCrossAttn";  // "" = no mid block
  std::vector<int64_t> layers_per_block;                   // per down block
  std::vector<int64_t> heads;                              // per down block (num_attention_heads or attention_head_dim)
  std::vector<int64_t> attention_head_dim;                 // per down block, as written (SimpleCrossAttn: head width)
  std::vector<int64_t> cross_attention_dim;                // per down block
  std::vector<int64_t> transformer_layers_per_block;       // per down block
  bool use_linear_projection = false, upcast_attention = false;
  bool flip_sin_to_cos = true;
  double freq_shift = 0;
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  double mid_block_scale_factor = 1.0;
  int64_t downsample_padding = 1;
  int64_t sample_size = 64;
  std::string class_embed_type;  // "" (none) | "projection" (Stable unCLIP's image embedding) | "timestep" (a
                                 // level embedded like the timestep: DeepFloyd IF stage II's noise level)
  int64_t num_class_embeds = 0;     // > 0 (class_embed_type null): a learned embedding per class label, added to the
                                    // time embedding (the SD x4 upscaler's noise level, in [0, num_class_embeds))
  std::vector<bool> only_cross_attention;  // per down block (up blocks in reverse): attn1 attends to the text too
  std::string addition_embed_type;                 // "" (none) | "text_time" (SDXL: pooled text + size conditioning)
  int64_t addition_time_embed_dim = 0;             // text_time: sinusoid width per time id
  int64_t projection_class_embeddings_input_dim = 0;  // input width of class_embedding / add_embedding
  bool text_time() const { return addition_embed_type == "text_time"; }
  // DeepFloyd IF's UNets: gelu activations, scale-shift time conditioning, SimpleCrossAttn blocks, T5 states
  // projected by encoder_hid_proj and attention-pooled into the time embedding (addition_embed_type "text").
  std::string act_fn = "silu";               // silu | gelu
  std::string time_embedding_act_fn;         // "" | silu | gelu: applied to the summed time embedding
  bool resnet_scale_shift = false;           // resnet_time_scale_shift "scale_shift"
  bool resnet_skip_time_act = false;
  double resnet_out_scale_factor = 1.0;
  int64_t encoder_hid_dim = 0;               // > 0: encoder_hid_proj (text_proj) from this width
  // Kandinsky 2.2's decoder UNet (encoder_hid_dim_type "image_proj" with addition_embed_type "image"): conditioned
  // on an image embedding [B, encoder_hid_dim] alone, passed as the encoder_hidden_states: ImageProjection makes
  // its cross-attention tokens (a linear layer to 10 tokens, layer-normed), ImageTimeEmbedding adds it to the time
  // embedding (linear, layer norm).
  bool image_proj = false;
  bool image_conditioned() const { return image_proj; }
  int64_t addition_embed_type_num_heads = 64;  // addition_embed_type "text": attention-pooling heads
  bool cross_attention_norm = false;         // cross_attention_norm "group_norm" (SimpleCrossAttn blocks)
  // > 0: a Latent Consistency Model's UNet: time_embedding.cond_proj adds a projection of the guidance scale's
  // embedding (guidance_scale_embedding, this wide) to the timestep's; the pipelines run no classifier-free guidance
  int64_t time_cond_proj_dim = 0;
  static UNetConfig load(const std::string& config_json);  // rejects unsupported values, naming the key
  static UNetConfig from(const JsonConfig& config);         // the same from a parsed config
};

// A ControlNet's contribution to one UNet call: one tensor per skip connection (conv_in's output, then every
// resnet/attention output and downsampler of the down blocks, as diffusers' down_block_res_samples) and one for the
// mid block's output, added to them (diffusers' down_block_additional_residuals / mid_block_additional_residual).
struct UNetResiduals {
  std::vector<at::Tensor> down;
  at::Tensor mid;
};

class UNet2DConditionModel {
 public:
  // encoder_only: conv_in, the time embeddings, the down and mid blocks (a ControlNet's copy of them)
  UNet2DConditionModel(const UNetConfig& cfg, const Weights& w, bool encoder_only = false);
  // `lora`: layers fused into the weights first (those of component "unet"); `extra`: tensors added to the file's
  // (an IP-Adapter's, IpAdapterFile::unet_tensors, read from `extra_origin`)
  static std::shared_ptr<UNet2DConditionModel> load(const std::string& dir, const DeviceSpec& spec,
                                                    const std::vector<LoraLayer>& lora = {},
                                                    const std::map<std::string, at::Tensor>& extra = {},
                                                    const std::string& extra_origin = "");

  // sample: [B, C, H, W]; timesteps: [B] (float or int; one per sample) or a 0-d scalar for all;
  // encoder_hidden_states: [B, L, cross_attention_dim]; class_labels: [B, projection_class_embeddings_input_dim]
  // when class_embed_type is "projection" (added to the time embedding), [B] levels when it is "timestep" (embedded
  // as timesteps, then added) or when num_class_embeds is set (integral values: rows of the class table); for addition_embed_type "text_time"
  // (SDXL) the pooled text embedding [B, P] instead, with time_ids [B, K] (original size, crop corner, target
  // size: K = 6), where P + K * addition_time_embed_dim = projection_class_embeddings_input_dim; else undefined.
  // Returns the noise (or v) prediction [B, C_out, H, W].
  // `residuals` (a ControlNet's, [B, ...] like the skips): added to the skips and the mid block's output.
  // `timestep_cond` [B, time_cond_proj_dim] (LCM UNets: guidance_scale_embedding of guidance - 1): projected by
  // time_embedding.cond_proj and added to the timestep's sinusoid; undefined: nothing added (as diffusers' None).
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& timesteps, const at::Tensor& encoder_hidden_states,
                     const at::Tensor& class_labels = at::Tensor(), const at::Tensor& time_ids = at::Tensor(),
                     const UNetResiduals* residuals = nullptr, const at::Tensor& timestep_cond = at::Tensor()) const;
  // The down and mid blocks alone, with `conv_in_add` added to conv_in's output (a ControlNet's conditioning
  // embedding): the skips and the mid block's output, unscaled.
  UNetResiduals encode(const at::Tensor& sample, const at::Tensor& timesteps, const at::Tensor& encoder_hidden_states,
                       const at::Tensor& conv_in_add, const at::Tensor& class_labels = at::Tensor(),
                       const at::Tensor& time_ids = at::Tensor()) const;
  const UNetConfig& config() const { return cfg_; }
  int64_t downscale() const;
  size_t cuda_graphs() const;  // CUDA graphs captured so far (repeated GPU calls of one shape replay one)  // 2^(number of downsamplers): H and W must be multiples of this

 private:
  // forward() after the time embeddings: t_emb [B, C0] and class_labels (text_time: [text_embeds | time-id
  // sinusoids]) on the sample's device and dtype.
  // With `encoder_out`, stops after the mid block and returns its skips and output there (conv_in_add joins conv_in's
  // output); with `residuals`, adds them to the skips and the mid output.
  at::Tensor forward_embedded(const at::Tensor& sample, const at::Tensor& t_emb, const at::Tensor& context,
                              const at::Tensor& class_labels, const UNetResiduals* residuals = nullptr,
                              const at::Tensor& conv_in_add = at::Tensor(), UNetResiduals* encoder_out = nullptr) const;
  // forward()'s input checks and embeddings: t_emb and class labels on the sample's device and dtype.
  std::pair<at::Tensor, at::Tensor> embeddings(const at::Tensor& sample, const at::Tensor& t,
                                               const at::Tensor& class_labels, const at::Tensor& time_ids,
                                               const at::Tensor& timestep_cond = at::Tensor()) const;
  struct Impl;
  std::shared_ptr<const Impl> impl_;
  UNetConfig cfg_;
};

// The guidance scale's embedding of a Latent Consistency Model (diffusers' get_guidance_scale_embedding, as its
// pipelines call it with w = guidance - 1): [dim] float32, sin then cos of 1000 w x 10000^(-k / (dim/2 - 1)).
at::Tensor guidance_scale_embedding(double w, int64_t dim);

// diffusers' get_timestep_embedding: t: [B] -> [B, dim] (float32).
at::Tensor timestep_embedding(const at::Tensor& t, int64_t dim, bool flip_sin_to_cos, double freq_shift,
                              double scale = 1.0, double max_period = 10000.0);

}  // namespace diffpipe
