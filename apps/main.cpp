// diffpipe: text-to-image pipelines across ranks. `diffpipe <command> --help` for each command.
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>

#include "commands.h"
#include "diffpipe/runtime/cpu_allocator.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/log.h"
#include "diffpipe/runtime/message.h"

#include "diffpipe/runtime/mpi_env.h"

namespace {
int g_rank = 0;
// SIGTERM / SIGINT: say so (rank 0 only, async-signal-safe write) and exit 128 + signal. Finished images are
// already on disk (written via a temporary name and renamed) with their JSON lines flushed; no graceful
// drain of in-flight requests yet.
extern "C" void on_stop_signal(int sig) {
  if (g_rank == 0) {
    const char* msg = sig == SIGINT ? "\ndiffpipe: interrupted (SIGINT); unfinished images are not written\n"
                                    : "\ndiffpipe: terminated (SIGTERM); unfinished images are not written\n";
    ssize_t n = ::write(2, msg, std::strlen(msg));
    (void)n;
  }
  ::_exit(128 + sig);
}

void usage() {
  std::fprintf(stderr,
               "usage: diffpipe [--debug] <command> [options]   (--debug: C++ backtraces in errors)\n"
               "commands:\n"
               "  generate   text -> images, on one process or across ranks started by mpirun\n"
               "  init-model write a randomly initialised tiny model (diffusers layout)\n"
               "  data       write the synthetic shapes dataset (PNGs + captions)\n"
               "  train      train diffpipe's own model, one module at a time\n"
               "  eval       score images: fidelity, CLIP score, FID (image tower or Inception-v3)\n"
               "  serve      an OpenAI-compatible images API over HTTP in front of the pipeline\n"
               "  bench      throughput and latency of the same work through several placements\n"
               "  profile    each stage's seconds per call by batch size on this device (a cost profile)\n"
               "  plan       the placement for a cluster of any size, from a cost profile (simulated)\n"
               "run 'diffpipe <command> --help' for its options; 'diffpipe --version' for the version\n");
}
}  // namespace

int main(int argc, char** argv) {
  using namespace diffpipe;
  if (argc >= 2 && !std::strcmp(argv[1], "--debug")) {  // full LibTorch backtraces in error messages
    set_debug(true);
    argv[1] = argv[0];
    ++argv;
    --argc;
  }
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    usage();
    return argc < 2 ? 2 : 0;
  }
  if (!std::strcmp(argv[1], "--version")) {
    std::printf("diffpipe %s (wire format %d)\n", DIFFPIPE_VERSION, static_cast<int>(diffpipe::kWireVersion));
    return 0;
  }
  const std::string cmd = argv[1];
  int rc = 0;
  try {
    const auto w = mpi::init(&argc, &argv);
    cpu_allocator::install();  // reuse large CPU blocks between steps (see cpu_allocator.h)
    if (w.size > 1) set_log_rank(w.rank);
    g_rank = w.rank;
    std::signal(SIGTERM, on_stop_signal);
    std::signal(SIGINT, on_stop_signal);
    if (cmd == "generate") {
      rc = apps::generate_main(argc - 2, argv + 2);
    } else if (cmd == "data") {
      rc = apps::data_main(argc - 2, argv + 2);
    } else if (cmd == "train") {
      rc = apps::train_main(argc - 2, argv + 2);
    } else if (cmd == "eval") {
      rc = apps::eval_main(argc - 2, argv + 2);
    } else if (cmd == "serve") {
      rc = apps::serve_main(argc - 2, argv + 2);
    } else if (cmd == "bench") {
      rc = apps::bench_main(argc - 2, argv + 2);
    } else if (cmd == "profile") {
      rc = apps::profile_main(argc - 2, argv + 2);
    } else if (cmd == "plan") {
      rc = apps::plan_main(argc - 2, argv + 2);
    } else if (cmd == "init-model") {
      rc = apps::init_model_main(argc - 2, argv + 2);
    } else {
      std::fprintf(stderr, "diffpipe: unknown command '%s'\n", cmd.c_str());
      usage();
      rc = 2;
    }
  } catch (const AgreedError& e) {  // every rank has it: one message, clean exit code 1 everywhere
    if (mpi::world().rank == 0) std::fprintf(stderr, "diffpipe: error: %s\n", e.what());
    mpi::finalize();
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "diffpipe: error: %s\n", describe(e).c_str());
    std::fflush(stderr);
    if (mpi::world().active && mpi::world().size > 1) mpi::abort(1);  // bring every rank down
    mpi::finalize();
    return 1;
  }
  mpi::finalize();
  return rc;
}
