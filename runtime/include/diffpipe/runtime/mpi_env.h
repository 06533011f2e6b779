// MPI start-up and shutdown for the whole process, and DP_MPI_CHECK. diffpipe initialises MPI only when the
// process was started by a launcher (mpirun sets OMPI_COMM_WORLD_SIZE / PMI variables); a plain run is one
// rank with no MPI at all. Call init() once on the main thread before any transport; finalize() at exit.
#pragma once
#include <string>

namespace diffpipe::mpi {

struct World {
  bool active = false;  // MPI initialised
  int rank = 0, size = 1;
  // This rank among the ranks sharing its node (MPI_Comm_split_type MPI_COMM_TYPE_SHARED: right under mpirun,
  // srun or any launcher), and how many share it: picks the GPU and divides the cores.
  int local_rank = 0, local_size = 1;
};

bool launched_by_mpirun();        // environment says so
int threads_per_rank();           // default CPU threads: the node's cores shared by its ranks (at least 1)
World init(int* argc, char*** argv);  // idempotent
const World& world();
void finalize();                  // no-op without MPI
[[noreturn]] void abort(int code);  // MPI_Abort when active, else std::exit
void barrier();

std::string error_string(int code);

}  // namespace diffpipe::mpi

#define DP_MPI_CHECK(call)                                                                          \
  do {                                                                                              \
    int _rc = (call);                                                                               \
    if (_rc != 0 /* MPI_SUCCESS */)                                                                 \
      throw ::diffpipe::Error(::diffpipe::detail::cat(__FILE__, ":", __LINE__, ": ", #call, " failed: ", \
                                                      ::diffpipe::mpi::error_string(_rc)));          \
  } while (0)
