#!/usr/bin/env bash
# On the GPU machine (no Rust toolchain, no network): find CUDA's libraries, show the machine,
# run scripts/gpu-check on the GPU, everything into $OUT.
#
#   OUT=/some/dir scripts/gpu/run-on-device.sh [WORKER] [more scripts/gpu-check flags]
#
# DEVICE (default cuda) is passed to --device and PYTHON (default python3) runs the check;
# DEVICE=cpu PYTHON=<venv>/bin/python rehearses this script on a CPU machine.
# WORKER defaults to .gpu/latentserve-worker (a release build with --features cuda, stripped,
# copied there on the CPU machine). Exit status: scripts/gpu-check's.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
worker=${1:-.gpu/latentserve-worker}
[ $# -gt 0 ] && shift
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"

# NVRTC and cuBLAS(Lt): the dynamic linker's cache, the CUDA toolkit, PyTorch's bundled copies.
# PyTorch ships only versioned names (libnvrtc.so.13), so unversioned links go into a shim folder.
shim=$(mktemp -d /tmp/cuda-lib-links.XXXX)
dirs=()
while read -r lib; do
  [ -e "$lib" ] || continue
  dirs+=("$(dirname "$lib")")
  base=$(basename "$lib")
  plain=${base%%.so*}.so
  [ -e "$shim/$plain" ] || ln -s "$lib" "$shim/$plain"
done < <(
  { ldconfig -p 2>/dev/null | awk '/lib(nvrtc|cublas|cublasLt|cuda)\.so/ {print $NF}'
    site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
    timeout 30 find /usr/local/cuda* /usr/local/nvidia $(for s in $site; do echo "$s/nvidia"; done) \
      -maxdepth 4 \( -name 'libnvrtc.so*' -o -name 'libcublas.so*' -o -name 'libcublasLt.so*' \
      -o -name 'libcuda.so*' \) 2>/dev/null; } | grep -v 'builtins' | sort -u)
ld_path=$(printf '%s\n' "$shim" "${dirs[@]}" | awk '!seen[$0]++' | paste -sd: -)
export LD_LIBRARY_PATH="$ld_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

{
  echo "== $(date -u +%FT%TZ) on $(hostname)"
  echo "== libraries found:"; ls -l "$shim"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "== nvidia-smi"; nvidia-smi || echo "nvidia-smi: not available"
  echo "== ldd --version"; ldd --version | head -1
  echo "== ldd $worker"; ldd "$worker" || true
  echo "== $worker --version"; "$worker" --version || true
} 2>&1 | tee "$out/device.txt"

"${PYTHON:-python3}" scripts/gpu-check --worker "$worker" --out "$out" --device "${DEVICE:-cuda}" "$@" 2>&1 | tee "$out/run.log"
