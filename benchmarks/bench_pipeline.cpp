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

#include "diffpipe/cluster/pipeline_runner.h"
#include "diffpipe/runtime/mpi_env.h"
#include "diffpipe/stages/stages.h"

using namespace diffpipe;
using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  mpi::init(&argc, &argv);
  std::string model_dir, device = "cpu", dtype = "float32", transport = "mpi";
  int n = 16, steps = 20, max_batch = 8, size = 0;
  bool batch_invariant = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--model") model_dir = v;
    else if (k == "--requests") n = std::stoi(v);
    else if (k == "--steps") steps = std::stoi(v);
    else if (k == "--device") device = v;
    else if (k == "--dtype") dtype = v;
    else if (k == "--max-batch") max_batch = std::stoi(v);
    else if (k == "--transport") transport = v;
    else if (k == "--size") size = std::stoi(v);
    else if (k == "--batch-invariant") batch_invariant = v != "0";
  }
  const auto& w = mpi::world();
  try {
    if (model_dir.empty()) throw std::runtime_error("--model DIR is required");
    const char* ls = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
    const int local = ls ? std::max(1, std::atoi(ls)) : 1;
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
      const auto t0 = Clock::now();
      for (int i = 0; i < n; ++i) seq_images[i] = run_one(reqs[i]);
      seq_s = std::chrono::duration<double>(Clock::now() - t0).count();
    }
    mpi::barrier();
    at::set_num_threads(threads);
    RunOptions opts;
    opts.model_dir = model_dir;
    opts.placement = Placement::derive(w.size, rs);
    opts.placement.transport = transport;
    opts.placement.batch_invariant = batch_invariant;
    for (auto& s : opts.placement.stages) s.max_batch = max_batch;
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
    double busy[kNumStages], total[kNumStages];
    for (int k = 0; k < kNumStages; ++k) busy[k] = st.busy_s[k];
    if (w.active) MPI_Reduce(busy, total, kNumStages, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
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
