#!/usr/bin/env bash
# GPU figures for issue 4, in one call of the device tool (benchmarks/device/README.md says how it ran).
#
# 1. speed: benchmarks/bench_inference.py, every bundled model and the k-NN baseline, on the machine's CPU
#    (2 torch threads) and on its GPU, side by side in one run;
# 2. GPU scoring = CPU scoring: `medgru evaluate` of both bundled models with MEDGRU_DEVICE=cuda, on the
#    Kermany test split and a seeded 300-image slice of the brain test split (scores.csv is compared here,
#    on the CPU, with the same command run without a GPU);
# 3. `medgru train --device cuda`: the chest 7.0.0 command on the GPU (time, and its test AUROC once), less
#    `--cluster-pool unlabelled`: the 3,875 pneumonia images of the train split do not fit in the 64 MiB that
#    the tool carries. The pool only feeds the support-vector clustering that names anomaly types (it is
#    fitted after the encoder, the boundary and the threshold), so the score is the same recipe's.
#
# Reads .devdata/ (benchmarks/device/make_slice.py) and the wheels in .whl/ of the packages that the
# machine's image lacks; writes everything under /tmp/gpu_r and packs it, after each step, into one file,
# $OUT/gpu_figures.tgz (the tool brings back at most 8 files).
# 4. the GPU tests: python -m pytest -m cuda (tests/inference/test_cuda.py, tests/worker/test_cuda_worker.py;
#    deselected everywhere else);
# 5. (train-brain, not in the default) the brain 8.0.0 command on the GPU, less the unlabelled pool too, and
#    its evaluation on the test images that travelled (make_slice.py --sample 1000 --sample-splits test).
#
# 6. (batch, not in the default) benchmarks/batch_scoring.py for both bundled models on the GPU: grouped
#    score_batch against one sequence at a time, on the Kermany test split / the brain test images that
#    travelled and on 32 synthetic T = 8 sequences.
#
# STEPS (default "tests speed evaluate train") runs a subset, e.g. STEPS=speed for a rerun of the speed figures.
# CUDA_TESTS (default: both files) names the GPU test files the tests step runs.
set -u
STEPS=${STEPS:-tests speed evaluate train}
want() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 MEDGRU_DATA_ROOT=$PWD/.devdata MEDGRU_HOME=/tmp/medgru-home
R=/tmp/gpu_r
mkdir -p "$R" "$MEDGRU_HOME"
pack() { tar czf "$OUT/gpu_figures.tgz" -C /tmp gpu_r; }
step() { pack; echo "== $(date -u +%H:%M:%S) $*" | tee -a "$R/steps.log"; }  # packs what is there so far
trap pack EXIT

step install
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$R/pip.log" 2>&1 || { cat "$R/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
  nproc; grep -m1 'model name' /proc/cpuinfo; } > "$R/machine.txt" 2>&1
cat "$R/machine.txt"

if want tests; then
step tests
timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda ${CUDA_TESTS:-tests/inference/test_cuda.py tests/worker/test_cuda_worker.py} \
  > "$R/tests-cuda.log" 2>&1
echo "rc=$?" >> "$R/tests-cuda.log"
tail -8 "$R/tests-cuda.log"
fi

if want speed; then
step speed  # with the allocator setting that deploy/*.service gives the service (README: "Speed")
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295 \
  timeout 130 python3 benchmarks/bench_inference.py --no-eager --repeats 21 \
  --note "device tool: one H200 and 2 threads of the CPU of its machine, same run" \
  --out "$R/inference_speed-h200.json" > "$R/speed.log" 2>&1; echo "rc=$?" >> "$R/speed.log"
tail -12 "$R/speed.log"
fi

if want evaluate; then
step evaluate-cuda
for m in chest-cxr:kermany_cxr brain-mr:brain_mri; do
  MEDGRU_DEVICE=cuda timeout 80 python3 -m medgru.cli evaluate --manifest ".devdata/${m#*:}/manifest.csv" \
    --model "inference/bundled/${m%%:*}" --out "$R/eval-${m%%:*}-cuda" --workers 8 --gallery 2 --bootstrap 200 \
    > "$R/eval-${m%%:*}-cuda.log" 2>&1; echo "rc=$?" >> "$R/eval-${m%%:*}-cuda.log"
  tail -3 "$R/eval-${m%%:*}-cuda.log"
done
fi

if want batch; then
step batch
for m in chest-cxr:kermany_cxr brain-mr:brain_mri; do
  timeout 120 python3 benchmarks/batch_scoring.py --model "inference/bundled/${m%%:*}" \
    --manifest ".devdata/${m#*:}/manifest.csv" --device cuda --out "$R/batch_scoring-${m%%:*}-cuda.json" \
    > "$R/batch-${m%%:*}.log" 2>&1; echo "rc=$?" >> "$R/batch-${m%%:*}.log"
  tail -4 "$R/batch-${m%%:*}.log"
done
fi

if want train; then
step train-cuda
timeout 210 python3 -m medgru.cli train --manifest .devdata/kermany_cxr/manifest.csv \
  --out /tmp/chest-gpu --name medgru-svc-chest-cxr-gpu --version 7.0.0-cuda --modalities CR,DX --body-parts CHEST \
  --loss reconstruct --reducer-init pca --hidden-channels 128 --reduce-channels 256 --epochs 30 \
  --hpo-objective consistent-volume --whiten --nu-max 0.2 --hpo-trials 30 \
  --reframe-copies 2 --threads 1 --device cuda --workers 12 > "$R/train-cuda.log" 2>&1
echo "rc=$?" >> "$R/train-cuda.log"
tail -25 "$R/train-cuda.log"
cp /tmp/chest-gpu/card.json /tmp/chest-gpu/training.json /tmp/chest-gpu/meta.json "$R/" 2>/dev/null

step evaluate-trained
if [ -f /tmp/chest-gpu/card.json ]; then
  MEDGRU_DEVICE=cuda timeout 50 python3 -m medgru.cli evaluate --manifest .devdata/kermany_cxr/manifest.csv \
    --model /tmp/chest-gpu --out "$R/eval-chest-gpu-trained" --workers 8 --gallery 2 --bootstrap 200 \
    > "$R/eval-chest-gpu-trained.log" 2>&1; echo "rc=$?" >> "$R/eval-chest-gpu-trained.log"
  tail -3 "$R/eval-chest-gpu-trained.log"
fi
fi
if want train-brain; then
step train-brain-cuda
timeout 240 python3 -m medgru.cli train --manifest .devdata/brain_mri/manifest.csv \
  --out /tmp/brain-gpu --name medgru-svc-brain-mr-gpu --version 8.0.0-cuda --modalities MR --body-parts BRAIN,HEAD \
  --loss reconstruct --reducer-init pca --hidden-channels 128 --reduce-channels 256 --epochs 30 \
  --hpo-objective heldout-likelihood --whiten --nu-max 0.2 --hpo-trials 30 --skip reduced \
  --threads 2 --device cuda --workers 12 > "$R/train-brain-cuda.log" 2>&1
echo "rc=$?" >> "$R/train-brain-cuda.log"
tail -8 "$R/train-brain-cuda.log"
mkdir -p "$R/brain-8.0.0-cuda"
cp /tmp/brain-gpu/card.json /tmp/brain-gpu/training.json /tmp/brain-gpu/meta.json "$R/brain-8.0.0-cuda/" 2>/dev/null
if [ -f /tmp/brain-gpu/card.json ]; then
  MEDGRU_DEVICE=cuda timeout 60 python3 -m medgru.cli evaluate --manifest .devdata/brain_mri/manifest.csv \
    --model /tmp/brain-gpu --out "$R/eval-brain-8.0.0-cuda-trained" --workers 8 --gallery 2 --bootstrap 200 \
    > "$R/eval-brain-gpu-trained.log" 2>&1; echo "rc=$?" >> "$R/eval-brain-gpu-trained.log"
  tail -3 "$R/eval-brain-gpu-trained.log"
fi
fi
step done
