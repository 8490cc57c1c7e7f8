#!/usr/bin/env bash
# The CUDA checks, run on a GPU machine that has torch 2.11 in `python3` but no Rust toolchain.
# Build here with `cargo build --release --features cuda --target-dir target-cuda`, copy the
# binary to gpu/sgr and data/fashion-mnist to gpu/data/, then run this from the repo root there.
# Results go to $OUT (default: gpu/out). Cheap checks first: each worker process of `bench`
# pays CUDA start-up, so the PyTorch comparison (18 processes per repeat) comes last and needs
# about 3 minutes per repeat on an H200 machine. WITH_EPOCHS=1 adds two 1-epoch trainings.
set -u
OUT=${OUT:-gpu/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
S=./gpu/sgr
RUNS=$(mktemp -d)
log() { echo "== $*"; }

log machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
nproc

log "1. same 20 steps on CPU and CUDA from the same initial weights (sgr K=4, F-MNIST)"
for dev in cpu cuda; do
  timeout 60 $S train --data fashion-mnist --data-dir gpu/data --model resnet20 --rule sgr --modules 4 \
    --epochs 1 --train-subset 2560 --test-subset 1000 --max-steps-per-epoch 20 --device $dev \
    --out "$RUNS/same-$dev" --quiet
  echo "rc=$?"; tail -n 1 "$RUNS/same-$dev/metrics.jsonl"
done

log "1b. the same 20 steps with --sgr-grad jvp on CUDA (equal to check 1's to rounding)"
timeout 60 $S train --data fashion-mnist --data-dir gpu/data --model resnet20 --rule sgr --modules 4 \
  --epochs 1 --train-subset 2560 --test-subset 1000 --max-steps-per-epoch 20 --device cuda \
  --sgr-grad jvp --out "$RUNS/same-jvp-cuda" --quiet
echo "rc=$?"; tail -n 1 "$RUNS/same-jvp-cuda/metrics.jsonl"

log "1c. vit-tiny on CUDA: 20 AdamW steps of sgr K=3 (exact double backward through attention), then step time and GPU memory, batch 128 at 32x32"
timeout 90 $S train --data fashion-mnist --data-dir gpu/data --model vit-tiny --optimizer adamw --lr 5e-4 \
  --weight-decay 0.05 --aux-head linear --rule sgr --modules 3 --epochs 1 --train-subset 2560 \
  --test-subset 1000 --max-steps-per-epoch 20 --device cuda --out "$RUNS/vit-tiny-cuda" --quiet
echo "rc=$?"; tail -n 1 "$RUNS/vit-tiny-cuda/metrics.jsonl"
timeout 120 $S bench step --device cuda --model vit-tiny --aux-head linear --batch-size 128 --modules 2,4,12 \
  --rule dgl,sgr --steps 10 --warmup 3 --json > "$OUT/step-vit-tiny-cuda.json"
echo "rc=$?"; cat "$OUT/step-vit-tiny-cuda.json"

log "1d. mixed precision on CUDA: one step of dgl, sgr exact and sgr jvp at bf16 and fp16 (autocast; fp16 loss-scaled) against fp32, same weights and batch (CPU reference: README, Mixed precision)"
timeout 120 $S bench precision --device cuda --model resnet20 --batch-size 64 --channels 3 --size 32 \
  --modules 4 --json > "$OUT/precision-cuda.json"
echo "rc=$?"; cat "$OUT/precision-cuda.json"
for p in bf16 fp16; do
  for grad in exact jvp; do
    timeout 60 $S train --data fashion-mnist --data-dir gpu/data --model resnet20 --rule sgr --modules 4 \
      --epochs 1 --train-subset 2560 --test-subset 1000 --max-steps-per-epoch 20 --device cuda \
      --precision $p --sgr-grad $grad --channels-last --out "$RUNS/amp-$p-$grad" --quiet
    echo "rc=$? $p $grad (compare with check 1's cuda line)"; tail -n 1 "$RUNS/amp-$p-$grad/metrics.jsonl"
  done
done
timeout 120 $S bench step --device cuda --model resnet32 --batch-size 128 --modules 4 --rule dgl,sgr \
  --precision bf16 --channels-last --steps 20 --warmup 5 --json > "$OUT/step-cuda-bf16-cl.json"
echo "rc=$?"; cat "$OUT/step-cuda-bf16-cl.json"

log "1e. module pipeline on one GPU: 2 workers (cuda:0,cuda:0) against 1 for 20 sgr steps (same metrics up to GPU rounding), then pipeline throughput. tch exposes no CUDA stream API, so both stages use the default stream: they overlap host-side work (launches, Python-free bookkeeping) but not kernels"
for w in 1 2; do
  timeout 90 $S train --data fashion-mnist --data-dir gpu/data --model resnet20 --rule sgr --modules 4 \
    --epochs 1 --train-subset 2560 --test-subset 1000 --max-steps-per-epoch 20 --device cuda \
    --workers $w --devices $( [ $w = 1 ] && echo cuda:0 || echo cuda:0,cuda:0 ) --out "$RUNS/pipe-w$w" --quiet
  echo "rc=$? W=$w"; tail -n 1 "$RUNS/pipe-w$w/metrics.jsonl"
done
timeout 120 $S bench pipeline --device cuda --model resnet32 --batch-size 128 --modules 2,4 --rule dgl,sgr \
  --split balanced-memory --steps 20 --warmup 3 --json > "$OUT/pipeline-cuda.json"
echo "rc=$?"; cat "$OUT/pipeline-cuda.json"

log "2. step time and GPU memory per rule and K"
timeout 120 $S bench step --device cuda --model resnet32 --batch-size 128 --modules 4,8,16 \
  --rule dgl,sgr --steps 20 --warmup 5 --repeats 2 --json > "$OUT/step-cuda.json"
echo "rc=$?"; cat "$OUT/step-cuda.json"
for grad in jvp fd; do
  timeout 120 $S bench step --device cuda --model resnet32 --batch-size 128 --modules 4,8,16 \
    --rule sgr --sgr-grad $grad --steps 20 --warmup 5 --repeats 2 --json > "$OUT/step-cuda-$grad.json"
  echo "rc=$? $grad"; cat "$OUT/step-cuda-$grad.json"
done

log "3. where the reference's time goes (torch.profiler, 5 steps)"
for cell in "bp 1" "dgl 4" "sgr 4"; do
  set -- $cell
  timeout 60 python3 bench/reference/sgr_ref.py bench --device cuda --model resnet32 --batch-size 128 \
    --rule $1 --modules $2 --steps 10 --warmup 5 --threads 16 --profile "$OUT/profile-$1-$2.txt" > /dev/null
  echo "rc=$? $1 K=$2"; head -n 1 "$OUT/profile-$1-$2.txt"
done

log "4. PyTorch vs sgr on CUDA (progress lines on stderr as cells finish)"
timeout 420 $S bench compare --device cuda --python python3 --reference bench/reference/sgr_ref.py \
  --model resnet32 --batch-size 128 --modules 1,4,16 --rule bp,dgl,sgr \
  --steps 20 --warmup 5 --repeats 2 --json > "$OUT/compare-cuda.json"
echo "rc=$?"; cat "$OUT/compare-cuda.json"

[ -z "${WITH_EPOCHS:-}" ] && exit 0
log "5. one epoch of full F-MNIST on CUDA"
timeout 90 $S train --data fashion-mnist --data-dir gpu/data --model resnet32 --rule sgr --modules 8 \
  --epochs 1 --device cuda --out "$RUNS/sgr-k8" --quiet
echo "rc=$?"; tail -n 1 "$RUNS/sgr-k8/metrics.jsonl"
timeout 60 $S train --data fashion-mnist --data-dir gpu/data --model resnet32 --rule bp \
  --epochs 1 --device cuda --out "$RUNS/bp" --quiet
echo "rc=$?"; tail -n 1 "$RUNS/bp/metrics.jsonl"
