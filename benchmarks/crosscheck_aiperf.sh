#!/usr/bin/env bash
# Cross-check of `fleetserve bench` against aiperf (a client nobody here wrote): one fleetserve
# server, the same chat workload (128 in / 128 out, ignore_eos, streaming), the two clients back
# to back. Needs .peers/aiperf and .peers/models/... from benchmarks/setup_peers.sh and
# benchmarks/serving_vs_peers.sh (which converts the default GGUF into that folder).
#
#   RATE=1.25 N=100 benchmarks/crosscheck_aiperf.sh      # Poisson arrivals (default)
#   RATE= C=200 N=200 benchmarks/crosscheck_aiperf.sh    # closed loop at concurrency C
#
# aiperf's timing process spins a whole core in its concurrency mode on this 2-core machine
# (measured: 100% of one core for the whole run), which slows the server it measures; in rate
# mode we turn its high-resolution timer off (AIPERF_TIMING_HIGH_RES_TIMER=false).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/benchmarks/out/crosscheck-$(date +%Y%m%d-%H%M%S)}
N=${N:-100}; C=${C:-200}; RATE=${RATE-1.25}
if [ -n "$RATE" ]; then
    BENCH_LOAD=(--rate "$RATE"); AIPERF_LOAD=(--request-rate "$RATE" --request-rate-mode poisson)
else
    BENCH_LOAD=(--concurrency "$C"); AIPERF_LOAD=(--concurrency "$C")
fi
source "$ROOT/benchmarks/crosscheck_common.sh"
date +%T > "$OUT/t_aiperf_start"; ps -g "$SPID" -o pid=,times=,args= | cut -c1-80 > "$OUT/server_cpu_1.txt"
env -u HF_HUB_OFFLINE HF_HOME=$ROOT/.peers/cache/hf AIPERF_TIMING_HIGH_RES_TIMER=false /usr/bin/time -o "$OUT/aiperf.time" -f "%U user %S sys %e wall" .peers/aiperf/bin/aiperf profile -m "$NAME" -u "$URL" \
  --endpoint-type chat --streaming --tokenizer "$HF_MODEL" \
  --isl 128 --isl-stddev 0 --osl 128 --osl-stddev 0 --extra-inputs '{"ignore_eos": true}' \
  "${AIPERF_LOAD[@]}" --request-count "$N" --warmup-request-count 4 --random-seed 0 \
  --ui-type none --no-gpu-telemetry --no-server-metrics --artifact-dir "$OUT/aiperf" > "$OUT/aiperf.txt" 2>&1 || echo "aiperf rc=$?"
date +%T > "$OUT/t_end"; ps -g "$SPID" -o pid=,times=,args= | cut -c1-80 > "$OUT/server_cpu_2.txt"
uptime > "$OUT/loadavg_after.txt"
echo "fleetserve bench:"; tail -n 25 "$OUT/bench.txt"
echo "aiperf:"; grep -iE "time to first token|output token throughput|request throughput|inter token" "$OUT/aiperf.txt" | head -8 || true
echo "results in $OUT"
