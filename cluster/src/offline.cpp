#include "diffpipe/cluster/offline.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"

namespace diffpipe::offline {
namespace {

using json = nlohmann::json;

std::string join_path(const std::string& a, const std::string& b) { return path_join(a, b); }

// Writes all of `s` or throws naming the file (a short write is a full disk, never a silently cut record).
void write_all(int fd, const std::string& s, const std::string& what) {
  size_t off = 0;
  while (off < s.size()) {
    const ssize_t n = ::write(fd, s.data() + off, s.size() - off);
    if (n < 0 && errno == EINTR) continue;
    DP_CHECK(n > 0, what, ": write failed: ", std::strerror(errno), " (disk full?); the run stops here and a rerun "
             "of the same command continues from the last complete line");
    off += static_cast<size_t>(n);
  }
}

// One ustar header block for a regular file.
std::string tar_header(const std::string& name, size_t size) {
  std::string h(512, '\0');
  DP_CHECK(name.size() < 100, "webdataset: member name too long: ", name);
  std::memcpy(&h[0], name.data(), name.size());
  std::snprintf(&h[100], 8, "%07o", 0644);
  std::snprintf(&h[108], 8, "%07o", 0);
  std::snprintf(&h[116], 8, "%07o", 0);
  std::snprintf(&h[124], 12, "%011llo", static_cast<unsigned long long>(size));
  std::snprintf(&h[136], 12, "%011llo", static_cast<unsigned long long>(0));
  h[156] = '0';
  std::memcpy(&h[257], "ustar", 6);
  std::memcpy(&h[263], "00", 2);
  std::memset(&h[148], ' ', 8);
  unsigned sum = 0;
  for (unsigned char c : h) sum += c;
  std::snprintf(&h[148], 8, "%06o", sum);
  h[155] = ' ';
  return h;
}

template <typename T>
T get_field(const json& j, const char* key, const std::string& where, T def) {
  if (!j.contains(key)) return def;
  try {
    return j.at(key).get<T>();
  } catch (const std::exception&) {
    DP_FAIL(where, ": key '", key, "' has the wrong type (", j.at(key).dump(), ")");
  }
}

}  // namespace

std::vector<ControlInput> control_fields(std::vector<ControlInput> controls, const ControlFieldValues& v,
                                         const ControlFieldNames& names, const std::string& where) {
  // the entries: the images' (or the defaults'); without images, what the settings name (refused later: a scale
  // without an image)
  size_t n = controls.size();
  if (v.image) n = std::max<size_t>(n, v.image->is_array() ? v.image->size() : 1);
  if (n == 0)
    for (const json* x : {v.scale, v.start, v.end})
      if (x) n = std::max<size_t>(n, x->is_array() ? x->size() : 1);
  controls.resize(n);
  if (v.image) {
    const std::string& k = names.image;
    if (v.image->is_string()) {
      controls[0].image = v.image->get<std::string>();
    } else {
      DP_CHECK(v.image->is_array(), where, ": key '", k, "' must be an image or a list of them (one per ControlNet)");
      for (size_t i = 0; i < v.image->size(); ++i) {
        const json& e = (*v.image)[i];
        DP_CHECK(e.is_string() || e.is_null(), where, ": key '", k, "' entry ", i + 1, " must be an image or null");
        controls[i].image = e.is_null() ? std::string() : e.get<std::string>();
      }
    }
  }
  // a number applies to every ControlNet given an image; a list gives one each
  auto numbers = [&](const json* x, const std::string& k, double ControlInput::*field) {
    if (!x) return;
    auto num = [&](const json& e, size_t i) {
      DP_CHECK(e.is_number() && std::isfinite(e.get<double>()), where, ": key '", k, "'",
               x->is_array() ? detail::cat(" entry ", i + 1) : std::string(), " must be a finite number");
      return e.get<double>();
    };
    if (x->is_array()) {
      DP_CHECK(x->size() == n, where, ": key '", k, "' has ", x->size(), " entries for ", n, " ControlNet inputs");
      for (size_t i = 0; i < n; ++i) controls[i].*field = num((*x)[i], i);
    } else {  // every entry with an image (all of them when none has one)
      const double d = num(*x, 0);
      const bool any = std::any_of(controls.begin(), controls.end(), [](const ControlInput& c) { return !c.image.empty(); });
      for (auto& c : controls)
        if (!any || !c.image.empty()) c.*field = d;
    }
  };
  numbers(v.scale, names.scale, &ControlInput::scale);
  numbers(v.start, names.start, &ControlInput::start);
  numbers(v.end, names.end, &ControlInput::end);
  return controls;
}

std::string lora_field(const json& v, const std::string& where) {
  if (v.is_string()) return v.get<std::string>();
  DP_CHECK(v.is_object(), where, " must be \"NAME[:SCALE],...\" or an object like {\"NAME\": SCALE}");
  std::string out;
  for (const auto& [name, scale] : v.items()) {
    DP_CHECK(scale.is_number() && std::isfinite(scale.get<double>()), where, ": the scale of '", name,
             "' must be a finite number");
    DP_CHECK(!name.empty() && name.find_first_of(":,") == std::string::npos, where, ": '", name,
             "' is not an adapter name");
    std::ostringstream os;  // 0.7, 1, 1.25
    os << (out.empty() ? "" : ",") << name << ":" << scale.get<double>();
    out += os.str();
  }
  return out;
}

std::vector<JobLine> parse_job_lines(const std::vector<PromptLine>& lines, bool jsonl, const GenerationParams& base,
                                     int images) {
  std::vector<JobLine> out;
  static const std::set<std::string> keys{"prompt", "negative_prompt", "seed", "steps", "guidance", "sampler",
                                          "width", "height", "clip_skip", "images", "prior_steps",
                                          "prior_guidance", "noise_level", "image_prompt", "original_width",
                                          "original_height", "crop_top", "crop_left", "sr_steps", "sr_guidance",
                                          "sr_noise_level", "x4_steps", "x4_guidance", "x4_noise_level", "strength", "mask", "control_image",
                                          "control_scale", "control_start", "control_end", "lora",
                                          "guess_mode", "aesthetic_score", "negative_aesthetic_score",
                                          "ip_adapter_image", "ip_adapter_scale", "denoising_end", "refiner_steps",
                                          "refiner_strength", "guidance_rescale", "refiner", "true_cfg_scale",
                                          "skip_guidance_layers", "skip_layer_guidance_scale",
                                          "skip_layer_guidance_start", "skip_layer_guidance_stop"};
  for (const auto& l : lines) {
    JobLine j;
    j.params = base;
    j.images = images;
    j.origin = l.origin;
    const bool from_file = l.origin.rfind("--", 0) != 0;
    if (!jsonl || !from_file) {
      j.params.prompt = l.text;
      out.push_back(std::move(j));
      continue;
    }
    json o;
    try {
      o = json::parse(l.text);
    } catch (const std::exception& e) {
      DP_FAIL(l.origin, ": not a JSON object: ", e.what());
    }
    DP_CHECK(o.is_object(), l.origin, ": each line must be a JSON object like {\"prompt\": \"...\"}");
    for (auto& [k, v] : o.items())
      DP_CHECK(keys.count(k), l.origin, ": unknown key '", k, "' (prompt, negative_prompt, seed, steps, guidance, "
               "sampler, width, height, clip_skip, images, prior_steps, prior_guidance, noise_level, image_prompt, "
               "original_width, original_height, crop_top, crop_left, sr_steps, sr_guidance, sr_noise_level, x4_steps, "
               "x4_guidance, x4_noise_level, strength, mask, control_image, control_scale, control_start, control_end, lora, "
               "guess_mode, aesthetic_score, negative_aesthetic_score, ip_adapter_image, ip_adapter_scale, "
               "denoising_end, refiner_steps, refiner_strength, guidance_rescale, refiner, true_cfg_scale, "
               "skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start, skip_layer_guidance_stop)");
    DP_CHECK(o.contains("prompt") && o["prompt"].is_string(), l.origin, ": key 'prompt' (a string) is required");
    auto& p = j.params;
    p.prompt = o["prompt"].get<std::string>();
    p.negative_prompt = get_field<std::string>(o, "negative_prompt", l.origin, p.negative_prompt);
    p.steps = get_field<int>(o, "steps", l.origin, p.steps);
    p.guidance = get_field<double>(o, "guidance", l.origin, p.guidance);
    p.sampler = get_field<std::string>(o, "sampler", l.origin, p.sampler);
    p.width = get_field<int>(o, "width", l.origin, p.width);
    p.height = get_field<int>(o, "height", l.origin, p.height);
    p.clip_skip = get_field<int>(o, "clip_skip", l.origin, p.clip_skip);
    p.prior_steps = get_field<int>(o, "prior_steps", l.origin, p.prior_steps);
    p.prior_guidance = get_field<double>(o, "prior_guidance", l.origin, p.prior_guidance);
    p.noise_level = get_field<int>(o, "noise_level", l.origin, p.noise_level);
    p.image_prompt = get_field<std::string>(o, "image_prompt", l.origin, p.image_prompt);
    p.original_width = get_field<int>(o, "original_width", l.origin, p.original_width);
    p.original_height = get_field<int>(o, "original_height", l.origin, p.original_height);
    p.crop_top = get_field<int>(o, "crop_top", l.origin, p.crop_top);
    p.crop_left = get_field<int>(o, "crop_left", l.origin, p.crop_left);
    p.sr_steps = get_field<int>(o, "sr_steps", l.origin, p.sr_steps);
    p.sr_guidance = get_field<double>(o, "sr_guidance", l.origin, p.sr_guidance);
    p.sr_noise_level = get_field<int>(o, "sr_noise_level", l.origin, p.sr_noise_level);
    DP_CHECK(p.sr_steps >= 1, l.origin, ": key 'sr_steps' must be at least 1");
    DP_CHECK(std::isfinite(p.sr_guidance) && p.sr_guidance >= 0, l.origin, ": key 'sr_guidance' must be a number >= 0");
    DP_CHECK(p.sr_noise_level >= 0, l.origin, ": key 'sr_noise_level' must be at least 0");
    p.x4_steps = get_field<int>(o, "x4_steps", l.origin, p.x4_steps);
    p.x4_guidance = get_field<double>(o, "x4_guidance", l.origin, p.x4_guidance);
    p.x4_noise_level = get_field<int>(o, "x4_noise_level", l.origin, p.x4_noise_level);
    DP_CHECK(p.x4_steps >= 1, l.origin, ": key 'x4_steps' must be at least 1");
    DP_CHECK(std::isfinite(p.x4_guidance) && p.x4_guidance >= 0, l.origin, ": key 'x4_guidance' must be a number >= 0");
    DP_CHECK(p.x4_noise_level >= 0, l.origin, ": key 'x4_noise_level' must be at least 0");
    if (o.contains("strength")) {
      p.strength = get_field<double>(o, "strength", l.origin, p.strength);
      DP_CHECK(std::isfinite(p.strength) && p.strength >= 0 && p.strength <= 1, l.origin,
               ": key 'strength' must be a number in [0, 1]");
    }
    for (const auto& [key, v] : {std::pair<const char*, double*>{"aesthetic_score", &p.aesthetic_score},
                                 {"negative_aesthetic_score", &p.negative_aesthetic_score}})
      if (o.contains(key)) {  // the SDXL refiner's
        *v = get_field<double>(o, key, l.origin, *v);
        DP_CHECK(std::isfinite(*v) && *v >= 0, l.origin, ": key '", key, "' must be a number >= 0");
      }
    p.ip_adapter_image = get_field<std::string>(o, "ip_adapter_image", l.origin, p.ip_adapter_image);
    p.ip_adapter_scale = get_field<double>(o, "ip_adapter_scale", l.origin, p.ip_adapter_scale);
    DP_CHECK(std::isfinite(p.ip_adapter_scale), l.origin, ": key 'ip_adapter_scale' must be a finite number");
    for (const auto& [key, v] : {std::pair<const char*, double*>{"denoising_end", &p.denoising_end},
                                 {"refiner_strength", &p.refiner_strength}})
      if (o.contains(key)) {  // the SDXL refiner's (checked against the run later)
        *v = get_field<double>(o, key, l.origin, *v);
        DP_CHECK(std::isfinite(*v) && *v > 0 && *v <= 1, l.origin, ": key '", key, "' must be a number in (0, 1]");
      }
    p.refiner_steps = get_field<int>(o, "refiner_steps", l.origin, p.refiner_steps);
    p.guidance_rescale = get_field<double>(o, "guidance_rescale", l.origin, p.guidance_rescale);
    p.true_cfg_scale = get_field<double>(o, "true_cfg_scale", l.origin, p.true_cfg_scale);  // checked by the model
    // SD3's skip-layer guidance (checked by the model)
    p.skip_guidance_layers = get_field<std::vector<int>>(o, "skip_guidance_layers", l.origin, p.skip_guidance_layers);
    p.skip_layer_guidance_scale = get_field<double>(o, "skip_layer_guidance_scale", l.origin, p.skip_layer_guidance_scale);
    p.skip_layer_guidance_start = get_field<double>(o, "skip_layer_guidance_start", l.origin, p.skip_layer_guidance_start);
    p.skip_layer_guidance_stop = get_field<double>(o, "skip_layer_guidance_stop", l.origin, p.skip_layer_guidance_stop);
    p.skip_refiner = !get_field<bool>(o, "refiner", l.origin, !p.skip_refiner);
    DP_CHECK(std::isfinite(p.guidance_rescale) && p.guidance_rescale >= 0 && p.guidance_rescale <= 1, l.origin,
             ": key 'guidance_rescale' must be a number in [0, 1]");
    DP_CHECK(p.refiner_steps >= 0, l.origin, ": key 'refiner_steps' must be at least 0 (0: steps)");
    p.mask = get_field<std::string>(o, "mask", l.origin, p.mask);
    if (o.contains("lora")) p.lora = lora_field(o["lora"], l.origin + ": key 'lora'");
    p.guess_mode = get_field<bool>(o, "guess_mode", l.origin, p.guess_mode);
    auto field = [&](const char* k) { return o.contains(k) ? &o[k] : nullptr; };
    p.controls = control_fields(p.controls, {field("control_image"), field("control_scale"), field("control_start"),
                                             field("control_end")},
                                {"control_image", "control_scale", "control_start", "control_end"}, l.origin);
    j.images = get_field<int>(o, "images", l.origin, images);
    DP_CHECK(j.images >= 1 && j.images <= 100000, l.origin, ": key 'images' must be in [1, 100000]");
    DP_CHECK(p.steps >= 1, l.origin, ": key 'steps' must be at least 1");
    DP_CHECK(p.width >= 0 && p.height >= 0, l.origin, ": keys 'width'/'height' must be positive");
    DP_CHECK(std::isfinite(p.guidance) && p.guidance >= 0, l.origin, ": key 'guidance' must be a number >= 0");
    DP_CHECK(p.prior_steps >= 1, l.origin, ": key 'prior_steps' must be at least 1");
    DP_CHECK(std::isfinite(p.prior_guidance) && p.prior_guidance >= 0, l.origin,
             ": key 'prior_guidance' must be a number >= 0");
    DP_CHECK(p.noise_level >= 0, l.origin, ": key 'noise_level' must be at least 0");
    DP_CHECK(p.original_width >= 0 && p.original_height >= 0 && p.crop_top >= 0 && p.crop_left >= 0, l.origin,
             ": keys 'original_width'/'original_height'/'crop_top'/'crop_left' must be at least 0");
    if (o.contains("seed")) {
      DP_CHECK(o["seed"].is_number_unsigned() || (o["seed"].is_number_integer() && o["seed"].get<int64_t>() >= 0),
               l.origin, ": key 'seed' must be a non-negative integer");
      p.seed = o["seed"].get<uint64_t>();
      j.seed_set = true;
    }
    check_utf8(p.prompt, l.origin + " (prompt)");
    check_utf8(p.negative_prompt, l.origin + " (negative_prompt)");
    out.push_back(std::move(j));
  }
  return out;
}

std::vector<GenerationParams> expand_job(const std::vector<JobLine>& lines, uint64_t base_seed) {
  std::vector<GenerationParams> out;
  for (const auto& l : lines)
    for (int k = 0; k < l.images; ++k) {
      GenerationParams g = l.params;
      g.seed = l.seed_set ? l.params.seed + static_cast<uint64_t>(k) : base_seed + out.size();
      out.push_back(std::move(g));
    }
  return out;
}

std::string parameters_text(const GenerationParams& p, int width, int height, const std::string& model, int prior,
                            bool img2img, const StrengthDefaults& strengths,
                            const std::map<std::string, std::string>& adapters) {
  std::ostringstream os;
  os << p.prompt << "\n";
  if (!p.negative_prompt.empty()) os << "Negative prompt: " << p.negative_prompt << "\n";
  os << "Steps: " << p.steps << ", Sampler: " << (p.sampler.empty() ? "model default" : p.sampler)
     << ", CFG scale: " << p.guidance << ", Seed: " << p.seed << ", Size: " << width << "x" << height;
  if (p.clip_skip > 0) os << ", Clip skip: " << p.clip_skip + 1;
  if (p.guidance_rescale > 0) os << ", CFG rescale: " << p.guidance_rescale;
  if (p.true_cfg_scale != 1.0) os << ", True CFG scale: " << p.true_cfg_scale;
  if (!p.skip_guidance_layers.empty()) {
    os << ", Skip layers: ";
    for (size_t k = 0; k < p.skip_guidance_layers.size(); ++k) os << (k ? " " : "") << p.skip_guidance_layers[k];
    os << " (scale " << p.skip_layer_guidance_scale << ", from " << p.skip_layer_guidance_start << " to "
       << p.skip_layer_guidance_stop << ")";
  }
  // Kandinsky 2.2 (kPlainPrior) starts from its image when the request has a prompt too, and varies it otherwise
  const bool starts_from_image = !p.image_prompt.empty() && (prior == kPlainPrior ? !p.prompt.empty() : img2img);
  if (prior && !p.image_prompt.empty() && !starts_from_image)
    os << ", Image prompt: " << describe_image_ref(p.image_prompt)
       << (prior == kNoisedPrior ? ", Noise level: " + std::to_string(p.noise_level) : std::string());
  else if (prior)
    os << ", Prior steps: " << p.prior_steps << ", Prior CFG scale: " << p.prior_guidance
       << (prior == kNoisedPrior ? ", Noise level: " + std::to_string(p.noise_level) : std::string());
  if (starts_from_image)  // image-to-image's starting image
    os << ", Image: " << describe_image_ref(p.image_prompt)
       << (p.mask.empty() ? "" : ", Mask: " + describe_image_ref(p.mask)) << ", Denoising strength: "
       << p.effective_strength(strengths);
  else if (!p.image_prompt.empty() && !prior)  // the x4 upscaler's input image
    os << ", Image: " << describe_image_ref(p.image_prompt) << ", Noise level: " << p.noise_level;
  if (!p.lora.empty()) {  // the request's adapters, each with its file where the run knows it
    os << ", LoRA adapters: " << p.lora;
    std::string files;
    for (const auto& [name, path] : adapters) {
      const std::string list = "," + p.lora + ",";
      if (list.find("," + name + ",") != std::string::npos || list.find("," + name + ":") != std::string::npos)
        files += (files.empty() ? "" : ", ") + name + "=" + path;
    }
    if (!files.empty()) os << " (" << files << ")";
  }
  if (p.guess_mode) os << ", Guess mode: true";
  for (size_t k = 0; k < p.controls.size(); ++k) {  // the second ControlNet's as "Control image 2: ...", and so on
    const ControlInput& c = p.controls[k];
    if (c.image.empty()) continue;
    const std::string n = k == 0 ? "" : " " + std::to_string(k + 1);
    os << ", Control image" << n << ": " << describe_image_ref(c.image) << ", Control scale" << n << ": " << c.scale;
    if (c.start != 0.0 || c.end != 1.0) os << ", Control steps" << n << ": " << c.start << "-" << c.end;
  }
  if (p.original_width > 0 || p.original_height > 0)
    os << ", Original size: " << (p.original_width > 0 ? p.original_width : width) << "x"
       << (p.original_height > 0 ? p.original_height : height);
  if (p.crop_top > 0 || p.crop_left > 0) os << ", Crop top left: " << p.crop_top << "," << p.crop_left;
  if (!p.ip_adapter_image.empty())
    os << ", IP-Adapter image: " << describe_image_ref(p.ip_adapter_image)
       << ", IP-Adapter scale: " << p.ip_adapter_scale;
  if (p.aesthetic_score >= 0 || p.negative_aesthetic_score >= 0)
    os << ", Aesthetic score: " << p.aesthetic_score_or() << ", Negative aesthetic score: "
       << p.negative_aesthetic_score_or();
  const GenerationParams d;
  if (p.skip_refiner) os << ", Refiner: skipped";
  if (p.denoising_end != d.denoising_end || p.refiner_steps != d.refiner_steps || p.refiner_strength != d.refiner_strength)
    os << ", Refiner from: " << p.denoising_end_or() << ", Refiner steps: " << p.refiner_steps_or()
       << (p.denoising_end_or() >= 1 ? detail::cat(", Refiner strength: ", p.refiner_strength_or()) : std::string());
  if (p.sr_steps != d.sr_steps || p.sr_guidance != d.sr_guidance || p.sr_noise_level != d.sr_noise_level)
    os << ", SR steps: " << p.sr_steps << ", SR CFG scale: " << p.sr_guidance << ", SR noise level: " << p.sr_noise_level;
  if (p.x4_steps != d.x4_steps || p.x4_guidance != d.x4_guidance || p.x4_noise_level != d.x4_noise_level)
    os << ", x4 steps: " << p.x4_steps << ", x4 CFG scale: " << p.x4_guidance << ", x4 noise level: " << p.x4_noise_level;
  os << ", Model: " << model << ", Generator: diffpipe";
  return os.str();
}

// ---------------------------------------------------------------- OutputSink

OutputSink::OutputSink(const OutputOptions& o) : o_(o) {
  DP_CHECK(o_.format == "png" || o_.format == "webdataset", "--format: png or webdataset, got '", o_.format, "'");
  DP_CHECK(o_.shard_size >= 1 && o_.shard_size <= 1000000, "--shard-size must be in [1, 1000000]");
  make_dirs(o_.dir);
  lock();
  check_run_json();
  read_lines();
  jsonl_fd_ = ::open(join_path(o_.dir, "images.jsonl").c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  DP_CHECK(jsonl_fd_ >= 0, join_path(o_.dir, "images.jsonl"), ": cannot open for writing: ", std::strerror(errno));
}

OutputSink::~OutputSink() {
  for (auto& [k, s] : shards_)
    if (s.fd >= 0) ::close(s.fd);
  if (jsonl_fd_ >= 0) ::close(jsonl_fd_);
  if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the lock
}

void OutputSink::lock() {
  const std::string path = join_path(o_.dir, ".diffpipe.lock");
  lock_fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  DP_CHECK(lock_fd_ >= 0, path, ": cannot open: ", std::strerror(errno));
  if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    char buf[32] = {0};
    const ssize_t n = ::pread(lock_fd_, buf, sizeof(buf) - 1, 0);
    ::close(lock_fd_);
    lock_fd_ = -1;
    DP_FAIL(o_.dir, ": another diffpipe job", n > 0 ? std::string(" (pid ") + std::string(buf, std::strlen(buf)) + ")" : "",
            " is writing here; wait for it to finish or use another --out");
  }
  const std::string pid = std::to_string(::getpid());
  if (::ftruncate(lock_fd_, 0) == 0) {
    const ssize_t w = ::pwrite(lock_fd_, pid.data(), pid.size(), 0);
    (void)w;
  }
}

void OutputSink::check_run_json() {
  const std::string run = join_path(o_.dir, "run.json"), lines = join_path(o_.dir, "images.jsonl");
  if (o_.overwrite) {  // drop what an earlier run left: its images, shards, lines, settings
    if (file_exists(lines)) {
      std::ifstream in(lines);
      std::string l;
      while (std::getline(in, l)) {
        try {
          const json j = json::parse(l);
          if (j.contains("file") && j["file"].is_string()) std::remove(j["file"].get<std::string>().c_str());
          if (j.contains("shard") && j["shard"].is_string())
            std::remove(join_path(o_.dir, j["shard"].get<std::string>()).c_str());
        } catch (...) {
        }
      }
    }
    for (const auto& f : {lines, run, join_path(o_.dir, "contact_sheet.png")}) std::remove(f.c_str());
  }
  const json want = {{"diffpipe_run", 1}, {"model", o_.model}, {"images", o_.total}, {"format", o_.format},
                     {"shard_size", o_.shard_size}, {"settings", o_.identity}};
  std::ifstream probe(lines);
  const bool has_lines = probe.good() && probe.peek() != std::ifstream::traits_type::eof();
  if (!file_exists(run) || !has_lines) {  // nothing finished yet: nothing to protect
    DP_CHECK(!has_lines, o_.dir, ": holds images.jsonl from a run without run.json (an older diffpipe or "
             "another tool); use another --out, or --overwrite to replace it");
    const std::string s = want.dump(2) + "\n";
    write_file_atomic(run, s.data(), s.size());
    return;
  }
  json have;
  try {
    std::ifstream in(run);
    have = json::parse(in);
  } catch (const std::exception& e) {
    DP_FAIL(run, ": not valid JSON (", e.what(), "); use another --out, or --overwrite to replace the folder's run");
  }
  std::string diff;
  for (const char* k : {"model", "images", "format", "shard_size", "settings"})
    if (!have.contains(k) || have[k] != want[k])
      diff += detail::cat(diff.empty() ? "" : ", ",
                          std::string(k) == "settings" ? std::string("prompts or settings") : std::string(k),
                          std::string(k) == "settings" || !have.contains(k) ? "" : " (was " + have[k].dump() + ", now " + want[k].dump() + ")");
  DP_CHECK(diff.empty(), o_.dir, ": holds a run with other settings: ", diff,
           "; rerun the same command to continue it, use another --out, or --overwrite to replace it");
}

void OutputSink::read_lines() {
  const std::string path = join_path(o_.dir, "images.jsonl");
  if (!file_exists(path)) return;
  std::string all;
  {
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    all = ss.str();
  }
  const size_t keep = all.empty() || all.back() == '\n' ? all.size() : all.rfind('\n') + 1;  // npos + 1 == 0
  if (keep != all.size()) {
    std::fprintf(stderr, "diffpipe: %s: the last line was cut (an earlier run stopped while writing it); removed, "
                 "its image is made again\n", path.c_str());
    DP_CHECK(::truncate(path.c_str(), static_cast<off_t>(keep)) == 0, path, ": cannot repair: ", std::strerror(errno));
    all.resize(keep);
  }
  size_t pos = 0;
  for (int lineno = 1; pos < all.size(); ++lineno) {
    const size_t nl = all.find('\n', pos);
    const std::string line = all.substr(pos, nl - pos);
    pos = nl + 1;
    if (line.empty()) continue;
    json j;
    try {
      j = json::parse(line);
    } catch (const std::exception& e) {
      DP_FAIL(path, ":", lineno, ": not JSON (", e.what(), "); the folder was edited by hand? use --overwrite");
    }
    DP_CHECK(j.contains("index") && j["index"].is_number_unsigned() && j["index"].get<uint64_t>() < o_.total, path,
             ":", lineno, ": no valid 'index' for this run of ", o_.total, " images");
    const uint64_t idx = j["index"].get<uint64_t>();
    if (!finished_.insert(idx).second) continue;
    if (j.value("status", std::string()) == "done") {
      ++done_before_;
      if (j.contains("file") && j["file"].is_string()) {
        done_files_[idx] = j["file"].get<std::string>();
        if (static_cast<int>(done_files_.size()) > o_.sheet_max) done_files_.erase(std::prev(done_files_.end()));
      }
    }
  }
}

std::string OutputSink::file_for(uint64_t index, uint64_t seed) const {
  char name[96];
  if (o_.total <= static_cast<size_t>(o_.shard_size)) {  // the whole run fits in one folder: flat
    std::snprintf(name, sizeof(name), "img-%05" PRIu64 "-seed%" PRIu64 ".png", index, seed);
    return join_path(o_.dir, name);
  }
  char sub[32];
  std::snprintf(sub, sizeof(sub), "%05" PRIu64, index / static_cast<uint64_t>(o_.shard_size));
  std::snprintf(name, sizeof(name), "img-%08" PRIu64 "-seed%" PRIu64 ".png", index, seed);
  return join_path(join_path(o_.dir, sub), name);
}

void OutputSink::append_line(const std::string& line) {
  write_all(jsonl_fd_, line + "\n", join_path(o_.dir, "images.jsonl"));
}

void OutputSink::write(uint64_t index, const GeneratedImage& gi, json line, bool echo_stdout) {
  const bool done = gi.status == "done";
  if (o_.format == "png") {
    if (done) {
      const std::string file = file_for(index, gi.params.seed);
      const auto slash = file.rfind('/');
      if (slash != std::string::npos) make_dirs(file.substr(0, slash));
      write_png(file, gi.image, {{"parameters", parameters_text(gi.params, gi.image.width, gi.image.height, o_.model, o_.prior, o_.img2img, o_.strengths, o_.adapters)}});
      line["file"] = file;
      done_files_[index] = file;
      if (static_cast<int>(done_files_.size()) > o_.sheet_max) done_files_.erase(std::prev(done_files_.end()));
    }
    const std::string s = line.dump();
    append_line(s);
    if (echo_stdout) std::printf("%s\n", s.c_str());
    finished_.insert(index);
    return;
  }
  // webdataset: the sample goes into its shard's .part file at once; its line waits for the shard to complete
  const int64_t k = static_cast<int64_t>(index / static_cast<uint64_t>(o_.shard_size));
  char sname[32], key[32];
  std::snprintf(sname, sizeof(sname), "%05" PRId64 ".tar", k);
  std::snprintf(key, sizeof(key), "%09" PRIu64, index);
  Shard& sh = shards_[k];
  const std::string part = join_path(o_.dir, std::string(sname) + ".part");
  if (sh.fd < 0) {
    sh.fd = ::open(part.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);  // a stale part is redone
    DP_CHECK(sh.fd >= 0, part, ": cannot open for writing: ", std::strerror(errno));
    const uint64_t first = static_cast<uint64_t>(k) * static_cast<uint64_t>(o_.shard_size);
    sh.expected = std::min<uint64_t>(o_.shard_size, o_.total - first);
  }
  line["shard"] = sname;
  line["key"] = key;
  if (done) {
    const auto png = encode_png(gi.image, {{"parameters", parameters_text(gi.params, gi.image.width, gi.image.height, o_.model, o_.prior, o_.img2img, o_.strengths, o_.adapters)}});
    const std::string meta = line.dump();
    for (const auto& [name, bytes] : {std::pair<std::string, std::string>{std::string(key) + ".png", std::string(png.begin(), png.end())},
                                      std::pair<std::string, std::string>{std::string(key) + ".json", meta}}) {
      std::string rec = tar_header(name, bytes.size()) + bytes;
      rec.resize((rec.size() + 511) / 512 * 512, '\0');
      write_all(sh.fd, rec, part);
    }
  }
  const std::string s = line.dump();
  sh.lines.push_back(s);
  if (echo_stdout) std::printf("%s\n", s.c_str());
  finished_.insert(index);
  if (sh.lines.size() == sh.expected) flush_shard(k, true);
}

void OutputSink::write_preview(uint64_t index, int k, const GenerationParams& p, const Image& image) {
  if (o_.format != "png") return;
  std::string file = file_for(index, p.seed);
  file = file.substr(0, file.size() - 4) + "-preview-" + std::to_string(k) + ".png";
  const auto slash = file.rfind('/');
  if (slash != std::string::npos) make_dirs(file.substr(0, slash));
  write_png(file, image, {{"parameters", parameters_text(p, image.width, image.height, o_.model, o_.prior, o_.img2img, o_.strengths, o_.adapters) + ", Preview: " + std::to_string(k)}});
}

void OutputSink::flush_shard(int64_t k, bool complete) {
  Shard& sh = shards_.at(k);
  if (!complete) return;
  char sname[32];
  std::snprintf(sname, sizeof(sname), "%05" PRId64 ".tar", k);
  const std::string part = join_path(o_.dir, std::string(sname) + ".part"), tar = join_path(o_.dir, sname);
  write_all(sh.fd, std::string(1024, '\0'), part);  // end of archive
  DP_CHECK(::fsync(sh.fd) == 0 && ::close(sh.fd) == 0, part, ": write failed: ", std::strerror(errno));
  sh.fd = -1;
  DP_CHECK(std::rename(part.c_str(), tar.c_str()) == 0, tar, ": rename failed: ", std::strerror(errno));
  for (const auto& l : sh.lines) append_line(l);  // only now are its samples finished
  shards_.erase(k);
}

void OutputSink::finish(bool contact_sheet) {
  if (!contact_sheet || o_.format != "png" || done_files_.size() < 2) return;
  std::vector<Image> imgs;
  for (const auto& [idx, f] : done_files_) {
    if (!file_exists(f)) continue;
    imgs.push_back(read_png(f));
    if (imgs.back().width != imgs.front().width || imgs.back().height != imgs.front().height) return;  // mixed sizes
  }
  if (imgs.size() < 2) return;
  const int cols = static_cast<int>(std::ceil(std::sqrt(static_cast<double>(imgs.size()))));
  write_png(join_path(o_.dir, "contact_sheet.png"), diffpipe::contact_sheet(imgs, cols));
}

// ---------------------------------------------------------------- Progress

Progress::Progress(size_t total, size_t already, double every_s)
    : total_(total), already_(already), every_s_(every_s), tty_(::isatty(2) != 0),
      t0_(std::chrono::steady_clock::now()) {}

void Progress::tick(bool done) {
  ++count_;
  failed_ += !done;
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  if (tty_ ? t - last_ >= 0.2 : t - last_ >= every_s_) {
    last_ = t;
    print(false);
  }
}

void Progress::end() {
  if (count_ > 0) print(true);
}

void Progress::print(bool final) {
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  const double rate = t > 0 ? count_ / t : 0;
  const size_t done = already_ + count_;
  const double eta = rate > 0 ? (total_ - done) / rate : 0;
  char buf[256];
  std::snprintf(buf, sizeof(buf), "diffpipe: %zu/%zu images (%.1f%%)%s, %.2f images/s, %s %dm%02ds", done, total_,
                total_ ? 100.0 * done / total_ : 100.0,
                failed_ ? detail::cat(", ", failed_, " not done").c_str() : "", rate, final ? "elapsed" : "ETA",
                static_cast<int>((final ? t : eta) / 60), static_cast<int>(std::fmod(final ? t : eta, 60.0)));
  if (tty_) std::fprintf(stderr, "\r%s\033[K%s", buf, final ? "\n" : "");
  else std::fprintf(stderr, "%s\n", buf);
  std::fflush(stderr);
}

}  // namespace diffpipe::offline
