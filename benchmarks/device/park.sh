#!/usr/bin/env bash
# Park the folders a GPU call does not need outside the checkout, and bring them back afterwards.
#
#   bash benchmarks/device/park.sh park      # before the device call: moves them, prints what will travel
#   bash benchmarks/device/park.sh restore   # right after it: moves them back, checks git sees no change
#   bash benchmarks/device/park.sh size      # what would travel now (tracked + untracked-not-ignored + carried)
#
# The device tool carries at most 64 MiB (tracked files, untracked files git does not ignore, and the
# ignored paths named in `carry`); this repository's tracked files alone are about 76 MB. The k-NN
# baselines' patch memories (inference/models/, 34 MB) and the results (benchmarks/results/, 25 MB) are
# not read on the GPU: bench_inference fits its own k-NN, and the results are compared here afterwards.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PARK=${PARK_DIR:-../.device-park}
FOLDERS=(inference/models benchmarks/results)
LIMIT=$((64 * 1024 * 1024))

size() {
  local tracked untracked carried=0
  tracked=$(git ls-files -z | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
  untracked=$(git ls-files -o --exclude-standard -z | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
  for p in .whl .devdata; do [ -e "$p" ] && carried=$((carried + $(du -sb "$p" | cut -f1))); done
  local total=$((tracked + ${untracked:-0} + carried))
  echo "would travel: $((total / 1024 / 1024)) MiB (tracked $((tracked / 1024 / 1024)), untracked $((${untracked:-0} / 1024 / 1024)), .whl + .devdata $((carried / 1024 / 1024))); limit 64 MiB"
  [ "$total" -le "$LIMIT" ]
}

case "${1:-}" in
  park)
    for f in "${FOLDERS[@]}"; do
      [ -e "$PARK/$f" ] && { echo "refusing: $PARK/$f exists (an earlier park not restored?)" >&2; exit 1; }
    done
    for f in "${FOLDERS[@]}"; do mkdir -p "$PARK/$(dirname "$f")"; mv "$f" "$PARK/$f"; done
    size || echo "still over the limit" >&2
    ;;
  restore)
    for f in "${FOLDERS[@]}"; do
      if [ -e "$PARK/$f" ]; then
        [ -e "$f" ] && { echo "refusing: $f exists here and in $PARK" >&2; exit 1; }
        mv "$PARK/$f" "$f"
      fi
    done
    if git status --porcelain -- "${FOLDERS[@]}" | grep -q '^ D'; then
      echo "files are still missing:" >&2; git status --short -- "${FOLDERS[@]}" >&2; exit 1
    fi
    [ -d "$PARK" ] && find "$PARK" -depth -type d -empty -delete
    echo "restored: git sees nothing missing under ${FOLDERS[*]}"
    ;;
  size) size ;;
  *) sed -n 2,6p "$0"; exit 2 ;;
esac
