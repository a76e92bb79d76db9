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
