#!/usr/bin/env bash
# Cross-check of `fleetserve bench` against aiperf (a client nobody here wrote): one fleetserve
# server, the same chat workload (128 in / 128 out, ignore_eos, streaming), the two clients back
# to back, then benchmarks/crosscheck_compare.py on the two. aiperf sends no temperature by
# default; we add TEMPERATURE (default 0) so both clients ask for the same work. Needs
# .peers/aiperf and .peers/models/... from benchmarks/setup_peers.sh and
# benchmarks/serving_vs_peers.sh (which converts the default GGUF into that folder).
#
#   RATE=0.6 N=100 benchmarks/crosscheck_aiperf.sh     # Poisson arrivals (default; about half
#                                                      # of the pinned one-thread server's capacity)
#   RATE_MODE=constant RATE=0.6 N=100 benchmarks/crosscheck_aiperf.sh   # a request every 1/RATE s
#   RATE= C=16 N=96 benchmarks/crosscheck_aiperf.sh    # closed loop at concurrency C
#   RATE= RAMP=8 C=16 N=96 benchmarks/crosscheck_aiperf.sh   # ... its streams started over 8 s
#
# aiperf's timing process spins a whole core in its concurrency mode (measured: 100% of one
# core for the whole run), which on this 2-core machine slows the server it measures unless the
# two are pinned apart (crosscheck_common.sh does by default); in rate mode we also turn its
# high-resolution timer off (AIPERF_TIMING_HIGH_RES_TIMER=false).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/benchmarks/out/crosscheck-$(date +%Y%m%d-%H%M%S)}
N=${N:-100}; C=${C:-16}; RATE=${RATE-0.6}; RATE_MODE=${RATE_MODE:-poisson}; RAMP=${RAMP:-0}
if [ -n "$RATE" ]; then
    BENCH_LOAD=(--rate "$RATE")
    if [ "$RATE_MODE" = constant ]; then BENCH_LOAD+=(--burstiness inf); fi
    AIPERF_LOAD=(--request-rate "$RATE" --request-rate-mode "$RATE_MODE")
else
    BENCH_LOAD=(--concurrency "$C" --ramp-up "$RAMP")
    AIPERF_LOAD=(--concurrency "$C")
    if [ "$RAMP" != 0 ]; then AIPERF_LOAD+=(--concurrency-ramp-duration "$RAMP"); fi
fi
source "$ROOT/benchmarks/crosscheck_common.sh"
date +%T > "$OUT/t_aiperf_start"; ps -g "$SPID" -o pid=,times=,args= | cut -c1-80 > "$OUT/server_cpu_1.txt"
env -u HF_HUB_OFFLINE HF_HOME=$ROOT/.peers/cache/hf AIPERF_TIMING_HIGH_RES_TIMER=false /usr/bin/time -o "$OUT/aiperf.time" -f "%U user %S sys %e wall" "${CLIENT[@]}" .peers/aiperf/bin/aiperf profile -m "$NAME" -u "$URL" \
  --endpoint-type chat --streaming --tokenizer "$HF_MODEL" \
  --isl 128 --isl-stddev 0 --osl 128 --osl-stddev 0 --extra-inputs "{\"ignore_eos\": true, \"temperature\": $TEMPERATURE}" \
  "${AIPERF_LOAD[@]}" --request-count "$N" --warmup-request-count 4 --random-seed 0 \
  --ui-type none --no-gpu-telemetry --no-server-metrics --artifact-dir "$OUT/aiperf" > "$OUT/aiperf.txt" 2>&1 || echo "aiperf rc=$?"
date +%T > "$OUT/t_end"; ps -g "$SPID" -o pid=,times=,args= | cut -c1-80 > "$OUT/server_cpu_2.txt"
uptime > "$OUT/loadavg_after.txt"
.venv/bin/python benchmarks/crosscheck_compare.py "$OUT" || true
echo "results in $OUT"
