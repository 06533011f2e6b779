#include "diffpipe/runtime/mpi_env.h"

#include <mpi.h>

#include <algorithm>
#include <cstdlib>
#include <thread>
#include <mutex>

#include "diffpipe/runtime/error.h"

namespace diffpipe::mpi {

namespace {
World g_world;
bool g_inited = false;
}  // namespace

bool launched_by_mpirun() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") || std::getenv("PMIX_RANK");
}

std::string error_string(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(buf, len);
}

World init(int* argc, char*** argv) {
  if (g_inited) return g_world;
  g_inited = true;
  if (!launched_by_mpirun()) return g_world;
  int provided = 0;
  DP_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
  DP_CHECK(provided >= MPI_THREAD_SERIALIZED, "MPI provides thread level ", provided,
           " but diffpipe needs at least MPI_THREAD_SERIALIZED");
  g_world.active = true;
  MPI_Comm_rank(MPI_COMM_WORLD, &g_world.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_world.size);
  MPI_Comm node = MPI_COMM_NULL;
  DP_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g_world.rank, MPI_INFO_NULL, &node));
  MPI_Comm_rank(node, &g_world.local_rank);
  MPI_Comm_size(node, &g_world.local_size);
  MPI_Comm_free(&node);
  return g_world;
}

const World& world() { return g_world; }

int threads_per_rank() {
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / std::max(1, g_world.local_size));
}

void finalize() {
  if (g_world.active) {
    MPI_Finalize();
    g_world.active = false;
  }
}

void abort(int code) {
  if (g_world.active) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

void barrier() {
  if (g_world.active) DP_MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));
}

}  // namespace diffpipe::mpi
