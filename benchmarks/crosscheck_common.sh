# Shared by crosscheck_aiperf.sh and crosscheck_guidellm.sh (sourced, not run): starts one
# fleetserve server on the converted SmolLM2 folder, waits for /health, stops it on exit, and
# runs `fleetserve bench` against it with the load in BENCH_LOAD. Expects ROOT, OUT, N and
# BENCH_LOAD; sets HF_MODEL, NAME, URL and SPID.
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
