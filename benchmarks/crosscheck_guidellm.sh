#!/usr/bin/env bash
# Cross-check of `fleetserve bench` against guidellm (a client nobody here wrote): one fleetserve
# server, the same chat workload (128 in / 128 out, streaming), N requests in a closed loop of C
# streams or at RATE requests/s, the two clients back to back, then
# benchmarks/crosscheck_compare.py on the two.
# guidellm sends no temperature by default (so the server samples at 1.0, where `fleetserve
# bench` sends 0): we add TEMPERATURE (default 0) to its bodies so both ask for the same work.
# Needs .peers/guidellm (benchmarks/setup_peers.sh) and the bf16 folder .peers/models/... that
# benchmarks/serving_vs_peers.sh converts once. Pinning: see crosscheck_common.sh.
#
#   C=16 N=96 benchmarks/crosscheck_guidellm.sh             # closed loop of C streams (default)
#   RAMP=8 C=16 N=96 benchmarks/crosscheck_guidellm.sh      # ... started evenly over 8 s
#   RATE=0.6 N=100 benchmarks/crosscheck_guidellm.sh        # a request every 1/RATE s
#   RATE_MODE=poisson RATE=0.6 N=100 benchmarks/crosscheck_guidellm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/benchmarks/out/crosscheck-guidellm-$(date +%Y%m%d-%H%M%S)}
N=${N:-96}; C=${C:-16}; RATE=${RATE:-}; RATE_MODE=${RATE_MODE:-constant}; RAMP=${RAMP:-0}
if [ -n "$RATE" ]; then
    BENCH_LOAD=(--rate "$RATE"); PROFILE="kind=$RATE_MODE,rate=$RATE"
    if [ "$RATE_MODE" = constant ]; then BENCH_LOAD+=(--burstiness inf); fi
else
    BENCH_LOAD=(--concurrency "$C" --ramp-up "$RAMP"); PROFILE="kind=concurrent,streams=$C,rampup_duration=$RAMP"
fi
source "$ROOT/benchmarks/crosscheck_common.sh"
date +%T > "$OUT/t_guidellm_start"; ps -g "$SPID" -o pid=,times=,args= | cut -c1-80 > "$OUT/server_cpu_1.txt"
env -u HF_HUB_OFFLINE HF_HOME=$ROOT/.peers/cache/hf /usr/bin/time -o "$OUT/guidellm.time" -f "%U user %S sys %e wall" \
  "${CLIENT[@]}" .peers/guidellm/bin/guidellm run --backend "{\"kind\": \"openai_http\", \"target\": \"$URL\", \"model\": \"$NAME\", \"extras\": {\"body\": {\"temperature\": $TEMPERATURE}}}" \
  --tokenizer "kind=huggingface_auto,model=$HF_MODEL" \
  --data kind=synthetic_text,prompt_tokens=128,output_tokens=128 \
  --profile "$PROFILE" --constraint "kind=max_requests,count=$N" \
  --output "kind=json,path=$OUT/guidellm.json" --output kind=console --disable-progress \
  > "$OUT/guidellm.txt" 2>&1 || echo "guidellm rc=$?"
date +%T > "$OUT/t_end"; ps -g "$SPID" -o pid=,times=,args= | cut -c1-80 > "$OUT/server_cpu_2.txt"
uptime > "$OUT/loadavg_after.txt"
.venv/bin/python benchmarks/crosscheck_compare.py "$OUT" || true
echo "results in $OUT"
