#!/usr/bin/env bash
# GPU check of the public-weights path (README "Weights"): full-size-architecture priors made with make-prior's
# code path and the recommended conventions, then one `bench pipeline --device cuda --full-size` geometry +
# texture iteration. No internet needed. Results go to $OUT (or the first argument). Run from anywhere:
#   OUT=/some/dir bash tests/tools/gpu_check_weights.sh            # on a CUDA machine (< 5 min on an H200)
#   bash tests/tools/gpu_check_weights.sh /tmp/out --dry-run       # tiny models on a CPU, to try the script
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-${1:-gpu_out}}"
[ $# -gt 0 ] && [ "$1" != "--dry-run" ] && shift
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python}"
mkdir -p "$out"
timeout 290 "$python" tests/tools/gpu_check_weights.py "$out" "$@" 2>&1 | tee "$out/gpu_check_weights.log"
