// Samplers (diffusers schedulers) as per-request state machines: DDIM, Euler, Euler ancestral, Heun, LMS, DPM-Solver++ 2M
// (optionally with Karras sigmas), PNDM/PLMS, DDPM, LCM (Latent Consistency Models) and UniPC. Each request owns its
// Sampler, so requests at different steps and with different samplers share one UNet call (the denoiser batches
// them).
// Thread-safety: a Sampler is used by one thread at a time; SchedulerConfig is immutable.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace diffpipe {

enum class SamplerKind {
  DDIM, Euler, EulerAncestral, DPMSolverMultistep, PNDM, DDPM, LCM, UniPC, DPMSolverSDE, Heun, LMS, DPMSolver3MSDE, KDPM2,
  FlowMatchEuler  // Stable Diffusion 3's; the only kind for flow-matching models, which no other kind fits
};

// Every key a diffusers scheduler_config.json may carry that these samplers read. Defaults follow diffusers.
struct SchedulerConfig {
  std::string class_name = "DDIMScheduler";
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.00085, beta_end = 0.012;
  std::string beta_schedule = "scaled_linear";  // linear | scaled_linear | squaredcos_cap_v2
  std::vector<double> trained_betas;              // overrides the schedule when non-empty
  std::string prediction_type = "epsilon";        // epsilon | v_prediction | sample
  std::string timestep_spacing;                   // leading | linspace | trailing ("" = the class default)
  int64_t steps_offset = 0;
  // absent from the file: the default of the class that runs (diffusers' from_config): DDIM's set_alpha_to_one and
  // clip_sample are true, PNDM's set_alpha_to_one false, DDPM's clip_sample true, LCM's clip_sample false
  std::optional<bool> set_alpha_to_one;
  std::optional<bool> clip_sample;
  double clip_sample_range = 1.0;
  bool rescale_betas_zero_snr = false;
  bool use_karras_sigmas = false;
  bool skip_prk_steps = true;
  int64_t solver_order = 2;
  std::string algorithm_type = "dpmsolver++";  // DPM-Solver++: dpmsolver++ | sde-dpmsolver++ (DPM++ 2M SDE)
  std::string solver_type = "midpoint";  // DPM-Solver++: midpoint | heun; UniPC: bh1 | bh2 (each maps the other's to
                                         // midpoint / bh2, as diffusers)
  std::vector<int64_t> disable_corrector;  // UniPC: steps whose corrector is skipped
  bool lower_order_final = true;
  bool euler_at_final = false;
  std::string final_sigmas_type = "zero";
  std::string interpolation_type = "linear";
  // LCMScheduler: the distillation's schedule of this many steps (every num_train_timesteps / n-th timestep), of
  // which a run takes evenly spaced entries; the boundary condition's timestep scaling
  int64_t original_inference_steps = 50;
  double timestep_scaling = 10.0;
  // DDPMScheduler: fixed_small | fixed_small_log | fixed_large | learned | learned_range (the
  // model predicts it: its output has twice the sample's channels, DeepFloyd IF)
  std::string variance_type = "fixed_small";
  bool thresholding = false;                // DDPMScheduler: Imagen's dynamic thresholding of the predicted x0
  double dynamic_thresholding_ratio = 0.995, sample_max_value = 1.0;
  // FlowMatchEulerDiscreteScheduler (Stable Diffusion 3's rectified flow: a sample is (1 - sigma) x0 + sigma noise,
  // the model predicts the velocity noise - x0): sigmas shifted by shift x s / (1 + (shift - 1) s), or with
  // use_dynamic_shifting by mu, interpolated from the image's token count between base_ and max_image_seq_len.
  double shift = 1.0;
  bool use_dynamic_shifting = false;
  double base_shift = 0.5, max_shift = 1.15;
  int64_t base_image_seq_len = 256, max_image_seq_len = 4096;
  bool flow_matching() const { return class_name == "FlowMatchEulerDiscreteScheduler"; }
  // Not a file key: the FLUX.1 pipelines pass sigmas = linspace(1, 1/n, n) (float32) instead of the scheduler's own
  bool linspace_sigmas = false;
  // Loads and validates (unsupported values are errors naming the key).
  static SchedulerConfig load(const std::string& path);
  // A DDPMScheduler config (Stable unCLIP's prior_scheduler and image_noising_scheduler), with its defaults, or an
  // UnCLIPScheduler's (Kandinsky 2.2's prior_scheduler: fixed_small_log or learned_range variance).
  static SchedulerConfig load_ddpm(const std::string& path);
};

// Parses a sampler name: ddim, euler, euler_karras, euler_a (euler_ancestral), heun, heun_karras, lms, lms_karras,
// dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde, dpmpp_3m_sde, dpmpp_3m_sde_karras,
// dpmpp_2m_sde_karras, pndm (plms), ddpm, lcm, unipc, unipc_karras.
// Sets *karras for the _karras names. Throws listing the valid names.
SamplerKind parse_sampler_name(const std::string& name, bool* karras);
// The kind a config's _class_name denotes (DPMSolverMultistepScheduler with algorithm_type sde-dpmsolver++:
// DPMSolverSDE, given `algorithm_type`).
SamplerKind sampler_kind_of_class(const std::string& class_name, const std::string& algorithm_type = "");
const char* sampler_kind_name(SamplerKind k);

// Noise for the sampler step `step` of this request (stochastic samplers only): a tensor shaped like the sample.
using StepNoise = std::function<at::Tensor(int step, const at::Tensor& like)>;

class Sampler {
 public:
  virtual ~Sampler() = default;
  // Builds a sampler for `steps` inference steps. `karras` forces Karras sigmas (DPM-Solver++). `strength` < 1 (LCM
  // only: LatentConsistencyModelImg2ImgPipeline): the steps spread over the first int(original_inference_steps x
  // strength) entries of the distillation's schedule, counted from its clean end.
  // `image_seq_len`: the image's token count, where the config's use_dynamic_shifting reads it (FlowMatchEuler).
  static std::unique_ptr<Sampler> create(SamplerKind kind, const SchedulerConfig& cfg, int steps, bool karras = false,
                                         double strength = 1.0, int64_t image_seq_len = 0);

  // Number of UNet evaluations (PNDM with skip_prk_steps makes steps + 1).
  int num_calls() const { return static_cast<int>(timesteps_.size()); }
  // The timestep fed to the UNet at call i (may be fractional for Euler).
  double timestep(int i) const { return timesteps_.at(i); }
  const std::vector<double>& timesteps() const { return timesteps_; }
  const std::vector<double>& sigmas() const { return sigmas_; }  // empty for DDIM/PNDM
  virtual double init_noise_sigma() const { return 1.0; }
  // UNet calls per step (diffusers' scheduler.order): 2 for Heun, whose steps are a call and its correction
  virtual int order() const { return 1; }
  virtual at::Tensor scale_model_input(const at::Tensor& sample, int i) const { (void)i; return sample; }
  // The sample at call i made from a clean one: diffusers' add_noise(original, noise, timesteps[i]) after
  // set_begin_index(i) (image-to-image starts part-way down the schedule). DDIM, PNDM and DDPM:
  // sqrt(alphas_cumprod[t]) x + sqrt(1 - alphas_cumprod[t]) noise; Euler: x + sigma_i noise; DPM-Solver++:
  // alpha_i x + sigma_i' noise (its sigma as a variance-preserving pair). Float32 scalars, as diffusers'.
  virtual at::Tensor add_noise(const at::Tensor& original, const at::Tensor& noise, int i) const;
  // One step: call index i, model output for the sample; returns the next sample.
  virtual at::Tensor step(const at::Tensor& model_output, int i, const at::Tensor& sample, const StepNoise& noise) = 0;
  virtual SamplerKind kind() const = 0;
  // Whether the model output carries a learned variance after the prediction (2C channels for C): DDPM with a
  // learned variance type. The denoiser guides only the prediction half.
  virtual bool learned_variance() const { return false; }

 protected:
  std::vector<double> timesteps_;
  std::vector<double> sigmas_;
  std::vector<float> alphas_cumprod_;  // the schedule's (DDIM, PNDM, DDPM: their steps and add_noise's form)
};

// DDPMScheduler (diffusers), the sampler of Stable unCLIP's prior and of DeepFloyd IF: sample, epsilon or v
// prediction, clip_sample range or dynamic thresholding, fixed or learned variance (a learned one is the second
// half of the model output's channels); every step but the one at t = 0 adds noise.
class DdpmSampler {
 public:
  // Timesteps as DDPMScheduler.set_timesteps(steps) makes them (leading, linspace or trailing spacing).
  DdpmSampler(const SchedulerConfig& cfg, int steps);
  int num_steps() const { return static_cast<int>(timesteps_.size()); }
  int64_t timestep(int i) const { return timesteps_.at(i); }
  bool adds_noise(int i) const { return timestep(i) > 0; }
  // One step: the model's output at call i for `sample` -> the previous sample. `noise` (standard normal, shaped
  // like sample) is used when adds_noise(i); it may be undefined otherwise. With a learned variance type the
  // output has 2C channels for a sample of C: the prediction, then the variance (values in [-1, 1] for
  // learned_range). `x0`, when given, receives the (clipped or thresholded) predicted original sample.
  at::Tensor step(const at::Tensor& model_output, int i, const at::Tensor& sample, const at::Tensor& noise,
                  at::Tensor* x0 = nullptr) const;
  bool learned_variance() const { return cfg_.variance_type == "learned" || cfg_.variance_type == "learned_range"; }
  // UnCLIPScheduler (Karlo, Kandinsky 2.2's prior): the same step on its own timesteps (evenly spaced from
  // num_train_timesteps - 1 down to 0), with the schedule's beta for a step between adjacent timesteps
  bool unclip() const { return cfg_.class_name == "UnCLIPScheduler"; }

 private:
  SchedulerConfig cfg_;
  std::vector<int64_t> timesteps_;
  std::vector<float> betas_;  // UnCLIPScheduler: the schedule's betas
  std::vector<float> alphas_cumprod_;  // the previous timestep is the next entry (diffusers' previous_timestep)
};

// alphas_cumprod of a config as a float32 tensor [num_train_timesteps] (diffusers' computation), and the betas
// it is the cumulative product of one minus.
at::Tensor alphas_cumprod(const SchedulerConfig& cfg);
at::Tensor train_betas(const SchedulerConfig& cfg);

}  // namespace diffpipe
