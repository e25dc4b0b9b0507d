# Sourced by the scripts that build the CUDA kernels (.ci/build_cuda_extension.sh,
# tools/build_cuda_wheel.sh, benchmarks/gpu_check.sh).

# Sets and exports CUDA_HOME: the root of the CUDA toolkit that the nvcc on PATH belongs to.
cuda_home_from_nvcc() {
  local top
  # Ask nvcc for its toolkit root: the nvcc on PATH may be a wrapper script or a link.
  top="$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)"
  [[ -n "$top" ]] || top="$(dirname "$(readlink -f "$(command -v nvcc)")")/.."
  CUDA_HOME="$(cd "$top" && pwd -P)"
  export CUDA_HOME
}
