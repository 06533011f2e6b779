#include "diffpipe/stages/sampler.h"

#include <algorithm>
#include <cmath>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"

namespace diffpipe {

SamplerKind sampler_kind_of_class(const std::string& n, const std::string& algorithm_type) {
  if (n == "DDIMScheduler") return SamplerKind::DDIM;
  if (n == "EulerDiscreteScheduler") return SamplerKind::Euler;
  if (n == "EulerAncestralDiscreteScheduler") return SamplerKind::EulerAncestral;
  if (n == "HeunDiscreteScheduler") return SamplerKind::Heun;
  if (n == "LMSDiscreteScheduler") return SamplerKind::LMS;
  if (n == "KDPM2DiscreteScheduler") return SamplerKind::KDPM2;
  if (n == "DPMSolverMultistepScheduler")
    return algorithm_type == "sde-dpmsolver++" ? SamplerKind::DPMSolverSDE : SamplerKind::DPMSolverMultistep;
  if (n == "PNDMScheduler") return SamplerKind::PNDM;
  if (n == "DDPMScheduler") return SamplerKind::DDPM;
  if (n == "LCMScheduler") return SamplerKind::LCM;
  if (n == "UniPCMultistepScheduler") return SamplerKind::UniPC;
  if (n == "FlowMatchEulerDiscreteScheduler") return SamplerKind::FlowMatchEuler;
  DP_FAIL("scheduler class '", n,
          "' is not supported (supported: DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, "
          "HeunDiscreteScheduler, LMSDiscreteScheduler, KDPM2DiscreteScheduler, DPMSolverMultistepScheduler, PNDMScheduler, DDPMScheduler, "
          "LCMScheduler, UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler); choose a sampler per request (--sampler NAME, JSONL/HTTP "
          "\"sampler\")");
}

SamplerKind parse_sampler_name(const std::string& n, bool* karras) {
  *karras = false;
  if (n == "ddim") return SamplerKind::DDIM;
  if (n == "euler") return SamplerKind::Euler;
  if (n == "euler_a" || n == "euler_ancestral") return SamplerKind::EulerAncestral;
  if (n == "kdpm2" || n == "kdpm2_karras" || n == "dpm2" || n == "dpm2_karras") {
    *karras = n == "kdpm2_karras" || n == "dpm2_karras";
    return SamplerKind::KDPM2;
  }
  if (n == "lms" || n == "lms_karras") {
    *karras = n == "lms_karras";
    return SamplerKind::LMS;
  }
  if (n == "euler_karras") {
    *karras = true;
    return SamplerKind::Euler;
  }
  if (n == "heun" || n == "heun_karras") {
    *karras = n == "heun_karras";
    return SamplerKind::Heun;
  }
  if (n == "dpmpp_2m" || n == "dpm++2m") return SamplerKind::DPMSolverMultistep;
  if (n == "dpmpp_2m_karras") {
    *karras = true;
    return SamplerKind::DPMSolverMultistep;
  }
  if (n == "dpmpp_3m_sde" || n == "dpmpp_3m_sde_karras") {
    *karras = n == "dpmpp_3m_sde_karras";
    return SamplerKind::DPMSolver3MSDE;
  }
  if (n == "dpmpp_2m_sde" || n == "dpmpp_2m_sde_karras") {
    *karras = n == "dpmpp_2m_sde_karras";
    return SamplerKind::DPMSolverSDE;
  }
  if (n == "pndm" || n == "plms") return SamplerKind::PNDM;
  if (n == "ddpm") return SamplerKind::DDPM;
  if (n == "lcm") return SamplerKind::LCM;
  if (n == "unipc") return SamplerKind::UniPC;
  if (n == "unipc_karras") {
    *karras = true;
    return SamplerKind::UniPC;
  }
  if (n == "flow_euler") return SamplerKind::FlowMatchEuler;
  DP_FAIL("unknown sampler '", n, "' (valid: ddim, euler, euler_karras, euler_a, heun, heun_karras, kdpm2, "
          "kdpm2_karras, lms, lms_karras, "
          "dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde, dpmpp_2m_sde_karras, dpmpp_3m_sde, dpmpp_3m_sde_karras, pndm, ddpm, "
          "lcm, unipc, unipc_karras, flow_euler)");
}

const char* sampler_kind_name(SamplerKind k) {
  switch (k) {
    case SamplerKind::DDIM: return "ddim";
    case SamplerKind::Euler: return "euler";
    case SamplerKind::EulerAncestral: return "euler_a";
    case SamplerKind::DPMSolverMultistep: return "dpmpp_2m";
    case SamplerKind::PNDM: return "pndm";
    case SamplerKind::DDPM: return "ddpm";
    case SamplerKind::LCM: return "lcm";
    case SamplerKind::UniPC: return "unipc";
    case SamplerKind::DPMSolverSDE: return "dpmpp_2m_sde";
    case SamplerKind::Heun: return "heun";
    case SamplerKind::LMS: return "lms";
    case SamplerKind::KDPM2: return "kdpm2";
    case SamplerKind::DPMSolver3MSDE: return "dpmpp_3m_sde";
    case SamplerKind::FlowMatchEuler: return "flow_euler";
  }
  return "?";
}

at::Tensor train_betas(const SchedulerConfig& c) {
  const int64_t N = c.num_train_timesteps;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor betas;
  if (!c.trained_betas.empty()) {
    betas = at::tensor(c.trained_betas, at::TensorOptions().dtype(at::kDouble)).to(at::kFloat);
  } else if (c.beta_schedule == "linear") {
    betas = at::linspace(c.beta_start, c.beta_end, N, f32);
  } else if (c.beta_schedule == "scaled_linear") {
    betas = at::linspace(std::sqrt(c.beta_start), std::sqrt(c.beta_end), N, f32).pow(2);
  } else {  // squaredcos_cap_v2
    std::vector<double> b(N);
    auto abar = [](double t) { return std::pow(std::cos((t + 0.008) / 1.008 * M_PI / 2), 2); };
    for (int64_t i = 0; i < N; ++i)
      b[i] = std::min(1 - abar(double(i + 1) / N) / abar(double(i) / N), 0.999);
    betas = at::tensor(b, at::TensorOptions().dtype(at::kDouble)).to(at::kFloat);
  }
  if (c.rescale_betas_zero_snr) {
    at::Tensor sq = at::cumprod(1.0 - betas, 0).sqrt();
    at::Tensor a0 = sq[0].clone(), aT = sq[-1].clone();
    sq = (sq - aT) * (a0 / (a0 - aT));
    at::Tensor bar = sq.pow(2);
    at::Tensor alphas = at::cat({bar.slice(0, 0, 1), bar.slice(0, 1) / bar.slice(0, 0, -1)});
    betas = 1.0 - alphas;
  }
  return betas;
}

at::Tensor alphas_cumprod(const SchedulerConfig& c) { return at::cumprod(1.0 - train_betas(c), 0); }

namespace {

std::vector<float> to_vec(const at::Tensor& t) {
  at::Tensor c = t.to(at::kFloat).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

std::string spacing_of(const SchedulerConfig& c, const char* class_default) {
  return c.timestep_spacing.empty() ? class_default : c.timestep_spacing;
}

// "trailing" spacing: np.arange(N, 0, -N / steps).round() - 1, as numpy computes it: ceil(N / ratio) entries, entry k
// N - k x ratio (not a running difference, which can leave a last entry just above 0 and a timestep of -1).
std::vector<double> trailing_timesteps(int64_t N, int steps) {
  const double ratio = double(N) / steps;
  const int64_t n = static_cast<int64_t>(std::ceil(double(N) / ratio));
  std::vector<double> t;
  for (int64_t k = 0; k < n; ++k) t.push_back(std::nearbyint(double(N) - double(k) * ratio) - 1);
  return t;
}

// Integer timesteps as DDIM/PNDM compute them (descending for DDIM; PNDM reorders itself).
std::vector<int64_t> int_timesteps(const SchedulerConfig& c, int steps, const std::string& spacing) {
  const int64_t N = c.num_train_timesteps;
  std::vector<int64_t> t;
  if (spacing == "linspace") {
    for (int i = steps - 1; i >= 0; --i)
      t.push_back(static_cast<int64_t>(std::nearbyint(steps == 1 ? 0.0 : double(N - 1) * i / (steps - 1))));
  } else if (spacing == "leading") {
    const int64_t ratio = N / steps;
    for (int i = steps - 1; i >= 0; --i) t.push_back(int64_t(i) * ratio + c.steps_offset);
  } else {  // trailing
    for (double v : trailing_timesteps(N, steps)) t.push_back(static_cast<int64_t>(v));
  }
  return t;
}

double interp(double x, const std::vector<float>& fp) {  // np.interp(x, arange(len(fp)), fp)
  const int64_t n = static_cast<int64_t>(fp.size());
  if (x <= 0) return fp[0];
  if (x >= n - 1) return fp[n - 1];
  const int64_t j = static_cast<int64_t>(std::floor(x));
  const double slope = (double(fp[j + 1]) - double(fp[j]));
  return slope * (x - double(j)) + double(fp[j]);
}

std::vector<double> karras(double sigma_min, double sigma_max, int n) {
  const double rho = 7.0, lo = std::pow(sigma_min, 1 / rho), hi = std::pow(sigma_max, 1 / rho);
  std::vector<double> s(n);
  for (int i = 0; i < n; ++i) {
    const double ramp = n == 1 ? 0.0 : double(i) / (n - 1);
    s[i] = std::pow(hi + ramp * (lo - hi), rho);
  }
  return s;
}

double sigma_to_t(double sigma, const std::vector<float>& log_sigmas) {
  const double ls = std::log(std::max(sigma, 1e-10));
  const int64_t n = static_cast<int64_t>(log_sigmas.size());
  // low_idx: last index with log_sigma >= log_sigmas[i] (cumsum(dists >= 0).argmax), clipped to n - 2
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += (ls - log_sigmas[i]) >= 0;
  int64_t low = std::max<int64_t>(count - 1, 0);
  low = std::min(low, n - 2);
  const double lo = log_sigmas[low], hi = log_sigmas[low + 1];
  double w = (lo - ls) / (lo - hi);
  w = std::min(std::max(w, 0.0), 1.0);
  return (1 - w) * low + w * (low + 1);
}

at::Tensor predicted_x0_from_eps_sigma(const SchedulerConfig& c, const at::Tensor& sample, const at::Tensor& out,
                                       double sigma) {
  if (c.prediction_type == "epsilon") return sample - sigma * out;
  if (c.prediction_type == "v_prediction") return out * (-sigma / std::sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1);
  return out;
}

// ---------------------------------------------------------------- DDIM (eta = 0)
class DDIMSampler : public Sampler {
 public:
  DDIMSampler(const SchedulerConfig& c, int steps) : c_(c), steps_(steps) {
    alphas_cumprod_ = to_vec(alphas_cumprod(c));
    final_ = c.set_alpha_to_one.value_or(true) ? 1.0f : alphas_cumprod_[0];
    for (auto t : int_timesteps(c, steps, spacing_of(c, "leading"))) timesteps_.push_back(double(t));
  }
  SamplerKind kind() const override { return SamplerKind::DDIM; }
  at::Tensor step(const at::Tensor& e, int i, const at::Tensor& x, const StepNoise&) override {
    const int64_t t = static_cast<int64_t>(timesteps_.at(i));
    const int64_t prev = t - c_.num_train_timesteps / steps_;
    const double a = alphas_cumprod_.at(t), a_prev = prev >= 0 ? alphas_cumprod_.at(prev) : final_, b = 1 - a;
    at::Tensor x0, eps;
    if (c_.prediction_type == "epsilon") {
      x0 = (x - std::sqrt(b) * e) / std::sqrt(a);
      eps = e;
    } else if (c_.prediction_type == "sample") {
      x0 = e;
      eps = (x - std::sqrt(a) * x0) / std::sqrt(b);
    } else {
      x0 = std::sqrt(a) * x - std::sqrt(b) * e;
      eps = std::sqrt(a) * e + std::sqrt(b) * x;
    }
    if (c_.clip_sample.value_or(true)) x0 = x0.clamp(-c_.clip_sample_range, c_.clip_sample_range);
    return std::sqrt(a_prev) * x0 + std::sqrt(1 - a_prev) * eps;
  }

 private:
  SchedulerConfig c_;
  int steps_;
  float final_;
};

// ---------------------------------------------------------------- PNDM (PLMS, skip_prk_steps)
class PNDMSampler : public Sampler {
 public:
  PNDMSampler(const SchedulerConfig& c, int steps) : c_(c), steps_(steps) {
    DP_CHECK(c.skip_prk_steps, "PNDM: skip_prk_steps = false (Runge-Kutta warm-up) is not supported");
    alphas_cumprod_ = to_vec(alphas_cumprod(c));
    final_ = c.set_alpha_to_one.value_or(false) ? 1.0f : alphas_cumprod_[0];
    const std::string sp = spacing_of(c, "leading");
    std::vector<int64_t> asc;
    if (sp == "linspace") {
      for (int i = 0; i < steps; ++i)
        asc.push_back(static_cast<int64_t>(std::nearbyint(steps == 1 ? 0.0 : double(c.num_train_timesteps - 1) * i / (steps - 1))));
    } else if (sp == "leading") {
      const int64_t r = c.num_train_timesteps / steps;
      for (int i = 0; i < steps; ++i) asc.push_back(int64_t(i) * r + c.steps_offset);
    } else {
      auto d = int_timesteps(c, steps, "trailing");
      asc.assign(d.rbegin(), d.rend());
    }
    // plms: [t0 .. t_{n-2}, t_{n-2}, t_{n-1}] reversed
    std::vector<int64_t> plms(asc.begin(), asc.end() - 1);
    if (asc.size() >= 2) plms.push_back(asc[asc.size() - 2]);
    plms.push_back(asc.back());
    for (auto it = plms.rbegin(); it != plms.rend(); ++it) timesteps_.push_back(double(*it));
  }
  SamplerKind kind() const override { return SamplerKind::PNDM; }
  at::Tensor step(const at::Tensor& e_in, int i, const at::Tensor& x_in, const StepNoise&) override {
    int64_t t = static_cast<int64_t>(timesteps_.at(i));
    const int64_t ratio = c_.num_train_timesteps / steps_;
    int64_t prev = t - ratio;
    at::Tensor e = e_in, x = x_in;
    if (counter_ != 1) {
      if (ets_.size() > 3) ets_.erase(ets_.begin(), ets_.end() - 3);
      ets_.push_back(e_in);
    } else {
      prev = t;
      t = t + ratio;
    }
    const size_t n = ets_.size();
    if (n == 1 && counter_ == 0) {
      cur_sample_ = x;
    } else if (n == 1 && counter_ == 1) {
      e = (e + ets_[0]) / 2;
      x = cur_sample_;
      cur_sample_ = at::Tensor();
    } else if (n == 2) {
      e = (3 * ets_[1] - ets_[0]) / 2;
    } else if (n == 3) {
      e = (23 * ets_[2] - 16 * ets_[1] + 5 * ets_[0]) / 12;
    } else {
      e = (1.0 / 24) * (55 * ets_[n - 1] - 59 * ets_[n - 2] + 37 * ets_[n - 3] - 9 * ets_[n - 4]);
    }
    const double a = alphas_cumprod_.at(t), a_prev = prev >= 0 ? alphas_cumprod_.at(prev) : final_, b = 1 - a,
                 b_prev = 1 - a_prev;
    if (c_.prediction_type == "v_prediction") e = std::sqrt(a) * e + std::sqrt(b) * x;
    DP_CHECK(c_.prediction_type != "sample", "PNDM: prediction_type 'sample' is not supported");
    const double sample_coeff = std::sqrt(a_prev / a);
    const double denom = a * std::sqrt(b_prev) + std::sqrt(a * b * a_prev);
    ++counter_;
    return sample_coeff * x - (a_prev - a) * e / denom;
  }

 private:
  SchedulerConfig c_;
  int steps_;
  float final_;
  int counter_ = 0;
  std::vector<at::Tensor> ets_;
  at::Tensor cur_sample_;
};

// The training schedule's sigmas sqrt((1 - alphas_cumprod) / alphas_cumprod) in float32 (zero terminal SNR: the last
// alphas_cumprod 2^-24, as diffusers), and their logarithms.
void training_sigmas(const SchedulerConfig& c, std::vector<float>* sigmas, std::vector<float>* log_sigmas) {
  at::Tensor ac = alphas_cumprod(c);
  if (c.rescale_betas_zero_snr) ac[-1].fill_(std::pow(2.0, -24));
  *sigmas = to_vec(((1 - ac) / ac).pow(0.5));
  log_sigmas->resize(sigmas->size());
  for (size_t k = 0; k < sigmas->size(); ++k) (*log_sigmas)[k] = std::log((*sigmas)[k]);
}

// ---------------------------------------------------------------- Euler / Euler ancestral / Heun / LMS
// The sigma schedule of diffusers' EulerDiscreteScheduler (and HeunDiscreteScheduler): `steps` timesteps by the
// spacing, their sigmas interpolated from the training schedule (or Karras sigmas and the timesteps nearest them).
void euler_schedule(const SchedulerConfig& c, int steps, bool karras_sigmas, std::vector<double>* timesteps,
                    std::vector<double>* sigmas) {
  std::vector<float> full, log_sigmas;
  training_sigmas(c, &full, &log_sigmas);
  const std::string sp = spacing_of(c, "linspace");
  const int64_t N = c.num_train_timesteps;
  std::vector<double> ts;
  if (sp == "linspace") {
    for (int i = steps - 1; i >= 0; --i)
      ts.push_back(float(i == steps - 1 ? double(N - 1) : (steps == 1 ? 0.0 : double(N - 1) / (steps - 1) * i)));
  } else if (sp == "leading") {
    const int64_t r = N / steps;
    for (int i = steps - 1; i >= 0; --i) ts.push_back(float(double(int64_t(i) * r) + c.steps_offset));
  } else {
    for (double v : trailing_timesteps(N, steps)) ts.push_back(float(v));
  }
  std::vector<double> sig;
  for (double t : ts) sig.push_back(interp(t, full));
  if (karras_sigmas) {
    sig = karras(sig.back(), sig.front(), steps);
    ts.clear();
    for (double s : sig) ts.push_back(float(sigma_to_t(s, log_sigmas)));
  }
  for (double s : sig) sigmas->push_back(double(float(s)));
  *timesteps = ts;
}

// init_noise_sigma of the Euler-type schedulers: the largest sigma, or sqrt(it^2 + 1) with leading spacing.
double euler_init_sigma(const SchedulerConfig& c, const std::vector<double>& sigmas) {
  const std::string sp = spacing_of(c, "linspace");
  const double mx = *std::max_element(sigmas.begin(), sigmas.end());
  return (sp == "linspace" || sp == "trailing") ? mx : std::sqrt(mx * mx + 1);
}

// The k-diffusion parametrisation of Euler, Heun and LMS: a sample is x0 + sigma x noise, the UNet sees it divided by
// sqrt(sigma^2 + 1); sigmas_ holds each call's sigma and the final one.
class SigmaSampler : public Sampler {
 public:
  double init_noise_sigma() const override { return init_sigma_; }
  at::Tensor add_noise(const at::Tensor& x, const at::Tensor& noise, int i) const override {
    return x + noise * static_cast<float>(sigmas_.at(i));
  }
  at::Tensor scale_model_input(const at::Tensor& x, int i) const override {
    const double s = sigmas_.at(i);
    return x / std::sqrt(s * s + 1);
  }

 protected:
  explicit SigmaSampler(const SchedulerConfig& c) : c_(c) {}
  SchedulerConfig c_;
  double init_sigma_ = 1.0;
};

class EulerSampler : public SigmaSampler {
 public:
  EulerSampler(const SchedulerConfig& c, int steps, bool ancestral) : SigmaSampler(c), ancestral_(ancestral) {
    euler_schedule(c, steps, c.use_karras_sigmas && !ancestral, &timesteps_, &sigmas_);
    const double last = sigmas_.back();
    sigmas_.push_back(c.final_sigmas_type == "sigma_min" ? last : 0.0);
    init_sigma_ = euler_init_sigma(c, sigmas_);
  }
  SamplerKind kind() const override { return ancestral_ ? SamplerKind::EulerAncestral : SamplerKind::Euler; }
  at::Tensor step(const at::Tensor& e, int i, const at::Tensor& x, const StepNoise& noise) override {
    const double sigma = sigmas_.at(i), next = sigmas_.at(i + 1);
    at::Tensor x0 = predicted_x0_from_eps_sigma(c_, x, e, sigma);
    at::Tensor derivative = (x - x0) / sigma;
    if (!ancestral_) return x + derivative * (next - sigma);
    const double up = std::sqrt(next * next * (sigma * sigma - next * next) / (sigma * sigma));
    const double down = std::sqrt(next * next - up * up);
    at::Tensor prev = x + derivative * (down - sigma);
    DP_CHECK(static_cast<bool>(noise), "euler_a: a noise source is required");
    return prev + noise(i, x) * up;
  }

 private:
  bool ancestral_;
};

// Heun's method (HeunDiscreteScheduler): each step but the last is two UNet calls, an Euler step to the next sigma
// and a correction with the derivative there, averaged; the schedule's sigmas and timesteps are Euler's, each one after
// the first repeated (2 x steps - 1 calls), so call i's sigma and timestep are entry i.
class HeunSampler : public SigmaSampler {
 public:
  HeunSampler(const SchedulerConfig& c, int steps) : SigmaSampler(c) {
    std::vector<double> ts, sig;
    euler_schedule(c, steps, c.use_karras_sigmas, &ts, &sig);
    sig.push_back(0.0);
    sigmas_ = {sig.front()};
    timesteps_ = {ts.front()};
    for (size_t k = 1; k + 1 < sig.size(); ++k) sigmas_.insert(sigmas_.end(), {sig[k], sig[k]});
    sigmas_.push_back(0.0);
    for (size_t k = 1; k < ts.size(); ++k) timesteps_.insert(timesteps_.end(), {ts[k], ts[k]});
    init_sigma_ = euler_init_sigma(c, sigmas_);
  }
  SamplerKind kind() const override { return SamplerKind::Heun; }
  int order() const override { return 2; }
  at::Tensor step(const at::Tensor& e, int i, const at::Tensor& x, const StepNoise&) override {
    if (i % 2 == 0) {  // first order: Euler to the next sigma, remembered for the correction
      const double sigma = sigmas_.at(i), next = sigmas_.at(i + 1);
      derivative_ = (x - predicted_x0_from_eps_sigma(c_, x, e, sigma)) / sigma;
      dt_ = next - sigma;
      sample_ = x;
      return x + derivative_ * dt_;
    }
    DP_CHECK(sample_.defined(), "heun: call ", i, " corrects a step that did not run here");
    const double sigma_next = sigmas_.at(i);  // the sample's sigma after the first-order step
    const at::Tensor d = (x - predicted_x0_from_eps_sigma(c_, x, e, sigma_next)) / sigma_next;
    at::Tensor out = sample_ + (derivative_ + d) / 2 * dt_;
    sample_ = derivative_ = at::Tensor();
    return out;
  }

 private:
  double dt_ = 0;
  at::Tensor derivative_, sample_;
};

// DPM-Solver-2 (KDPM2DiscreteScheduler): each step but the last is a first-order step to the geometric mean of this
// sigma and the next (sigma_interpol), then a call there whose derivative carries the sample from this sigma to the
// next; the timesteps interleave the interpolated sigmas' timesteps (2 x steps - 1 calls). The UNet's input is scaled
// by the call's own sigma (sigma_interpol at the second calls). Interpolated sigmas in float32, as diffusers.
class Kdpm2Sampler : public SigmaSampler {
 public:
  Kdpm2Sampler(const SchedulerConfig& c, int steps) : SigmaSampler(c) {
    std::vector<double> ts, sig;
    euler_schedule(c, steps, c.use_karras_sigmas, &ts, &sig);
    if (c.use_karras_sigmas)
      for (double& t : ts) t = std::nearbyint(t);  // KDPM2 rounds its Karras timesteps
    sig.push_back(0.0);
    const size_t n = sig.size();  // steps + 1
    std::vector<double> si(n, 0.0);  // si[k]: exp of log s_k and log s_k-1 lerped halfway (torch's lerp; si[0] unused)
    for (size_t k = 1; k < n; ++k) {
      if (sig[k] == 0.0) continue;  // log 0: the lerp is -inf, its exp 0
      const float lk = std::log(static_cast<float>(sig[k])), lp = std::log(static_cast<float>(sig[k - 1]));
      si[k] = std::exp(lp - (lp - lk) * 0.5f);
    }
    std::vector<float> full, log_sigmas;
    training_sigmas(c, &full, &log_sigmas);
    sigmas_ = {sig[0]};
    interpol_ = {si[0]};
    for (size_t k = 1; k < n; ++k) {
      sigmas_.insert(sigmas_.end(), {sig[k], sig[k]});
      interpol_.insert(interpol_.end(), {si[k], si[k]});
    }
    sigmas_.push_back(sig.back());
    interpol_.push_back(si.back());
    timesteps_ = {ts[0]};
    for (size_t k = 1; k + 1 < n; ++k)
      timesteps_.insert(timesteps_.end(), {double(float(sigma_to_t(si[k], log_sigmas))), ts[k]});
    init_sigma_ = euler_init_sigma(c, sigmas_);
  }
  SamplerKind kind() const override { return SamplerKind::KDPM2; }
  int order() const override { return 2; }
  at::Tensor scale_model_input(const at::Tensor& x, int i) const override {
    const double s = i % 2 == 0 ? sigmas_.at(i) : interpol_.at(i);
    return x / std::sqrt(s * s + 1);
  }
  at::Tensor step(const at::Tensor& e, int i, const at::Tensor& x, const StepNoise&) override {
    if (i % 2 == 0) {  // first order: to the interpolated sigma, remembered for the second call
      const double sigma = sigmas_.at(i);
      const at::Tensor d = (x - predicted_x0_from_eps_sigma(c_, x, e, sigma)) / sigma;
      sample_ = x;
      return x + d * (interpol_.at(i + 1) - sigma);
    }
    DP_CHECK(sample_.defined(), "kdpm2: call ", i, " completes a step that did not run here");
    const double si = interpol_.at(i);
    const at::Tensor d = (x - predicted_x0_from_eps_sigma(c_, x, e, si)) / si;
    at::Tensor out = sample_ + d * (sigmas_.at(i) - sigmas_.at(i - 1));
    sample_ = at::Tensor();
    return out;
  }

 private:
  std::vector<double> interpol_;  // each call's interpolated sigma (interleaved as sigmas_)
  at::Tensor sample_;
};

// Linear multistep (LMSDiscreteScheduler, order 4): the next sample is this one plus the last derivatives weighted by
// the integrals over [sigma_i, sigma_i+1] of their Lagrange basis polynomials in sigma (diffusers integrates with
// scipy's quad; the integrands are polynomials of degree < 4, integrated exactly here by 3-point Gauss-Legendre).
// diffusers takes the order from the step index (min(i + 1, 4)) and pairs its coefficients with the derivatives it
// has: a run begun part-way (image-to-image) uses the leading coefficients of the higher order, as here.
class LmsSampler : public SigmaSampler {
 public:
  LmsSampler(const SchedulerConfig& c, int steps) : SigmaSampler(c) {
    euler_schedule(c, steps, c.use_karras_sigmas, &timesteps_, &sigmas_);
    sigmas_.push_back(0.0);
    init_sigma_ = euler_init_sigma(c, sigmas_);
  }
  SamplerKind kind() const override { return SamplerKind::LMS; }
  at::Tensor step(const at::Tensor& e, int i, const at::Tensor& x, const StepNoise&) override {
    const double sigma = sigmas_.at(i);
    derivatives_.push_back((x - predicted_x0_from_eps_sigma(c_, x, e, sigma)) / sigma);
    if (derivatives_.size() > 4) derivatives_.erase(derivatives_.begin());
    const int order = std::min(i + 1, 4);
    at::Tensor out = x;
    const int n = std::min<int>(order, static_cast<int>(derivatives_.size()));
    for (int k = 0; k < n; ++k) out = out + coefficient(order, i, k) * derivatives_[derivatives_.size() - 1 - k];
    return out;
  }

 private:
  // integral over [sigma_t, sigma_t+1] of prod_{j != k, j < order} (tau - sigma_{t-j}) / (sigma_{t-k} - sigma_{t-j})
  double coefficient(int order, int t, int k) const {
    auto basis = [&](double tau) {
      double prod = 1.0;
      for (int j = 0; j < order; ++j)
        if (j != k) prod *= (tau - sigmas_.at(t - j)) / (sigmas_.at(t - k) - sigmas_.at(t - j));
      return prod;
    };
    const double a = sigmas_.at(t), b = sigmas_.at(t + 1), mid = (a + b) / 2, half = (b - a) / 2;
    const double x = std::sqrt(0.6);  // Gauss-Legendre, 3 points: exact for degree <= 5
    return half * (5.0 / 9.0 * basis(mid - half * x) + 8.0 / 9.0 * basis(mid) + 5.0 / 9.0 * basis(mid + half * x));
  }
  std::vector<at::Tensor> derivatives_;
};

// ---------------------------------------------------------------- DPM-Solver++ (multistep, order <= 2)
// The schedule of diffusers' multistep solvers (DPMSolverMultistepScheduler, UniPCMultistepScheduler): `steps`
// integer timesteps (linspace and leading over steps + 1 points, the last dropped; or trailing), their sigmas (or
// Karras sigmas and the timesteps nearest them), then the final sigma: 0, or the schedule's smallest (sigma_min).
void multistep_schedule(const SchedulerConfig& c, int steps, bool karras_sigmas, std::vector<double>* timesteps,
                        std::vector<double>* sigmas) {
  std::vector<float> full, log_sigmas;
  training_sigmas(c, &full, &log_sigmas);
  const int64_t last = c.num_train_timesteps;  // lambda_min_clipped = -inf
  const std::string sp = spacing_of(c, "linspace");
  std::vector<int64_t> ts;
  if (sp == "linspace") {
    for (int i = steps; i >= 1; --i)  // linspace(0, last-1, steps+1).round()[::-1][:-1]
      ts.push_back(static_cast<int64_t>(std::nearbyint(double(last - 1) * i / steps)));
  } else if (sp == "leading") {
    const int64_t r = last / (steps + 1);
    for (int i = steps; i >= 1; --i) ts.push_back(int64_t(i) * r + c.steps_offset);
  } else {
    for (double v : trailing_timesteps(last, steps)) ts.push_back(static_cast<int64_t>(v));
  }
  std::vector<double> sig;
  if (karras_sigmas || c.use_karras_sigmas) {
    sig = karras(full.front(), full.back(), steps);
    ts.clear();
    for (double s : sig) ts.push_back(static_cast<int64_t>(std::nearbyint(sigma_to_t(s, log_sigmas))));
  } else {
    for (int64_t t : ts) sig.push_back(full.at(t));
  }
  for (double s : sig) sigmas->push_back(double(float(s)));
  // sigma_min: the first training timestep's sigma (diffusers' ((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5)
  sigmas->push_back(c.final_sigmas_type == "sigma_min" ? double(full.front()) : 0.0);
  for (auto t : ts) timesteps->push_back(double(t));
}

// DPM-Solver++ (DPMSolverMultistepScheduler, algorithm_type dpmsolver++), or with `sde` its stochastic form
// (sde-dpmsolver++: DPM++ 2M SDE): each step also adds sigma_t x sqrt(1 - e^-2h) of the request's noise. Orders 1 to 3
// (solver_order; warm-up and lower_order_final lower it at the ends, as diffusers).
class DPMSolverSampler : public Sampler {
 public:
  DPMSolverSampler(const SchedulerConfig& c, int steps, bool karras_sigmas, bool sde, SamplerKind kind)
      : c_(c), sde_(sde), kind_(kind) {
    multistep_schedule(c, steps, karras_sigmas, &timesteps_, &sigmas_);
    outputs_.resize(c.solver_order);
  }
  SamplerKind kind() const override { return kind_; }
  at::Tensor add_noise(const at::Tensor& x, const at::Tensor& noise, int i) const override {
    const float sigma = static_cast<float>(sigmas_.at(i)), a = 1.0f / std::sqrt(sigma * sigma + 1.0f);
    return a * x + (sigma * a) * noise;
  }
  at::Tensor step(const at::Tensor& e, int i, const at::Tensor& x, const StepNoise& noise) override {
    const int n = num_calls();
    const bool lower_final = i == n - 1 && (c_.euler_at_final || (c_.lower_order_final && n < 15) ||
                                            c_.final_sigmas_type == "zero");
    at::Tensor z;  // the SDE's noise, drawn at every step (diffusers draws before choosing the order)
    if (sde_) {
      DP_CHECK(noise, "DPM++ 2M SDE: step ", i, " needs noise");
      z = noise(i, x);
    }
    // convert_model_output (dpmsolver++): the data prediction x0
    const double sigma = sigmas_.at(i);
    double alpha_t, sigma_t;
    alpha_sigma(sigma, &alpha_t, &sigma_t);
    at::Tensor x0;
    if (c_.prediction_type == "epsilon") x0 = (x - sigma_t * e) / alpha_t;
    else if (c_.prediction_type == "v_prediction") x0 = alpha_t * x - sigma_t * e;
    else x0 = e;
    for (size_t k = 0; k + 1 < outputs_.size(); ++k) outputs_[k] = outputs_[k + 1];
    outputs_.back() = x0;
    const bool lower_second = i == n - 2 && c_.lower_order_final && n < 15;
    at::Tensor out;
    if (c_.solver_order >= 3 && lower_order_nums_ >= 2 && !lower_final && !lower_second) {
      out = third_order(i, x, z);
    } else if (c_.solver_order == 1 || lower_order_nums_ < 1 || lower_final) {
      double at_, st_, as_, ss_;
      alpha_sigma(sigmas_.at(i + 1), &at_, &st_);
      alpha_sigma(sigmas_.at(i), &as_, &ss_);
      const double h = (std::log(at_) - std::log(st_)) - (std::log(as_) - std::log(ss_));
      if (sde_)
        out = (st_ / ss_ * std::exp(-h)) * x + (at_ * (1.0 - std::exp(-2.0 * h))) * x0 +
              (st_ * std::sqrt(1.0 - std::exp(-2.0 * h))) * z;
      else
        out = (st_ / ss_) * x - (at_ * (std::exp(-h) - 1.0)) * x0;
    } else {
      double at_, st_, a0, s0, a1, s1;
      alpha_sigma(sigmas_.at(i + 1), &at_, &st_);
      alpha_sigma(sigmas_.at(i), &a0, &s0);
      alpha_sigma(sigmas_.at(i - 1), &a1, &s1);
      const double lt = std::log(at_) - std::log(st_), l0 = std::log(a0) - std::log(s0),
                   l1 = std::log(a1) - std::log(s1);
      const double h = lt - l0, h0 = l0 - l1, r0 = h0 / h;
      const at::Tensor& m0 = outputs_[outputs_.size() - 1];
      const at::Tensor& m1 = outputs_[outputs_.size() - 2];
      at::Tensor D1 = (1.0 / r0) * (m0 - m1);
      const bool heun = c_.solver_type == "heun";  // else midpoint (diffusers maps UniPC's bh1, bh2 and logrho to it)
      if (sde_) {
        const double e2 = 1.0 - std::exp(-2.0 * h);
        out = (st_ / s0 * std::exp(-h)) * x + (at_ * e2) * m0 +
              (heun ? at_ * (e2 / (-2.0 * h) + 1.0) : 0.5 * at_ * e2) * D1 + (st_ * std::sqrt(e2)) * z;
      } else if (!heun) {
        out = (st_ / s0) * x - (at_ * (std::exp(-h) - 1.0)) * m0 - 0.5 * (at_ * (std::exp(-h) - 1.0)) * D1;
      } else {
        out = (st_ / s0) * x - (at_ * (std::exp(-h) - 1.0)) * m0 + (at_ * ((std::exp(-h) - 1.0) / h + 1.0)) * D1;
      }
    }
    if (lower_order_nums_ < c_.solver_order) ++lower_order_nums_;
    return out;
  }

 private:
  static void alpha_sigma(double sigma, double* a, double* s) {
    *a = 1.0 / std::sqrt(sigma * sigma + 1);
    *s = sigma * *a;
  }
  // diffusers' multistep_dpm_solver_third_order_update (dpmsolver++ and sde-dpmsolver++)
  at::Tensor third_order(int i, const at::Tensor& x, const at::Tensor& z) const {
    double at_, st_, a0, s0, a1, s1, a2, s2;
    alpha_sigma(sigmas_.at(i + 1), &at_, &st_);
    alpha_sigma(sigmas_.at(i), &a0, &s0);
    alpha_sigma(sigmas_.at(i - 1), &a1, &s1);
    alpha_sigma(sigmas_.at(i - 2), &a2, &s2);
    const double lt = std::log(at_) - std::log(st_), l0 = std::log(a0) - std::log(s0),
                 l1 = std::log(a1) - std::log(s1), l2 = std::log(a2) - std::log(s2);
    const double h = lt - l0, h0 = l0 - l1, h1 = l1 - l2, r0 = h0 / h, r1 = h1 / h;
    const size_t n = outputs_.size();
    const at::Tensor &m0 = outputs_[n - 1], &m1 = outputs_[n - 2], &m2 = outputs_[n - 3];
    const at::Tensor D1_0 = (1.0 / r0) * (m0 - m1), D1_1 = (1.0 / r1) * (m1 - m2);
    const at::Tensor D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1), D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1);
    if (!sde_)
      return (st_ / s0) * x - (at_ * (std::exp(-h) - 1.0)) * m0 + (at_ * ((std::exp(-h) - 1.0) / h + 1.0)) * D1 -
             (at_ * ((std::exp(-h) - 1.0 + h) / (h * h) - 0.5)) * D2;
    const double e2 = 1.0 - std::exp(-2.0 * h);
    return (st_ / s0 * std::exp(-h)) * x + (at_ * e2) * m0 + (at_ * (e2 / (-2.0 * h) + 1.0)) * D1 +
           (at_ * ((e2 - 2.0 * h) / (4.0 * h * h) - 0.5)) * D2 + (st_ * std::sqrt(e2)) * z;
  }
  SchedulerConfig c_;
  bool sde_ = false;
  SamplerKind kind_;
  std::vector<at::Tensor> outputs_;
  int lower_order_nums_ = 0;
};

// ---------------------------------------------------------------- UniPC (UniPCMultistepScheduler, predict_x0)
// A multistep predictor (UniP) with a corrector (UniC) that refines each sample with the model output at it, on the
// data prediction x0, of order solver_order (warm-up: 1, 2, ...; lower_order_final: lower at the last steps). The
// schedule is the multistep solvers'. Scalars in double (diffusers: float32 tensors): within rounding of it.
class UniPCSampler : public Sampler {
 public:
  UniPCSampler(const SchedulerConfig& c, int steps, bool karras_sigmas) : c_(c) {
    multistep_schedule(c, steps, karras_sigmas, &timesteps_, &sigmas_);
    outputs_.resize(c.solver_order);
    bh1_ = c.solver_type == "bh1";  // midpoint, heun and logrho mean bh2 (diffusers)
  }
  SamplerKind kind() const override { return SamplerKind::UniPC; }
  at::Tensor add_noise(const at::Tensor& x, const at::Tensor& noise, int i) const override {
    const float sigma = static_cast<float>(sigmas_.at(i)), a = 1.0f / std::sqrt(sigma * sigma + 1.0f);
    return a * x + (sigma * a) * noise;
  }
  at::Tensor step(const at::Tensor& e, int i, const at::Tensor& x_in, const StepNoise&) override {
    const auto [alpha, sigma] = alpha_sigma(sigmas_.at(i));
    at::Tensor x0;  // convert_model_output
    if (c_.prediction_type == "epsilon") x0 = (x_in - sigma * e) / alpha;
    else if (c_.prediction_type == "v_prediction") x0 = alpha * x_in - sigma * e;
    else x0 = e;
    at::Tensor x = x_in;
    const bool disabled = std::find(c_.disable_corrector.begin(), c_.disable_corrector.end(), i - 1) !=
                          c_.disable_corrector.end();
    if (i > 0 && !disabled && last_sample_.defined()) x = update(i, i - 1, x0, last_sample_, this_order_);
    for (size_t k = 0; k + 1 < outputs_.size(); ++k) outputs_[k] = outputs_[k + 1];
    outputs_.back() = x0;
    const int n = num_calls();
    int order = c_.lower_order_final ? std::min<int>(static_cast<int>(c_.solver_order), n - i)
                                     : static_cast<int>(c_.solver_order);
    this_order_ = std::min(order, lower_order_nums_ + 1);
    last_sample_ = x;
    const at::Tensor out = update(i + 1, i, at::Tensor(), x, this_order_);
    if (lower_order_nums_ < c_.solver_order) ++lower_order_nums_;
    return out;
  }

 private:
  static std::pair<double, double> alpha_sigma(double sigma) {
    const double a = 1.0 / std::sqrt(sigma * sigma + 1);
    return {a, sigma * a};
  }
  double lambda(int k) const {
    const auto [a, s] = alpha_sigma(sigmas_.at(k));
    return std::log(a) - std::log(s);
  }
  // From the sample x at index s0 to index t, with the stored x0 outputs (the newest is m0). The predictor
  // (model_t undefined) extrapolates with the older outputs at s0 - 1, s0 - 2, ...; the corrector (model_t: the x0 at
  // t) also uses the difference model_t - m0, its older outputs one further back.
  at::Tensor update(int t, int s0, const at::Tensor& model_t, const at::Tensor& x, int order) const {
    const bool corrector = model_t.defined();
    const auto [alpha_t, sigma_t] = alpha_sigma(sigmas_.at(t));
    const auto [alpha_s0, sigma_s0] = alpha_sigma(sigmas_.at(s0));
    (void)alpha_s0;
    const double h = lambda(t) - lambda(s0);
    const at::Tensor& m0 = outputs_.back();
    std::vector<double> rks;
    std::vector<at::Tensor> D1s;
    for (int k = 1; k < order; ++k) {
      const int si = s0 - k;
      const at::Tensor& mk = outputs_.at(outputs_.size() - 1 - k);
      const double rk = (lambda(si) - lambda(s0)) / h;
      rks.push_back(rk);
      D1s.push_back((mk - m0) / rk);
    }
    rks.push_back(1.0);
    const double hh = -h, h_phi_1 = std::expm1(hh), B_h = bh1_ ? hh : std::expm1(hh);
    double h_phi_k = h_phi_1 / hh - 1, factorial = 1;
    std::vector<std::vector<double>> R;  // R[p][k] = rks[k]^p
    std::vector<double> b;
    for (int p = 1; p <= order; ++p) {
      std::vector<double> row;
      for (double r : rks) row.push_back(std::pow(r, p - 1));
      R.push_back(row);
      b.push_back(h_phi_k * factorial / B_h);
      factorial *= p + 1;
      h_phi_k = h_phi_k / hh - 1 / factorial;
    }
    at::Tensor x_t = (sigma_t / sigma_s0) * x - (alpha_t * h_phi_1) * m0;
    if (corrector) {
      const std::vector<double> rhos = order == 1 ? std::vector<double>{0.5} : solve(R, b, order);
      at::Tensor res = rhos.back() * (model_t - m0);
      for (size_t k = 0; k < D1s.size(); ++k) res = res + rhos[k] * D1s[k];
      return x_t - (alpha_t * B_h) * res;
    }
    if (D1s.empty()) return x_t;
    const std::vector<double> rhos = order == 2 ? std::vector<double>{0.5} : solve(R, b, order - 1);
    at::Tensor res = rhos[0] * D1s[0];
    for (size_t k = 1; k < D1s.size(); ++k) res = res + rhos[k] * D1s[k];
    return x_t - (alpha_t * B_h) * res;
  }
  // The leading n x n block of R x = b by Gaussian elimination with partial pivoting (n <= solver_order).
  static std::vector<double> solve(std::vector<std::vector<double>> R, std::vector<double> b, int n) {
    for (int c = 0; c < n; ++c) {
      int p = c;
      for (int r = c + 1; r < n; ++r)
        if (std::abs(R[r][c]) > std::abs(R[p][c])) p = r;
      std::swap(R[c], R[p]);
      std::swap(b[c], b[p]);
      for (int r = c + 1; r < n; ++r) {
        const double f = R[r][c] / R[c][c];
        for (int k = c; k < n; ++k) R[r][k] -= f * R[c][k];
        b[r] -= f * b[c];
      }
    }
    std::vector<double> out(n);
    for (int r = n - 1; r >= 0; --r) {
      double v = b[r];
      for (int k = r + 1; k < n; ++k) v -= R[r][k] * out[k];
      out[r] = v / R[r][r];
    }
    return out;
  }
  SchedulerConfig c_;
  bool bh1_ = false;
  std::vector<at::Tensor> outputs_;
  at::Tensor last_sample_;
  int lower_order_nums_ = 0, this_order_ = 1;
};

}  // namespace

namespace {
// LCMScheduler (diffusers): a consistency model's multistep sampling. The schedule takes `steps` evenly spaced
// entries (by index) of the distillation's original_inference_steps timesteps; each step maps the sample to the
// boundary-conditioned estimate c_skip x + c_out x0 and, except at the last step, noises it to the next timestep
// with fresh noise from the request's stream.
class LCMSampler : public Sampler {
 public:
  LCMSampler(const SchedulerConfig& c, int steps, double strength) : c_(c) {
    alphas_cumprod_ = to_vec(alphas_cumprod(c));
    const int64_t orig = c.original_inference_steps;
    DP_CHECK(steps <= orig, "steps: the LCM sampler runs at most original_inference_steps (", orig,
             ", the distillation's schedule) steps, got ", steps);
    // diffusers' LCMScheduler.set_timesteps(steps, strength=...): the first int(orig x strength) of the schedule
    const auto n = static_cast<int64_t>(static_cast<double>(orig) * strength);
    DP_CHECK(n >= steps, "strength: ", strength, " leaves int(", orig, " x ", strength, ") = ", n, " of the LCM ",
             "schedule's timesteps (original_inference_steps ", orig, "), fewer than the ", steps,
             " steps; raise strength or lower steps");
    const int64_t k = c.num_train_timesteps / orig;
    const double stride = static_cast<double>(n) / steps;  // numpy's linspace(0, n, steps, endpoint=False)
    for (int i = 0; i < steps; ++i) {
      const auto idx = static_cast<int64_t>(std::floor(i * stride));
      timesteps_.push_back(static_cast<double>((n - idx) * k - 1));
    }
  }
  SamplerKind kind() const override { return SamplerKind::LCM; }
  at::Tensor step(const at::Tensor& e, int i, const at::Tensor& x, const StepNoise& noise) override {
    const auto t = static_cast<int64_t>(timesteps_.at(i));
    const bool last = i + 1 == num_calls();
    const auto prev = last ? t : static_cast<int64_t>(timesteps_.at(i + 1));
    // float32 scalars, as diffusers computes them from its float32 alphas_cumprod and the 0-d timestep tensor
    const float a = alphas_cumprod_.at(t), a_prev = alphas_cumprod_.at(prev), b = 1.0f - a, b_prev = 1.0f - a_prev;
    const float scaled = static_cast<float>(t) * static_cast<float>(c_.timestep_scaling), sd2 = 0.25f;  // sigma_data^2
    const float c_skip = sd2 / (scaled * scaled + sd2), c_out = scaled / std::sqrt(scaled * scaled + sd2);
    at::Tensor x0;
    if (c_.prediction_type == "epsilon") x0 = (x - std::sqrt(b) * e) / std::sqrt(a);
    else if (c_.prediction_type == "sample") x0 = e;
    else x0 = std::sqrt(a) * x - std::sqrt(b) * e;
    if (c_.clip_sample.value_or(false)) x0 = x0.clamp(-c_.clip_sample_range, c_.clip_sample_range);
    const at::Tensor denoised = c_out * x0 + c_skip * x;
    if (last) return denoised;
    return std::sqrt(a_prev) * denoised + std::sqrt(b_prev) * noise(i, x).to(x.device(), x.scalar_type());
  }

 private:
  SchedulerConfig c_;
};

// DDPMScheduler as a per-request Sampler (DeepFloyd IF's): every call but the last adds noise from the request's
// stream; a learned variance arrives as the model output's second half.
class DdpmStepSampler : public Sampler {
 public:
  DdpmStepSampler(const SchedulerConfig& cfg, int steps) : ddpm_(cfg, steps) {
    alphas_cumprod_ = to_vec(alphas_cumprod(cfg));  // for add_noise
    for (int i = 0; i < ddpm_.num_steps(); ++i) timesteps_.push_back(static_cast<double>(ddpm_.timestep(i)));
  }
  at::Tensor step(const at::Tensor& model_output, int i, const at::Tensor& sample, const StepNoise& noise) override {
    const at::Tensor z = ddpm_.adds_noise(i) ? noise(i, sample) : at::Tensor();
    return ddpm_.step(model_output, i, sample, z);
  }
  SamplerKind kind() const override { return SamplerKind::DDPM; }
  bool learned_variance() const override { return ddpm_.learned_variance(); }

 private:
  DdpmSampler ddpm_;
};
// FlowMatchEulerDiscreteScheduler (Stable Diffusion 3): a sample at sigma is (1 - sigma) x0 + sigma noise and the
// model predicts the velocity; a step moves the sample by (sigma_next - sigma) x velocity. Sigmas run evenly from 1
// to the training schedule's smallest (its shifted 1 / num_train_timesteps), then are shifted: by `shift`, or by
// exp(mu) / (exp(mu) + 1 / s - 1) with use_dynamic_shifting, mu interpolated from the image's token count (the SD3
// pipelines' calculate_shift). Arithmetic in diffusers' precisions: the schedule in float64, stored in float32.
class FlowMatchEulerSampler : public Sampler {
 public:
  FlowMatchEulerSampler(const SchedulerConfig& c, int steps, int64_t image_seq_len) {
    const int64_t N = c.num_train_timesteps;
    float smallest = 1.0f / static_cast<float>(N);  // the training schedule's last sigma (float32, as diffusers)
    if (!c.use_dynamic_shifting) {
      const float sh = static_cast<float>(c.shift);
      smallest = sh * smallest / (1.0f + (sh - 1.0f) * smallest);
    }
    const double t_max = 1.0 * static_cast<double>(N), t_min = static_cast<double>(smallest) * static_cast<double>(N);
    double mu = 0;
    if (c.use_dynamic_shifting) {
      DP_CHECK(image_seq_len > 0, "sampler: use_dynamic_shifting needs the image's token count");
      const double m = (c.max_shift - c.base_shift) / static_cast<double>(c.max_image_seq_len - c.base_image_seq_len);
      mu = static_cast<double>(image_seq_len) * m + (c.base_shift - m * static_cast<double>(c.base_image_seq_len));
    }
    if (c.linspace_sigmas) {  // the Flux pipelines' sigmas, shifted in float32 (numpy's float32 arithmetic)
      const float em = static_cast<float>(std::exp(mu)), sh = static_cast<float>(c.shift);
      for (int i = 0; i < steps; ++i) {
        const double step = (1.0 / steps - 1.0) / (steps - 1 > 0 ? steps - 1 : 1);
        float s = static_cast<float>(steps == 1 ? 1.0 : (i == steps - 1 ? 1.0 / steps : 1.0 + i * step));
        s = c.use_dynamic_shifting ? em / (em + (1.0f / s - 1.0f)) : sh * s / (1.0f + (sh - 1.0f) * s);
        sigmas_.push_back(s);
        timesteps_.push_back(s * static_cast<float>(N));
      }
      sigmas_.push_back(0.0);
      return;
    }
    for (int i = 0; i < steps; ++i) {
      // np.linspace(t_max, t_min, steps)
      const double t = steps == 1 ? t_max : (i == steps - 1 ? t_min : t_max + i * ((t_min - t_max) / (steps - 1)));
      double sigma = t / static_cast<double>(N);
      sigma = c.use_dynamic_shifting ? std::exp(mu) / (std::exp(mu) + (1.0 / sigma - 1.0))
                                     : c.shift * sigma / (1.0 + (c.shift - 1.0) * sigma);
      const float s32 = static_cast<float>(sigma);
      sigmas_.push_back(s32);
      timesteps_.push_back(s32 * static_cast<float>(N));
    }
    sigmas_.push_back(0.0);
  }
  // diffusers' scale_noise: sigma x noise + (1 - sigma) x sample
  at::Tensor add_noise(const at::Tensor& x, const at::Tensor& noise, int i) const override {
    const float s = static_cast<float>(sigmas_.at(i));
    return s * noise + (1.0f - s) * x;
  }
  at::Tensor step(const at::Tensor& v, int i, const at::Tensor& x, const StepNoise&) override {
    const float dt = static_cast<float>(sigmas_.at(i + 1)) - static_cast<float>(sigmas_.at(i));
    return x.to(at::kFloat) + v * dt;
  }
  SamplerKind kind() const override { return SamplerKind::FlowMatchEuler; }
};
}  // namespace

std::unique_ptr<Sampler> Sampler::create(SamplerKind kind, const SchedulerConfig& cfg, int steps, bool karras_sigmas,
                                         double strength, int64_t image_seq_len) {
  DP_CHECK(steps >= 1 && steps <= cfg.num_train_timesteps, "sampler: steps must be in [1, ", cfg.num_train_timesteps,
           "], got ", steps);
  DP_CHECK(strength == 1.0 || kind == SamplerKind::LCM, "sampler: only LCM takes a strength");
  std::unique_ptr<Sampler> s;
  switch (kind) {
    case SamplerKind::DDIM: s = std::make_unique<DDIMSampler>(cfg, steps); break;
    case SamplerKind::PNDM: s = std::make_unique<PNDMSampler>(cfg, steps); break;
    case SamplerKind::DDPM: s = std::make_unique<DdpmStepSampler>(cfg, steps); break;
    case SamplerKind::Euler: {
      SchedulerConfig c = cfg;
      c.use_karras_sigmas = cfg.use_karras_sigmas || karras_sigmas;
      s = std::make_unique<EulerSampler>(c, steps, false);
      break;
    }
    case SamplerKind::EulerAncestral: s = std::make_unique<EulerSampler>(cfg, steps, true); break;
    case SamplerKind::Heun:
    case SamplerKind::KDPM2:
    case SamplerKind::LMS: {
      SchedulerConfig c = cfg;
      c.use_karras_sigmas = cfg.use_karras_sigmas || karras_sigmas;
      if (kind == SamplerKind::Heun) s = std::make_unique<HeunSampler>(c, steps);
      else if (kind == SamplerKind::KDPM2) s = std::make_unique<Kdpm2Sampler>(c, steps);
      else s = std::make_unique<LmsSampler>(c, steps);
      break;
    }
    case SamplerKind::DPMSolverMultistep:  // the folder's solver_order (1 to 3)
    case SamplerKind::DPMSolverSDE:
      s = std::make_unique<DPMSolverSampler>(cfg, steps, karras_sigmas, kind == SamplerKind::DPMSolverSDE, kind);
      break;
    case SamplerKind::DPMSolver3MSDE: {
      SchedulerConfig c = cfg;  // DPM++ 3M SDE: third order, stochastic
      c.solver_order = 3;
      s = std::make_unique<DPMSolverSampler>(c, steps, karras_sigmas, true, kind);
      break;
    }
    case SamplerKind::LCM: s = std::make_unique<LCMSampler>(cfg, steps, strength); break;
    case SamplerKind::UniPC: s = std::make_unique<UniPCSampler>(cfg, steps, karras_sigmas); break;
    case SamplerKind::FlowMatchEuler:
      DP_CHECK(!karras_sigmas, "sampler: flow_euler has no Karras sigmas");
      s = std::make_unique<FlowMatchEulerSampler>(cfg, steps, image_seq_len);
      break;
  }
  DP_CHECK(s, "sampler: unknown kind");
  // with steps_offset, as many steps as training timesteps run past the last one
  const double top = kind == SamplerKind::FlowMatchEuler ? cfg.num_train_timesteps + 0.5 : cfg.num_train_timesteps;
  for (double t : s->timesteps())  // (flow matching starts at sigma 1: timestep num_train_timesteps)
    DP_CHECK(t >= 0 && t < top, "steps: ", steps, " steps give timestep ", t,
             ", beyond the scheduler's ", cfg.num_train_timesteps, " training timesteps (steps_offset ",
             cfg.steps_offset, "); use fewer steps");
  return s;
}

at::Tensor Sampler::add_noise(const at::Tensor& x, const at::Tensor& noise, int i) const {
  const float a = alphas_cumprod_.at(static_cast<size_t>(timestep(i)));
  return std::sqrt(a) * x + std::sqrt(1.0f - a) * noise;
}

DdpmSampler::DdpmSampler(const SchedulerConfig& cfg, int steps) : cfg_(cfg) {
  DP_CHECK(steps >= 1 && steps <= cfg.num_train_timesteps, "prior_steps: must be in [1, ", cfg.num_train_timesteps,
           "], got ", steps);
  if (unclip()) {  // UnCLIPScheduler (Karlo's): round(i x (T - 1) / (n - 1)) for i = n - 1 .. 0, ending at 0
    DP_CHECK(steps >= 2, "prior_steps: must be at least 2 with UnCLIPScheduler (its step ratio divides by steps - 1)");
    const double ratio = double(cfg.num_train_timesteps - 1) / (steps - 1);
    for (int i = steps - 1; i >= 0; --i) timesteps_.push_back(static_cast<int64_t>(std::nearbyint(i * ratio)));
    const at::Tensor b = train_betas(cfg).contiguous();
    betas_.assign(b.data_ptr<float>(), b.data_ptr<float>() + b.numel());
  } else {
    timesteps_ = int_timesteps(cfg, steps, spacing_of(cfg, "leading"));
  }
  for (int64_t t : timesteps_)
    DP_CHECK(t >= 0 && t < cfg.num_train_timesteps, "DDPM schedule: timestep ", t, " outside [0, ",
             cfg.num_train_timesteps, ") for ", steps, " steps");
  alphas_cumprod_ = to_vec(alphas_cumprod(cfg));
}

at::Tensor DdpmSampler::step(const at::Tensor& model_output_in, int i, const at::Tensor& sample,
                             const at::Tensor& noise, at::Tensor* x0_out) const {
  const int64_t t = timestep(i);
  at::Tensor model_output = model_output_in, predicted_variance;
  if (learned_variance()) {
    DP_CHECK(model_output.dim() >= 2 && model_output.size(1) == 2 * sample.size(1), "DDPM step ", i, ": variance type ",
             cfg_.variance_type, " needs a model output of twice the sample's ", sample.size(1), " channels, got ",
             model_output.sizes());
    auto parts = model_output.split(sample.size(1), 1);
    model_output = parts[0];
    predicted_variance = parts[1];
  }
  const int64_t prev = i + 1 < num_steps() ? timestep(i + 1) : -1;
  // float32 scalars, as diffusers computes them from its float32 alphas_cumprod
  const float a = alphas_cumprod_[t], a_prev = prev >= 0 ? alphas_cumprod_[prev] : 1.0f;
  const float beta = 1.0f - a, beta_prev = 1.0f - a_prev;
  // DDPMScheduler: alpha_t = a / a_prev, beta_t = 1 - alpha_t; UnCLIPScheduler: beta_t = 1 - a / a_prev (the
  // schedule's own beta for a step to the adjacent timestep), alpha_t = 1 - beta_t (float32, each as diffusers)
  float alpha_t = a / a_prev, beta_t = 1.0f - alpha_t;
  if (unclip()) {
    beta_t = prev == t - 1 ? betas_[t] : 1.0f - a / a_prev;
    alpha_t = 1.0f - beta_t;
  }
  at::Tensor x0;
  if (cfg_.prediction_type == "sample") x0 = model_output;
  else if (cfg_.prediction_type == "v_prediction") x0 = std::sqrt(a) * sample - std::sqrt(beta) * model_output;
  else x0 = (sample - std::sqrt(beta) * model_output) / std::sqrt(a);
  if (cfg_.thresholding) {  // Imagen: per sample, clamp to the ratio-quantile of |x0| (in [1, max]) and rescale
    const auto dt = x0.scalar_type();
    const int64_t B = x0.size(0);
    at::Tensor flat = x0.to(at::kFloat).reshape({B, -1});
    at::Tensor s = at::quantile(flat.abs(), cfg_.dynamic_thresholding_ratio, 1)
                       .clamp(1.0, cfg_.sample_max_value)
                       .unsqueeze(1);
    x0 = (at::clamp(flat, -s, s) / s).reshape(x0.sizes()).to(dt);
  } else if (cfg_.clip_sample.value_or(true)) {
    x0 = x0.clamp(-cfg_.clip_sample_range, cfg_.clip_sample_range);
  }
  if (x0_out) *x0_out = x0;
  const float c_x0 = std::sqrt(a_prev) * beta_t / beta, c_x = std::sqrt(alpha_t) * beta_prev / beta;
  at::Tensor prev_sample = c_x0 * x0 + c_x * sample;
  if (t > 0) {
    DP_CHECK(noise.defined() && noise.sizes() == sample.sizes(), "DDPM step ", i, ": variance noise shaped like the sample needed");
    const float var = std::max(beta_prev / beta * beta_t, 1e-20f);
    const at::Tensor z = noise.to(sample.device(), sample.scalar_type());
    const std::string& vt = cfg_.variance_type;
    if (vt == "learned_range") {  // interpolate log variances between the posterior's and beta_t by the prediction
      const float min_log = std::log(var), max_log = std::log(beta_t);
      const at::Tensor frac = (predicted_variance + 1) / 2;
      prev_sample = prev_sample + at::exp(0.5 * (frac * max_log + (1 - frac) * min_log)) * z;
    } else if (vt == "learned") {
      prev_sample = prev_sample + predicted_variance.pow(0.5) * z;
    } else {
      // the standard deviation: fixed_small var ** 0.5, fixed_small_log exp(0.5 * log(var)), fixed_large beta_t ** 0.5
      const float sd = vt == "fixed_small_log" ? std::exp(0.5f * std::log(var))
                       : vt == "fixed_large"   ? std::sqrt(beta_t)
                                               : std::sqrt(var);
      prev_sample = prev_sample + sd * z;
    }
  }
  return prev_sample;
}

}  // namespace diffpipe
