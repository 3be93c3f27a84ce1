# Writes the build-info header with the current git commit; run at every build (target
# ef_build_info) so the stamp follows the checkout without a re-configure. configure_file leaves
# the header untouched when nothing changed, so nothing recompiles then.
#   cmake -DSRC_DIR=... -DTEMPLATE=... -DOUT=... -DPROJECT_VERSION=... -DCMAKE_BUILD_TYPE=...
#         -DCMAKE_CXX_COMPILER_ID=... -DCMAKE_CXX_COMPILER_VERSION=... -DGIT=... -P build_info.cmake
set(EF_GIT_SHA "unknown")
if(GIT)
  execute_process(COMMAND ${GIT} rev-parse --short=12 HEAD WORKING_DIRECTORY ${SRC_DIR}
                  OUTPUT_VARIABLE sha OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE rc)
  if(rc EQUAL 0 AND sha)
    set(EF_GIT_SHA "${sha}")
  endif()
endif()
configure_file(${TEMPLATE} ${OUT} @ONLY)
