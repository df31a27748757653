#!/usr/bin/env bash
# Nightly wsi-dala batch over a slide archive: one run at a time (flock), logs kept per night.
# Used by the cron and systemd examples beside this file. Settings via environment:
#   WSI_DALA_ARCHIVE  folder of slides            (required)
#   WSI_DALA_OUT      output folder                (required)
#   WSI_DALA_CONFIG   pipeline YAML with `model:`  (required)
#   WSI_DALA_VENV     virtual environment          (default: the repo's .venv)
#   WSI_DALA_ARGS     extra arguments, e.g. "--dask-workers 2" or "--scheduler tcp://host:8786"
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${WSI_DALA_VENV:-$here/.venv}"
out="${WSI_DALA_OUT:?set WSI_DALA_OUT}"
mkdir -p "$out/logs"
log="$out/logs/batch-$(date +%Y%m%d-%H%M%S).log"
# Non-overlapping: if last night's batch is still running, this one exits at once (exit 0, logged).
exec 9>"$out/.nightly.lock"
if ! flock -n 9; then
  echo "$(date -Is) previous batch still running; skipping" >> "$out/logs/skipped.log"
  exit 0
fi
# shellcheck disable=SC2086
"$venv/bin/wsi-dala" batch "${WSI_DALA_ARCHIVE:?set WSI_DALA_ARCHIVE}" --out "$out" \
  --config "${WSI_DALA_CONFIG:?set WSI_DALA_CONFIG}" --quiet --verbose ${WSI_DALA_ARGS:-} >"$log" 2>&1
