#!/usr/bin/env bash
# The SGR study on a GPU machine, as one command, sized for about 8 minutes of an H200: the
# confirmation grid presets/study-resnet-confirm.toml (ResNet-32, K = 8 and 16, dgl against
# the MLP study's surviving SGR setting, 3 seeds) as `sgr sweep --jobs 8`, eight `sgr train`
# processes sharing the GPU (a ResNet-32 step at batch 128 is launch-bound, so processes
# multiply throughput), then `sgr report`. The preset reads data/ (linked to gpu/data here).
#
# Prepare as for bench/gpu-check.sh: build here with
#   cargo build --release --features cuda --target-dir target-cuda
# copy the binary to gpu/sgr and data/fashion-mnist to gpu/data/, then run this from the repo
# root there. The sweep resumes: run the script again to continue where the time limit
# stopped it (STUDY_SECONDS, default 480). Results: $OUT (default gpu/out).
set -u
OUT=${OUT:-gpu/out}
JOBS=${JOBS:-8}
mkdir -p "$OUT"
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
S=./gpu/sgr
[ -e data/fashion-mnist ] || { mkdir -p data && ln -s ../gpu/data/fashion-mnist data/fashion-mnist; }
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nproc
echo "== sweep (jobs $JOBS, limit ${STUDY_SECONDS:-480} s)"
timeout "${STUDY_SECONDS:-480}" $S sweep --preset presets/study-resnet-confirm.toml --jobs "$JOBS" \
  --out "$OUT/study-resnet-confirm"
echo "rc=$? (124: the time limit stopped it; run again to resume)"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
echo "== report"
$S report "$OUT/study-resnet-confirm" --out "$OUT/study-resnet-confirm/report"
echo "rc=$?"
sed -n '1,80p' "$OUT/study-resnet-confirm/report/report.md"
