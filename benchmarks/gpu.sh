#!/usr/bin/env bash
# The GPU benchmark, end to end, in one `device` call (or any CUDA machine without Ray installed).
#
#   bash benchmarks/gpu.sh [STAGE ...]        stages: tests inverse gram svd matrix growth solvers frontier (default: all)
#
# matrix overrides: MATRIX_SIZE, MATRIX_METHODS, MATRIX_EXECUTORS, PEER_METHODS, WORKERS, MATRIX_TIMEOUT,
# MATRIX_REPEATS (runs per cell, each after its own I/O floor; 1 by default: device time is short)
#
# Needs, in the repo root: .whl/ (pydantic and its deps as wheels; fusion-bench and mergekit with theirs
# for the peer comparisons) and, for Ray runs, .raybundle/ (built by ../shared/tools/ray-bundle); see
# README "Figures" for how to make both. Without fusion-bench the tests stage compares CUDA with the
# CPU path (which CI compares with FusionBench); without Ray the Ray runs are skipped.
# Everything it writes goes to $OUT (default /tmp/raymerge-gpu): test log, JSON and PNG per stage.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raymerge-gpu}
SITE=${TMPDIR:-/tmp}/raymerge-site
WORK=${RAYMERGE_BENCH_DIR:-${TMPDIR:-/tmp}/raymerge-bench}
mkdir -p "$OUT" "$SITE" "$WORK"
STAGES=${*:-tests inverse gram svd matrix growth solvers frontier}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

if [ ! -e "$SITE/.done" ]; then
  # one install for all: a second --target install would replace the first one's bin/ (console scripts)
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" \
    .whl/*.whl . || exit 1
  touch "$SITE/.done"
fi
if [ -e .raybundle/activate ]; then
  # shellcheck disable=SC1091
  source .raybundle/activate
fi
export PYTHONPATH=$SITE:${PYTHONPATH:-} PATH=$SITE/bin:$PATH
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower())" 2>/dev/null || echo cpu)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, raymerge.engine; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
rc=0
for stage in $STAGES; do
  echo "=== $stage ($(date +%T)) ==="
  case $stage in
    tests)  # every gpu-marked test: CUDA paths of ACTMat / WUDI / TSV-M / Iso against fp64 and FusionBench
      # without fusion-bench its comparisons skip; CUDA is then checked against the CPU path
      timeout "${TESTS_TIMEOUT:-600}" python3 -m pytest -m gpu -q -p no:cacheprovider -rfEs -o junit_logging=system-out \
        --junitxml "$OUT/gpu_tests_$GPU.xml" \
        tests/parity/test_gram.py tests/parity/test_spectral.py tests/parity/test_memory_model.py \
        tests/parity/test_resident_inputs.py tests/unit/test_gram_inverse.py tests/unit/test_dare_masks.py 2>&1 | tail -40 || rc=1 ;;
    inverse) # ACTMat's solve: certified Cholesky against fp64 eigh at the 7B / 70B input widths
      timeout "${INVERSE_TIMEOUT:-120}" python3 -m benchmarks.cuda_solvers --only-inverse --eigh "${INVERSE_SIZES:-4096,11008,28672}" \
        --out "$OUT/cuda_inverse_$GPU.json" 2>&1 | tail -8 || rc=1 ;;
    gram)   # ACTMat / WUDI solvers on the 32 layers of Llama-2-7B, 8 experts, versus FusionBench's wudi_merging
      python3 -m benchmarks.gram_methods --block llama7b --device cuda --experts 8 \
        --out "$OUT/gram_methods_llama7b_$GPU.json" 2>&1 | tail -25 || rc=1 ;;
    svd)    # spectral merges on one Llama-2-7B layer: exact SVDs against the eigh-of-Gram path
      python3 -m benchmarks.svd_paths --block llama7b --device cuda \
        --out "$OUT/svd_paths_llama7b_$GPU.json" 2>&1 | tail -12 || rc=1 ;;
    matrix) # every method × {local, Ray (GPU actor pool for Gram/spectral)} with mergekit / FusionBench alongside
      timeout "${MATRIX_TIMEOUT:-3000}" python3 -m benchmarks.throughput --size "${MATRIX_SIZE:-7b:2}" --experts 3 \
        --methods "${MATRIX_METHODS:-task_arithmetic,ties,dare_ties,actmat,wudi,tsv_m,iso_c}" \
        --executors "${MATRIX_EXECUTORS:-local,ray}" --peer-methods "${PEER_METHODS:-task_arithmetic,ties,dare_ties,tsv_m,iso_c}" \
        --workers "${WORKERS-1,4,16}" --growth "" --memory-budget 24GiB --workdir "$WORK" --repeats "${MATRIX_REPEATS:-1}" \
        --results-dir "$OUT" --stem "throughput_$(echo ${MATRIX_SIZE:-7b:2} | tr : -)L_$GPU" 2>&1 | grep -v '^\$ ' | tail -40 || rc=1 ;;
    growth) # TIES peak memory from tiny to a 70B layer subset, same budget: must stay flat
      python3 -m benchmarks.throughput --size tiny --methods "" --workers "" --peers none \
        --growth "${GROWTH:-tiny,1b,7b:2,70b:1}" --clean-growth --memory-budget 8GiB --workdir "$WORK" \
        --results-dir "$OUT" --stem "growth_$GPU" 2>&1 | tail -8 || rc=1 ;;
    solvers) # the dense solves alone: fp64 eigh at the down_proj widths, SVD drivers, TSV-M's Gram fallbacks
      timeout "${SOLVERS_TIMEOUT:-600}" python3 -m benchmarks.cuda_solvers --out "$OUT/cuda_solvers_$GPU.json" 2>&1 | tail -30 || rc=1 ;;
    frontier) # issue 12's figures: ACTMat, WUDI (spectral) and TSV-M with 8 experts, local executor on CUDA,
      # on layer subsets of the 7B and 70B shapes (9 full 7B checkpoints would not fit a 64 GiB disk);
      # wall over the I/O floor of the same run, host and device peaks, declared figures alongside
      for spec in ${FRONTIER_SIZES:-7b:4 70b:1}; do
        timeout "${FRONTIER_TIMEOUT:-400}" python3 -m benchmarks.throughput --size "$spec" --vocab "${FRONTIER_VOCAB:-8192}" \
          --experts 8 --methods "${FRONTIER_METHODS:-actmat,wudi_spectral,tsv_m}" --executors local --peers none \
          --workers "" --growth "" --memory-budget 16GiB --workdir "$WORK" --results-dir "$OUT" --repeats "${FRONTIER_REPEATS:-1}" \
          --stem "frontier_$(echo "$spec" | tr : -)L_$GPU" 2>&1 | grep -v '^\$ ' | tail -12 || rc=1
        rm -rf "$WORK/$(echo "$spec" | tr : -)L"
      done ;;
  esac
done
exit $rc
