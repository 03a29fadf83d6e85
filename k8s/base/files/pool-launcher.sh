#!/bin/bash
# Entrypoint of a pool's worker container: start GLM_TP ranks of `glm worker`, one per GPU,
# as services/worker/pool.py does on a laptop, and keep them as one unit.
#
# Each rank listens on $POOL_SOCKET_DIR/rank-<r>.sock (the scheduler's GLM_WORKERS) and the
# ranks meet at tcp://127.0.0.1:$POOL_DIST_PORT inside the pod. Every other setting
# (checkpoint, tp, dtype, device, quant, model name, OTLP endpoint) reaches `glm worker`
# as its GLM_* variable from the glm-worker ConfigMap. With POOL_METRICS_PORT set, rank r
# serves its Prometheus metrics on POOL_METRICS_PORT + r (GLM_METRICS_PORT of that rank).
#
# A rank that exits on its own leaves its peers stuck in a collective, so the whole
# container stops (non-zero) and Kubernetes restarts it. SIGTERM is passed on to every rank.
set -uo pipefail

tp="${GLM_TP:?GLM_TP must be set}"
sockets="${POOL_SOCKET_DIR:-/run/glm}"
port="${POOL_DIST_PORT:-29500}"
metrics_base="${POOL_METRICS_PORT:-}"
pids=()
stopping=0

stop_ranks() {
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
}
trap 'stopping=1; stop_ranks' TERM INT

rm -f "$sockets"/rank-*.sock
for ((rank = 0; rank < tp; rank++)); do
    if [ -n "$metrics_base" ]; then
        export GLM_METRICS_PORT=$((metrics_base + rank))
    fi
    glm worker --rank "$rank" --listen "unix://$sockets/rank-$rank.sock" \
        --dist-init "tcp://127.0.0.1:$port" &
    pids+=("$!")
done
echo "pool-launcher: started $tp rank(s): pids ${pids[*]}"

wait -n
status=$?
if [ "$stopping" -eq 0 ]; then
    echo "pool-launcher: a rank exited with status $status; stopping the pool" >&2
    stop_ranks
fi
wait
if [ "$stopping" -eq 1 ]; then
    exit 0
fi
exit $((status == 0 ? 1 : status))
