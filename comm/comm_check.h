// MPI_CHECK / UCS_CHECK: turn a foreign library's return code into a Status that carries the
// statement, file:line and this process's rank. Use inside functions returning Status/StatusOr.
#pragma once

#include <mpi.h>
#include <ucs/type/status.h>

#include "runtime/core/status.h"

namespace ef::comm {

Status MpiError(const char* stmt, int code, const char* file, int line);
Status UcsError(const char* stmt, ucs_status_t code, const char* file, int line);

}  // namespace ef::comm

#define MPI_CHECK(stmt)                                                   \
  do {                                                                    \
    const int ef_mpi_rc_ = (stmt);                                        \
    if (ef_mpi_rc_ != MPI_SUCCESS) [[unlikely]]                           \
      return ::ef::comm::MpiError(#stmt, ef_mpi_rc_, __FILE__, __LINE__); \
  } while (0)

#define UCS_CHECK(stmt)                                                   \
  do {                                                                    \
    const ucs_status_t ef_ucs_rc_ = (stmt);                               \
    if (ef_ucs_rc_ != UCS_OK) [[unlikely]]                                \
      return ::ef::comm::UcsError(#stmt, ef_ucs_rc_, __FILE__, __LINE__); \
  } while (0)
