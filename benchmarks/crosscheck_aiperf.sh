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
HF_MODEL=$ROOT/.peers/models/SmolLM2-135M-Instruct.Q4_1
NAME=SmolLM2-135M-Instruct.Q4_1
PORT=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
mkdir -p "$OUT" "$ROOT/.peers/tmp"
export TMPDIR=$ROOT/.peers/tmp
uptime > "$OUT/loadavg_before.txt"
setsid .venv/bin/fleetserve serve "$HF_MODEL" --port "$PORT" ${FLEETSERVE_SERVE_ARGS:-} >"$OUT/fleetserve.log" 2>&1 &
SPID=$!
echo "$SPID" > "$OUT/server.pid"
stop() { kill -TERM -- "-$SPID" 2>/dev/null || true; for _ in $(seq 60); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.5; done; kill -KILL -- "-$SPID" 2>/dev/null || true; }
trap stop EXIT
for _ in $(seq 120); do [ "$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' $URL/health || true)" = 200 ] && break; sleep 1; done
echo "ready $(date +%T)"
date +%T > "$OUT/t_bench_start"; ps -g "$SPID" -o pid=,times=,args= | cut -c1-80 > "$OUT/server_cpu_0.txt"
HF_HUB_OFFLINE=1 /usr/bin/time -o "$OUT/bench.time" -f "%U user %S sys %e wall" .venv/bin/fleetserve bench --url "$URL" --model "$NAME" --tokenizer "$HF_MODEL" --endpoint chat \
  --num-requests "$N" --input-len 128 --output-len 128 --ignore-eos "${BENCH_LOAD[@]}" --seed 0 --warmup 4 \
  --label fleetserve-bench --out "$OUT/bench" --no-progress > "$OUT/bench.txt" 2>&1
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
