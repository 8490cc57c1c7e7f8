#!/usr/bin/env bash
# MPI against the in-process pipeline: the same `sgr train` (W=2 workers, one thread each) as
# two threads in one process and as `mpirun -np 2` ranks on this host, alternated REPEATS
# times; prints each run's training throughput (metrics.jsonl's images_per_second: training
# time only, evaluation excluded), the medians and the MPI overhead. Needs a build with
# `--features mpi` (target/release/sgr) and MNIST in data/.
# Usage: bash bench/mpi-overhead.sh [REPEATS] [STEPS]   (defaults 3 and 30); extra mpirun
# options in MPIRUN_FLAGS (e.g. "--bind-to none --mca mpi_yield_when_idle 1").
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${1:-3}
STEPS=${2:-30}
S=target/release/sgr
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
RUNS=$(mktemp -d)
trap 'rm -rf "$RUNS"' EXIT
ARGS=(train --data mnist --model resnet32 --rule dgl --modules 2 --workers 2 --batch-size 128
  --max-steps-per-epoch "$STEPS" --epochs 1 --test-subset 256 --threads 1 --diag-every 0 --quiet)
rate() { python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["images_per_second"])' "$1/metrics.jsonl"; }
threads=(); ranks=()
for i in $(seq "$REPEATS"); do
  $S "${ARGS[@]}" --out "$RUNS/threads-$i" >/dev/null
  # shellcheck disable=SC2086
  mpirun -np 2 ${MPIRUN_FLAGS:-} $S "${ARGS[@]}" --distributed mpi --out "$RUNS/ranks-$i" >/dev/null
  t=$(rate "$RUNS/threads-$i"); r=$(rate "$RUNS/ranks-$i")
  threads+=("$t"); ranks+=("$r")
  printf 'repeat %d: threads %.1f img/s, mpi ranks %.1f img/s\n' "$i" "$t" "$r"
done
python3 - "${threads[*]}" "${ranks[*]}" <<'PY'
import statistics, sys
t = statistics.median(map(float, sys.argv[1].split()))
r = statistics.median(map(float, sys.argv[2].split()))
print(f"median: threads {t:.1f} img/s, mpi ranks {r:.1f} img/s, MPI overhead {100 * (t / r - 1):+.1f}% of step time")
PY
