// Transport latency and bandwidth for embedding-, latent- and image-sized messages.
//   mpirun -np 2 bench_transport [--transport mpi|nccl] [--device cpu|cuda] [--iters N]
// With one rank it measures a rank sending to itself (the NCCL check on a one-GPU machine).
// Every size is first checked (payload received == payload sent), then timed as round trips.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>

#include "cli.h"
#include "diffpipe/runtime/mpi_env.h"
#include "diffpipe/runtime/transport.h"

using namespace diffpipe;

int main(int argc, char** argv) {
  mpi::init(&argc, &argv);
  std::string transport = "mpi", device = "cpu";
  int iters = 200;
  try {
    cli::Args a("bench_transport", "[mpirun -np 2] bench_transport [options]",
                {{"transport", "mpi|nccl", "transport (default mpi)"},
                 {"device", "cpu|cuda", "where the tensors live (default cpu)"},
                 {"iters", "N", "round trips per size (default 200)"}},
                argc - 1, argv + 1);
    if (a.help_requested()) {
      if (mpi::world().rank == 0) std::fputs(a.help_text().c_str(), stdout);
      mpi::finalize();
      return 0;
    }
    transport = a.str("transport", transport);
    device = a.str("device", device);
    iters = static_cast<int>(a.integer("iters", iters));
    std::shared_ptr<Transport> t;
    if (!mpi::world().active) t = make_inproc_world(1)[0];
    else if (transport == "nccl") t = make_nccl_transport(mpi::world().local_rank);
    else t = make_mpi_transport();
    const int ngpu = device == "cuda" ? std::max<int>(1, at::detail::getCUDAHooks().getNumGPUs()) : 1;
    const at::Device dev = device == "cuda" ? at::Device(at::kCUDA, mpi::world().local_rank % ngpu) : at::Device(at::kCPU);
    const int me = t->rank(), peer = t->size() > 1 ? 1 - me : me;
    if (me > 1) {
      mpi::barrier();
      return 0;
    }
    struct Case {
      const char* name;
      std::vector<int64_t> shape;
      at::ScalarType dtype;
    };
    const Case cases[] = {
        {"embedding SD1 [2,77,768] f32", {2, 77, 768}, at::kFloat},
        {"embedding SD1 [2,77,768] f16", {2, 77, 768}, at::kHalf},
        {"latent 512px [4,64,64] f32", {4, 64, 64}, at::kFloat},
        {"latent 1024px [4,128,128] f32", {4, 128, 128}, at::kFloat},
        {"image 512px [512,512,3] u8", {512, 512, 3}, at::kByte},
        {"batch of 8 latents [8,4,64,64] f32", {8, 4, 64, 64}, at::kFloat},
    };
    if (me == 0)
      std::printf("transport %s (%s), %d rank(s), %d round trips per size\n%-38s %12s %12s %12s\n", t->name().c_str(),
                  device.c_str(), t->size(), iters, "message", "bytes", "latency_us", "GB/s");
    for (const auto& c : cases) {
      at::Tensor x = at::randn(c.shape).mul(50).to(c.dtype).to(dev);
      const double bytes = x.numel() * x.element_size();
      auto roundtrip = [&]() -> at::Tensor {
        Message m;
        m.tensors = {x};
        if (me == 0) {
          t->send(peer, m);
          auto r = t->recv(std::chrono::seconds(30));
          if (!r) throw std::runtime_error("timeout");
          if (peer == me) return r->tensors[0];  // self: one hop is the round trip
          return r->tensors[0];
        }
        auto r = t->recv(std::chrono::seconds(30));
        if (!r) throw std::runtime_error("timeout");
        t->send(peer, *r);
        return r->tensors[0];
      };
      // check first
      at::Tensor back = roundtrip();
      if (me == 0 && !at::equal(back.cpu(), x.cpu())) {
        std::fprintf(stderr, "bench_transport: payload mismatch for %s\n", c.name);
        mpi::abort(1);
      }
      for (int i = 0; i < 5; ++i) roundtrip();
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) roundtrip();
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double hops = peer == me ? 1.0 : 2.0;
      if (me == 0)
        std::printf("%-38s %12.0f %12.1f %12.3f\n", c.name, bytes, dt / iters / hops * 1e6, bytes * hops * iters / dt / 1e9);
    }
    t->flush(std::chrono::seconds(10));
    t.reset();
    mpi::barrier();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_transport: %s\n", e.what());
    mpi::abort(1);
  }
  mpi::finalize();
  return 0;
}
