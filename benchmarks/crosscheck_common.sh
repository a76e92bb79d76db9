# Shared by crosscheck_aiperf.sh and crosscheck_guidellm.sh (sourced, not run): starts one
# fleetserve server on the converted SmolLM2 folder, waits for /health, stops it on exit, and
# runs `fleetserve bench` against it with the load in BENCH_LOAD. Expects ROOT, OUT, N and
# BENCH_LOAD; sets HF_MODEL, NAME, URL, SPID and CLIENT (the prefix that pins a client).
# TEMPERATURE (default 0) is sent by both clients: aiperf and guidellm send none unless told, and
# the server then samples at 1.0, which is other work than the greedy steps of `fleetserve bench`.
#
# A client on the same machine takes CPU from the server it measures, and the two clients do
# not take the same amount (aiperf's timing process can spin a whole core; guidellm runs ten
# worker processes), so unpinned they measure two different servers. By default the server
# (API process and engine core, one compute thread) runs on SERVER_CPUS=0 and every client on
# CLIENT_CPUS=1, the nearest this 2-core machine gets to a client on another machine.
# SERVER_CPUS= CLIENT_CPUS= turns pinning off (the server then uses its default threads).
HF_MODEL=$ROOT/.peers/models/SmolLM2-135M-Instruct.Q4_1
NAME=SmolLM2-135M-Instruct.Q4_1
PORT=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
mkdir -p "$OUT" "$ROOT/.peers/tmp"
export TMPDIR=$ROOT/.peers/tmp
SERVER_CPUS=${SERVER_CPUS-0}; CLIENT_CPUS=${CLIENT_CPUS-1}; TEMPERATURE=${TEMPERATURE:-0}
SERVER=(); CLIENT=()
if [ -n "$SERVER_CPUS" ]; then
    SERVER=(taskset -c "$SERVER_CPUS")
    FLEETSERVE_SERVE_ARGS=${FLEETSERVE_SERVE_ARGS:---num-threads $(taskset -c "$SERVER_CPUS" nproc)}
fi
if [ -n "$CLIENT_CPUS" ]; then CLIENT=(taskset -c "$CLIENT_CPUS"); fi
echo "server cpus: ${SERVER_CPUS:-all}  client cpus: ${CLIENT_CPUS:-all}  serve args: ${FLEETSERVE_SERVE_ARGS:-}" | tee "$OUT/pinning.txt"
uptime > "$OUT/loadavg_before.txt"
setsid "${SERVER[@]}" .venv/bin/fleetserve serve "$HF_MODEL" --port "$PORT" ${FLEETSERVE_SERVE_ARGS:-} >"$OUT/fleetserve.log" 2>&1 &
SPID=$!
echo "$SPID" > "$OUT/server.pid"
stop() { kill -TERM -- "-$SPID" 2>/dev/null || true; for _ in $(seq 60); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.5; done; kill -KILL -- "-$SPID" 2>/dev/null || true; }
trap stop EXIT
for _ in $(seq 120); do [ "$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' $URL/health || true)" = 200 ] && break; sleep 1; done
echo "ready $(date +%T)"
date +%T > "$OUT/t_bench_start"; ps -g "$SPID" -o pid=,times=,args= | cut -c1-80 > "$OUT/server_cpu_0.txt"
HF_HUB_OFFLINE=1 /usr/bin/time -o "$OUT/bench.time" -f "%U user %S sys %e wall" "${CLIENT[@]}" .venv/bin/fleetserve bench --url "$URL" --model "$NAME" --tokenizer "$HF_MODEL" --endpoint chat \
  --num-requests "$N" --input-len 128 --output-len 128 --ignore-eos --temperature "$TEMPERATURE" "${BENCH_LOAD[@]}" --seed 0 --warmup 4 \
  --label fleetserve-bench --out "$OUT/bench" --no-progress > "$OUT/bench.txt" 2>&1
