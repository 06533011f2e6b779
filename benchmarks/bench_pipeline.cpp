// Pipeline throughput against the single-process sequential run of the same work, as a ratio in one run.
//   mpirun -np N bench_pipeline --model DIR [--requests 16] [--steps 20] [--device cpu|cuda] [--dtype ...]
//                               [--max-batch 8] [--transport mpi|nccl]
// Phase 1 (rank 0 alone): each request in turn: encode, every denoising step, decode (batch 1, no overlap).
// Phase 2 (all ranks): the same requests through the derived placement (stages overlapped, batched).
// The pipeline's images are checked against the sequential ones first (identical with --max-batch 1;
// otherwise |diff| <= 1 on >= 99.9% of 8-bit values), then throughputs, the ratio and per-stage busy
// fractions are printed.
#include <ATen/Parallel.h>
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "cli.h"
#include "diffpipe/cluster/pipeline_runner.h"
#include "diffpipe/runtime/mpi_env.h"
#include "diffpipe/stages/stages.h"

using namespace diffpipe;

int main(int argc, char** argv) {
  mpi::init(&argc, &argv);
  std::string model_dir, device = "cpu", dtype = "float32", transport = "mpi";
  int n = 16, steps = 20, max_batch = 8, size = 0;
  bool batch_invariant = false;
  const auto& w = mpi::world();
  try {
    cli::Args a("bench_pipeline", "[mpirun -np N] bench_pipeline --model DIR [options]",
                {{"model", "DIR", "model folder"},
                 {"requests", "N", "requests (default 16)"},
                 {"steps", "N", "steps per request (default 20)"},
                 {"device", "cpu|cuda", "device of every rank (default cpu)"},
                 {"dtype", "TYPE", "float32 | float16 | bfloat16"},
                 {"max-batch", "N", "per-stage batch limit (default 8)"},
                 {"transport", "mpi|nccl", "transport (default mpi)"},
                 {"size", "PX", "image size (default: the model's)"},
                 {"batch-invariant", "", "batch-invariant CPU kernels"}},
                argc - 1, argv + 1, "pipeline throughput against one process running the same requests one by one");
    if (a.help_requested()) {
      if (w.rank == 0) std::fputs(a.help_text().c_str(), stdout);
      mpi::finalize();
      return 0;
    }
    model_dir = a.str("model");
    n = static_cast<int>(a.integer("requests", n));
    steps = static_cast<int>(a.integer("steps", steps));
    device = a.str("device", device);
    dtype = a.str("dtype", dtype);
    max_batch = static_cast<int>(a.integer("max-batch", max_batch));
    transport = a.str("transport", transport);
    size = static_cast<int>(a.integer("size", size));
    batch_invariant = a.flag("batch-invariant");
    if (model_dir.empty()) throw std::runtime_error("--model DIR is required");
    const int local = std::max(1, w.local_size);
    const int threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / local);
    std::vector<GenerationParams> reqs(n);
    for (int i = 0; i < n; ++i) {
      reqs[i].prompt = "benchmark prompt number " + std::to_string(i % 5);
      reqs[i].steps = steps;
      reqs[i].seed = 1000 + i;
      reqs[i].sampler = "ddim";
      reqs[i].width = reqs[i].height = size;
    }
    RankSpec rs;
    rs.device = device;
    rs.dtype = dtype;
    std::vector<Image> seq_images(n);
    double seq_s = 0;
    if (w.rank == 0) {  // sequential baseline, on rank 0 with all of the node's cores
      at::set_num_threads(static_cast<int>(std::thread::hardware_concurrency()));
      DeviceSpec spec;
      if (device == "cuda") spec.device = at::Device(at::kCUDA, 0);
      spec.dtype = dtype == "float16" ? at::kHalf : dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
      spec.batch_invariant = batch_invariant;
      SdModel m = SdModel::load(model_dir, spec);
      TextEncodeStage enc(m);
      DenoiseStage den(m);
      auto run_one = [&](const GenerationParams& p) {
        auto e = enc.run({&p});
        DenoiseState s = make_denoise_state(m, p, e[0]);
        while (!s.done()) den.step({&s});
        return decode_final(m, {s.latents})[0];
      };
      run_one(reqs[0]);  // warm-up
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < n; ++i) seq_images[i] = run_one(reqs[i]);
      seq_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    mpi::barrier();
    at::set_num_threads(threads);
    RunOptions opts;
    opts.model_dir = model_dir;
    opts.placement = Placement::derive(w.size, rs);
    opts.placement.transport = transport;
    opts.placement.batch_invariant = batch_invariant;
    for (auto& s : opts.placement.stages) s.spec.max_batch = max_batch;
    std::shared_ptr<Transport> t = w.size == 1 ? make_inproc_world(1)[0]
                                   : transport == "nccl" ? make_nccl_transport(w.local_rank)
                                                         : make_mpi_transport();
    std::vector<Image> pipe_images(n);
    std::vector<double> lat;
    const RunStats st = run_pipeline(opts, *t, reqs, [&](GeneratedImage&& g) {
      lat.push_back(g.latency_s);
      pipe_images[g.index] = std::move(g.image);
    });
    // per-stage busy time, summed over ranks
    double busy[3] = {}, total[3] = {};  // encode, denoise, decode
    for (size_t k = 0; k < 3 && k < st.busy_s.size(); ++k) busy[k] = st.busy_s[k];
    if (w.active) MPI_Reduce(busy, total, 3, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
    else std::memcpy(total, busy, sizeof(busy));
    t.reset();
    if (w.rank == 0) {
      size_t diff_values = 0, all_values = 0, identical = 0;
      int max_diff = 0;
      for (int i = 0; i < n; ++i) {
        const auto& a = seq_images[i].pixels;
        const auto& b = pipe_images[i].pixels;
        if (a.size() != b.size()) throw std::runtime_error("image size mismatch");
        identical += a == b;
        for (size_t k = 0; k < a.size(); ++k) {
          const int d = std::abs(int(a[k]) - int(b[k]));
          max_diff = std::max(max_diff, d);
          diff_values += d > 1;
        }
        all_values += a.size();
      }
      const double within = 1.0 - double(diff_values) / all_values;
      std::printf("check: %zu/%d images byte-identical to the sequential run; max |diff| %d; within +-1: %.5f\n",
                  identical, n, max_diff, within);
      if (within < 0.999) {
        std::fprintf(stderr, "bench_pipeline: pipeline output deviates from the sequential run\n");
        mpi::abort(1);
      }
      std::sort(lat.begin(), lat.end());
      const double seq_tp = n / seq_s, pipe_tp = n / st.wall_s;
      std::printf("model %s, %d requests x %d steps (ddim, guidance 7.5), %s %s, %d rank(s), max_batch %d, "
                  "batch-invariant %s\n", model_dir.c_str(), n, steps, device.c_str(), dtype.c_str(), w.size, max_batch,
                  batch_invariant && device != "cuda" ? "on" : "off");
      std::printf("sequential (1 process, batch 1, no overlap): %.3f s, %.3f images/s\n", seq_s, seq_tp);
      std::printf("pipeline   (%s): %.3f s, %.3f images/s, latency p50 %.3f s p95 %.3f s\n",
                  w.size == 1 ? "stages on threads" : "stages on ranks", st.wall_s, pipe_tp, lat[lat.size() / 2],
                  lat[std::min(lat.size() - 1, lat.size() * 95 / 100)]);
      std::printf("ratio pipeline/sequential throughput: %.2fx\n", pipe_tp / seq_tp);
      std::printf("stage busy fraction of wall time (summed over replicas): encode %.2f, denoise %.2f, decode %.2f\n",
                  total[0] / st.wall_s, total[1] / st.wall_s, total[2] / st.wall_s);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_pipeline: %s\n", e.what());
    mpi::abort(1);
  }
  mpi::finalize();
  return 0;
}
