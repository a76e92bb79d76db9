#!/usr/bin/env bash
# Cross-check of `fleetserve bench` against guidellm (a client nobody here wrote): one fleetserve
# server, the same chat workload (128 in / 128 out, streaming), a closed loop of C streams for N
# requests, the two clients back to back. Needs .peers/guidellm (benchmarks/setup_peers.sh) and
# the bf16 folder .peers/models/... that benchmarks/serving_vs_peers.sh converts once.
#
#   C=16 N=96 benchmarks/crosscheck_guidellm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/benchmarks/out/crosscheck-guidellm-$(date +%Y%m%d-%H%M%S)}
N=${N:-96}; C=${C:-16}
BENCH_LOAD=(--concurrency "$C")
source "$ROOT/benchmarks/crosscheck_common.sh"
date +%T > "$OUT/t_guidellm_start"; ps -g "$SPID" -o pid=,times=,args= | cut -c1-80 > "$OUT/server_cpu_1.txt"
env -u HF_HUB_OFFLINE HF_HOME=$ROOT/.peers/cache/hf /usr/bin/time -o "$OUT/guidellm.time" -f "%U user %S sys %e wall" \
  .peers/guidellm/bin/guidellm run --backend "kind=openai_http,target=$URL,model=$NAME" \
  --tokenizer "kind=huggingface_auto,model=$HF_MODEL" \
  --data kind=synthetic_text,prompt_tokens=128,output_tokens=128 \
  --profile "kind=concurrent,streams=$C" --constraint "kind=max_requests,count=$N" \
  --output "kind=json,path=$OUT/guidellm.json" --output kind=console --disable-progress \
  > "$OUT/guidellm.txt" 2>&1 || echo "guidellm rc=$?"
date +%T > "$OUT/t_end"; ps -g "$SPID" -o pid=,times=,args= | cut -c1-80 > "$OUT/server_cpu_2.txt"
uptime > "$OUT/loadavg_after.txt"
echo "fleetserve bench:"; tail -n 25 "$OUT/bench.txt"
echo "guidellm:"; tail -n 60 "$OUT/guidellm.txt"
echo "results in $OUT"
