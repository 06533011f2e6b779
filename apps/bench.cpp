// `diffpipe bench`: throughput as users measure it, the same work through several placements in one run.
//   [mpirun -np N] diffpipe bench --model DIR [--images 16] [--steps 20] [--placements one,pipeline,replicas]
//                                 [--rates 0.5,1,2] [--out bench.json] [--svg bench.svg]
// Placements over the N ranks: one (every stage on rank 0), pipeline (stages on their own ranks, the heavy one
// replicated: as `generate` derives it), replicas (every rank runs every stage; a request stays on one rank).
// Closed loop: all images at once, as fast as possible. Open loop: Poisson arrivals at each rate (images/s).
// Every image is checked first (done, the requested size, not blank, and within +-1 of the first placement's).
// Reports images/s, latency percentiles, per-stage busy fraction, peak queue depth and admitted requests, tensor
// bytes moved between ranks, and ratios against `one`, as JSON; an SVG chart plots throughput against latency.
// With --predict PROFILE every run is also simulated (diffpipe plan's simulator, the same placement and arrivals)
// and the prediction is reported beside the measurement.
#include <ATen/Parallel.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "cli.h"
#include "commands.h"
#include "diffpipe/cluster/pipeline_runner.h"
#include "diffpipe/cluster/plan.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/scheduler/simulator.h"
#include "diffpipe/runtime/mpi_env.h"
#include "diffpipe/stages/model.h"
#include "diffpipe/stages/pipeline.h"
#include "diffpipe/stages/stages.h"

namespace diffpipe::apps {
namespace {

using json = nlohmann::json;

std::vector<double> parse_list(const std::string& s, const char* what) {
  std::vector<double> out;
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    char* end = nullptr;
    const double v = std::strtod(tok.c_str(), &end);
    DP_CHECK(!tok.empty() && *end == 0 && v > 0 && std::isfinite(v), "bench: --", what, ": '", tok,
             "' is not a positive number");
    out.push_back(v);
  }
  return out;
}

Placement make_placement(const std::string& kind, int world, const RankSpec& rs,
                         const std::vector<PipelineStage>& layout, int max_batch) {
  Placement p = kind == "replicas" ? Placement::replicas(world, rs, layout) : Placement::derive(world, rs, layout);
  if (kind == "one") {
    for (auto& s : p.stages) s.spec.ranks = {0};
    p.allow_idle_ranks = true;
  } else if (kind != "replicas") {
    DP_CHECK(kind == "pipeline", "bench: --placements: unknown placement '", kind, "' (one, pipeline, replicas)");
  }
  for (auto& s : p.stages) s.spec.max_batch = max_batch;
  p.validate("bench placement " + kind);
  return p;
}

// The chart: p50 latency against achieved images/s, one series per placement.
std::string svg_chart(const json& runs) {
  const double W = 640, H = 400, L = 70, R = 150, T = 30, Bm = 50;
  double xmax = 1e-9, ymax = 1e-9;
  for (const auto& r : runs) {
    xmax = std::max(xmax, r["images_per_s"].get<double>());
    ymax = std::max(ymax, r["latency_s"]["p50"].get<double>());
  }
  xmax *= 1.1;
  ymax *= 1.1;
  auto X = [&](double x) { return L + (W - L - R) * x / xmax; };
  auto Y = [&](double y) { return H - Bm - (H - T - Bm) * y / ymax; };
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"};
  std::ostringstream os;
  os << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
     << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
     << "<text x=\"" << W / 2 << "\" y=\"18\" text-anchor=\"middle\">diffpipe bench: throughput against latency</text>\n"
     << "<line x1=\"" << L << "\" y1=\"" << H - Bm << "\" x2=\"" << W - R << "\" y2=\"" << H - Bm << "\" stroke=\"black\"/>\n"
     << "<line x1=\"" << L << "\" y1=\"" << T << "\" x2=\"" << L << "\" y2=\"" << H - Bm << "\" stroke=\"black\"/>\n"
     << "<text x=\"" << (L + W - R) / 2 << "\" y=\"" << H - 12 << "\" text-anchor=\"middle\">images/s</text>\n"
     << "<text x=\"16\" y=\"" << (T + H - Bm) / 2 << "\" transform=\"rotate(-90 16 " << (T + H - Bm) / 2
     << ")\" text-anchor=\"middle\">p50 latency (s)</text>\n";
  for (int k = 0; k <= 4; ++k) {
    const double xv = xmax * k / 4, yv = ymax * k / 4;
    os << "<text x=\"" << X(xv) << "\" y=\"" << H - Bm + 16 << "\" text-anchor=\"middle\">" << std::round(xv * 100) / 100
       << "</text>\n<text x=\"" << L - 6 << "\" y=\"" << Y(yv) + 4 << "\" text-anchor=\"end\">"
       << std::round(yv * 100) / 100 << "</text>\n";
  }
  std::map<std::string, std::vector<std::pair<double, double>>> series;
  for (const auto& r : runs)
    series[r["placement"].get<std::string>()].push_back({r["images_per_s"].get<double>(), r["latency_s"]["p50"].get<double>()});
  int c = 0;
  for (auto& [name, pts] : series) {
    std::sort(pts.begin(), pts.end());
    const char* col = colors[c % 5];
    os << "<polyline fill=\"none\" stroke=\"" << col << "\" points=\"";
    for (const auto& [x, y] : pts) os << X(x) << "," << Y(y) << " ";
    os << "\"/>\n";
    for (const auto& [x, y] : pts) os << "<circle cx=\"" << X(x) << "\" cy=\"" << Y(y) << "\" r=\"4\" fill=\"" << col << "\"/>\n";
    os << "<text x=\"" << W - R + 10 << "\" y=\"" << T + 20 + 18 * c << "\" fill=\"" << col << "\">" << name << "</text>\n";
    ++c;
  }
  os << "</svg>\n";
  return os.str();
}

}  // namespace

int bench_main(int argc, char** argv) {
  std::optional<cli::Args> parsed;
  run_on_all_ranks_or_fail([&] {
    parsed.emplace("bench", "[mpirun -np N] diffpipe bench --model DIR [options]",
                   std::vector<cli::Opt>{
                       {"model", "DIR", "model folder"},
                       {"images", "N", "images per run (default 16)"},
                       {"steps", "N", "steps per image (default 20)"},
                       {"guidance", "G", "guidance scale (default 7.5)"},
                       {"width", "W", "image width (default: the model's)"},
                       {"height", "H", "image height (default: the model's)"},
                       {"placements", "LIST", "one, pipeline, replicas (default: all three; one rank: one)"},
                       {"rates", "LIST", "open loop: Poisson arrival rates in images/s (default: closed loop only)"},
                       {"max-batch", "N", "per-stage batch limit (default 8)"},
                       {"dtype", "TYPE", "float32 | float16 | bfloat16"},
                       {"device", "cpu|cuda", "device of every rank (default cpu)"},
                       {"threads", "N", "CPU threads per rank (default: cores / ranks on the node)"},
                       {"seed", "S", "seed of the prompts' noise and the arrivals (default 1)"},
                       {"out", "FILE", "write the JSON report there (default: stdout)"},
                       {"svg", "FILE", "write the throughput/latency chart there"},
                       {"predict", "FILE", "a cost profile (diffpipe profile): simulate every run too and report "
                                           "predicted against measured"}},
                   argc, argv, "the same work through several placements in one run; outputs are checked first");
    if (parsed->help_requested()) return;
    DP_CHECK(parsed->has("model"), "bench: --model DIR is required");
  });
  const auto& world = mpi::world();
  if (parsed->help_requested()) {
    if (world.rank == 0) std::fputs(parsed->help_text().c_str(), stdout);
    return 0;
  }
  const cli::Args& a = *parsed;
  const int n = static_cast<int>(a.integer("images", 16)), steps = static_cast<int>(a.integer("steps", 20));
  const int max_batch = static_cast<int>(a.integer("max-batch", 8));
  DP_CHECK(n >= 1 && n <= 100000 && steps >= 1 && max_batch >= 1, "bench: --images, --steps and --max-batch must be >= 1");
  int threads = static_cast<int>(a.integer("threads", 0));
  if (threads <= 0) threads = mpi::threads_per_rank();
  at::set_num_threads(threads);
  RankSpec rs;
  rs.device = a.str("device", "cpu");
  rs.dtype = a.str("dtype", "float32");
  const uint64_t seed = a.u64("seed", 1);
  const std::vector<double> rates = a.has("rates") ? parse_list(a.str("rates"), "rates") : std::vector<double>{};
  std::vector<std::string> kinds;
  {
    std::stringstream ss(a.str("placements", world.size == 1 ? "one" : "one,pipeline,replicas"));
    std::string k;
    while (std::getline(ss, k, ',')) kinds.push_back(k);
  }
  const std::string model_dir = a.str("model");
  std::optional<CostProfile> profile;
  if (a.has("predict")) {
    profile = CostProfile::load(a.str("predict"));
    DP_CHECK(profile->steps == steps, "bench: --predict ", a.str("predict"), " was measured at ", profile->steps,
             " steps, this run makes ", steps, " (profile with --steps ", steps, ")");
  }
  std::vector<PipelineStage> layout;
  SdModel model;
  std::vector<GenerationParams> reqs(n);
  run_on_all_ranks_or_fail([&] {
    layout = pipeline_layout(model_dir);
    for (const auto& k : kinds) (void)make_placement(k, world.size, rs, layout, max_batch);
    model = SdModel::load(model_dir, device_spec_of(rs));  // every stage: each placement puts different stages on a rank
    const char* prompts[] = {"a red circle at the top left", "a blue square", "a green triangle on a black background",
                             "a small yellow circle", "two shapes"};
    for (int i = 0; i < n; ++i) {
      reqs[i].prompt = prompts[i % 5];
      reqs[i].steps = steps;
      reqs[i].guidance = a.number("guidance", 7.5);
      reqs[i].width = static_cast<int>(a.integer("width", 0));
      reqs[i].height = static_cast<int>(a.integer("height", 0));
      reqs[i].seed = seed + static_cast<uint64_t>(i);
      (void)resolve_params(model, reqs[i]);
    }
  });
  std::shared_ptr<Transport> t = world.size == 1 ? make_inproc_world(1)[0] : make_mpi_transport();
  const ResolvedParams rp = resolve_params(model, reqs[0]);
  // the delivered size: a cascade's super-resolution (upscale stage, IF stages II and III) enlarges the base image
  const int64_t enlarge = (model.super_res ? model.super_res->config().scale : 1) * model.sr_factor() *
                          (model.stage3 ? model.stage3->latent_factor() : 1);
  const int out_w = static_cast<int>(rp.width * enlarge), out_h = static_cast<int>(rp.height * enlarge);

  json runs = json::array();
  std::vector<Image> first;  // the first closed-loop run's images: the others are checked against them
  std::map<std::string, double> closed_rate;
  for (const auto& kind : kinds) {
    for (int r = -1; r < static_cast<int>(rates.size()); ++r) {  // -1: closed loop
      RunOptions o;
      o.model_dir = model_dir;
      o.placement = make_placement(kind, world.size, rs, layout, max_batch);
      o.meta.resize(n);
      if (r >= 0) {  // Poisson arrivals at rates[r]
        std::mt19937_64 rng(seed * 7919 + static_cast<uint64_t>(r));
        std::exponential_distribution<double> gap(rates[r]);
        double at = 0;
        for (auto& m : o.meta) {
          m.arrival_s = at;
          at += gap(rng);
        }
      }
      std::vector<Image> images(n);
      std::vector<double> lat;
      size_t not_done = 0;
      std::string why;
      mpi::barrier();
      const RunStats st = run_pipeline(o, *t, model, reqs, [&](GeneratedImage&& g) {
        if (g.status != "done") {
          ++not_done;
          why = g.reason;
          return;
        }
        lat.push_back(g.latency_s);
        images[g.index] = std::move(g.image);
      });
      // per-stage busy time and bytes moved, summed over ranks
      std::vector<double> mine = st.busy_s;
      mine.push_back(st.bytes_sent);
      std::vector<double> sum(mine.size());
      if (world.active && world.size > 1)
        DP_MPI_CHECK(MPI_Reduce(mine.data(), sum.data(), static_cast<int>(mine.size()), MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD));
      else
        sum = mine;
      if (world.rank != 0) continue;
      DP_CHECK(not_done == 0, "bench: ", not_done, " image(s) not done in placement ", kind, ": ", why);
      size_t identical = 0, values = 0, beyond = 0;
      for (int i = 0; i < n; ++i) {
        const Image& im = images[i];
        DP_CHECK(im.width == out_w && im.height == out_h, "bench: image ", i, " is ", im.width, "x", im.height,
                 ", expected ", out_w, "x", out_h);
        const auto [lo, hi] = std::minmax_element(im.pixels.begin(), im.pixels.end());
        DP_CHECK(*hi > *lo, "bench: image ", i, " of placement ", kind, " is blank");
        if (!first.empty()) {
          identical += im.pixels == first[i].pixels;
          for (size_t k = 0; k < im.pixels.size(); ++k) beyond += std::abs(int(im.pixels[k]) - int(first[i].pixels[k])) > 1;
          values += im.pixels.size();
        }
      }
      DP_CHECK(values == 0 || beyond <= values / 1000, "bench: placement ", kind, " differs from the first beyond +-1 in ",
               beyond, " of ", values, " values");
      if (first.empty()) first = images;
      double span = 0;
      for (int i = 0; i < n; ++i) span = std::max(span, o.meta[i].arrival_s + lat[i]);
      const double ips = r < 0 ? n / st.wall_s : n / std::max(span, 1e-9);
      json busy = json::object();
      for (size_t k = 0; k < o.placement.stages.size() && k < sum.size() - 1; ++k)
        busy[o.placement.stages[k].name] = sum[k] / st.wall_s;
      json run = {{"placement", kind}, {"mode", r < 0 ? "closed" : "open"}, {"wall_s", st.wall_s},
                  {"images_per_s", ips},
                  {"latency_s", {{"p50", sched::percentile(lat, 0.5)}, {"p95", sched::percentile(lat, 0.95)},
                                 {"p99", sched::percentile(lat, 0.99)}}},
                  {"busy_fraction", busy}, {"bytes_moved", sum.back()}, {"peak_queued", st.peak_queued},
                  {"peak_admitted", st.peak_active}, {"identical_to_first", values ? json(identical) : json(n)}};
      if (profile) {  // the same placement and arrivals through the simulator
        sched::SimNetwork net;
        net.ranks_per_node = world.size;
        if (rs.device == "cpu") {  // MPI between CPU ranks on one machine (docs/results.md, transport table)
          net.intra_bytes_per_s = 2e9;
          net.latency_s = 150e-6;
        }
        sched::SimWorkload w;
        for (const auto& m : o.meta) w.arrivals.push_back(m.arrival_s);
        const sched::SimResult sim = sched::simulate(sim_stages(o.placement, *profile), world.size, net, w);
        run["predicted"] = {{"images_per_s", sim.images_per_s}, {"latency_s", {{"p50", sim.latency_p50}, {"p99", sim.latency_p99}}},
                            {"measured_over_predicted", sim.images_per_s > 0 ? ips / sim.images_per_s : 0}};
        std::fprintf(stderr, "diffpipe bench:   predicted %.3f images/s, p50 %.3f s, p99 %.3f s (measured/predicted %.2f)\n",
                     sim.images_per_s, sim.latency_p50, sim.latency_p99, sim.images_per_s > 0 ? ips / sim.images_per_s : 0);
      }
      if (r >= 0) run["rate"] = rates[r];
      else closed_rate[kind] = ips;
      std::fprintf(stderr, "diffpipe bench: %-8s %s%s: %.3f images/s, p50 %.3f s, p99 %.3f s\n", kind.c_str(),
                   r < 0 ? "closed loop" : "open loop at ", r < 0 ? "" : detail::cat(rates[r], "/s").c_str(), ips,
                   sched::percentile(lat, 0.5), sched::percentile(lat, 0.99));
      runs.push_back(run);
    }
  }
  t.reset();
  if (world.rank != 0) return 0;
  json ratios = json::object();
  if (closed_rate.count("one"))
    for (const auto& [k, v] : closed_rate)
      if (k != "one") ratios[k + "/one"] = v / closed_rate["one"];
  const json report = {{"model", model_dir}, {"images", n}, {"steps", steps}, {"ranks", world.size},
                       {"size", {out_w, out_h}}, {"max_batch", max_batch}, {"threads_per_rank", threads},
                       {"runs", runs}, {"closed_loop_ratios", ratios}};
  if (a.has("out")) {
    std::ofstream(a.str("out")) << report.dump(2) << "\n";
  } else {
    std::printf("%s\n", report.dump(2).c_str());
  }
  if (a.has("svg")) {
    const std::string svg = svg_chart(runs);
    write_file_atomic(a.str("svg"), svg.data(), svg.size());
  }
  return 0;
}

}  // namespace diffpipe::apps
