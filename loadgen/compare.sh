#!/usr/bin/env bash
# Side-by-side comparison of glockd, Redis and the no-op line server on this machine, in one run,
# with the same load generator. Prints a Markdown table of medians and ratios.
#
# Servers run pinned to core 0 and the load generator to core 1 (taskset), so the client never
# competes with the server for a core; everything listens on 127.0.0.1 only, on free ports.
#
#   loadgen/compare.sh            # full matrix, about 10 minutes
#   QUICK=1 loadgen/compare.sh    # smaller and shorter, under 3 minutes
#
# The last table is what a newcomer meets: nothing pinned, glockd with its defaults, one and two
# shards, shard-aware clients, Redis (NEWCOMER=0 skips it, for binaries without -shard-port).
#
# TLS=1 adds a TLS table: plain glockd beside glockd on -tls-port and Redis on --tls-port (a
# throwaway CA and certificate made with openssl in the output directory), churn at pipeline 32
# and 1, handshakes per second and server CPU per handshake, memory per idle TLS connection. Off
# by default, so binaries from before TLS still run the rest.
#
# Knobs (environment): REPS (runs per cell, alternating targets), DUR (measured seconds per run),
# WARMUP, CONNS, HOLD_LOCKS, IDLE_CONNS, NO_BUILD=1 (use the binaries already built), BIN (where
# the binaries are; default target/release),
# OUT (directory for raw JSON and logs; default: a fresh temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${QUICK:-0}" == 1 ]]; then
    REPS=${REPS:-1} DUR=${DUR:-2} WARMUP=${WARMUP:-0.5}
    HOLD_LOCKS=${HOLD_LOCKS:-200000} IDLE_CONNS=${IDLE_CONNS:-2000}
else
    REPS=${REPS:-3} DUR=${DUR:-5} WARMUP=${WARMUP:-1}
    HOLD_LOCKS=${HOLD_LOCKS:-1000000} IDLE_CONNS=${IDLE_CONNS:-10000}
fi
CONNS=${CONNS:-50}
OUT=${OUT:-$(mktemp -d -t glockd-compare.XXXXXX)}
mkdir -p "$OUT"
BIN=${BIN:-target/release}
CLK_TCK=$(getconf CLK_TCK)

command -v redis-server >/dev/null || {
    echo "compare.sh: redis-server is not installed (Debian: apt-get install redis-server)" >&2
    exit 1
}
command -v taskset >/dev/null || { echo "compare.sh: taskset is missing (util-linux)" >&2; exit 1; }
if [[ "$(nproc)" -lt 2 ]]; then
    echo "compare.sh: needs 2 cores (server on core 0, load generator on core 1)" >&2
    exit 1
fi

if [[ "${NO_BUILD:-0}" != 1 ]]; then
    cargo build --release --quiet --bin glockd
    cargo build --release --quiet -p glockd-loadgen --bin loadgen --bin noop-server
fi

# Ten thousand idle connections need as many descriptors in the client and in each server.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "compare.sh: $*" >&2; }

# A TCP port nobody listens on now, below the kernel's ephemeral range (so no outgoing
# connection holds it either).
EPHEMERAL_LOW=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
free_port() {
    local port
    while :; do
        port=$((10000 + RANDOM % (EPHEMERAL_LOW - 10000)))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

wait_port() {
    local i
    for i in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    log "nothing listens on port $1"
    return 1
}

# start NAME PORT COMMAND...: starts a server in the background, sets SERVER_PID.
start() {
    local name=$1 port=$2
    shift 2
    "$@" >"$OUT/$name.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_port "$port"
}

stop() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    local keep=() pid
    for pid in "${PIDS[@]}"; do
        [[ "$pid" == "$1" ]] || keep+=("$pid")
    done
    PIDS=("${keep[@]+"${keep[@]}"}")
}

start_glockd() { # PORT SHARDS CORE [extra flags...]; CORE "-" runs it on every core
    local port=$1 shards=$2 core=$3 prefix=()
    shift 3
    [[ $core == - ]] || prefix=(taskset -c "$core")
    start "glockd-$port" "$port" "${prefix[@]}" "$BIN/glockd" --bind 127.0.0.1 --port "$port" \
        --shards "$shards" "$@"
}
start_redis() {
    start redis-$1 "$1" taskset -c 0 redis-server --bind 127.0.0.1 --port "$1" --save '' \
        --appendonly no --maxclients $((IDLE_CONNS + 1000)) --protected-mode no
}
start_noop() { start noop-$1 "$1" taskset -c 0 "$BIN/noop-server" --port "$1" --threads 1; }

# One JSON field (numbers only) from a loadgen report.
field() { grep -o "\"$1\":[^,}]*" | head -1 | cut -d: -f2; }

# cpu_ticks PID: user + system time of a process so far, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }'; }
fmt() { awk -v v="$1" 'BEGIN { printf "%.0f", v }'; }
fmt1() { awk -v v="$1" 'BEGIN { printf "%.1f", v }'; }
ok() { awk -v c="$1" 'BEGIN { print (c ? "yes" : "**no**") }'; }

# lg NAME [loadgen flags...]: one run pinned to core 1; the JSON report goes to $OUT/NAME.json.
lg() {
    local name=$1
    shift
    if ! taskset -c 1 "$BIN/loadgen" --quiet --json "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"; then
        log "run $name reported errors or failed: $(head -c 400 "$OUT/$name.err") $(field error_examples <"$OUT/$name.json" || true)"
    fi
}

log "raw results in $OUT"
log "load before starting: $(cut -d' ' -f1-3 /proc/loadavg)"

GP=$(free_port); start_glockd "$GP" 1 0; GLOCKD=$SERVER_PID
RP=$(free_port); start_redis "$RP"; REDIS=$SERVER_PID
NP=$(free_port); start_noop "$NP"; NOOP=$SERVER_PID
declare -A PORT=([glockd]=$GP [redis]=$RP [noop]=$NP)
declare -A PID=([glockd]=$GLOCKD [redis]=$REDIS [noop]=$NOOP)
target_flags() { # how loadgen talks to each server
    case $1 in
        glockd) echo "--target glockd --addr 127.0.0.1:${PORT[glockd]}" ;;
        redis) echo "--target redis --addr 127.0.0.1:${PORT[redis]}" ;;
        noop) echo "--target noop --addr 127.0.0.1:${PORT[noop]}" ;;
    esac
}

# Closed-loop churn, pipeline 32 and 1, every target in turn, REPS times.
for pipeline in 32 1; do
    for rep in $(seq 1 "$REPS"); do
        for t in glockd redis noop; do
            before=$(cpu_ticks "${PID[$t]}")
            # Pipeline 1 runs have no warm-up, so the server's CPU time covers exactly the run.
            warm=$WARMUP
            [[ $pipeline == 1 ]] && warm=0
            # shellcheck disable=SC2046
            lg "churn-p$pipeline-$t-$rep" $(target_flags "$t") --workload churn \
                --conns "$CONNS" --pipeline "$pipeline" --duration "${DUR}s" --warmup "${warm}s"
            after=$(cpu_ticks "${PID[$t]}")
            echo $((after - before)) >"$OUT/churn-p$pipeline-$t-$rep.cpu"
            log "churn p$pipeline $t #$rep: $(fmt "$(field ops_per_sec <"$OUT/churn-p$pipeline-$t-$rep.json")") ops/s"
        done
    done
done

# med FILE_PATTERN FIELD: median of a field over the repetitions.
med() {
    local f
    for f in $OUT/$1-*.json; do field "$2" <"$f"; done | median
}
# Server CPU per command at pipeline 1, in nanoseconds (median over repetitions).
cpu_per_cmd() {
    local rep ticks cmds
    for rep in $(seq 1 "$REPS"); do
        ticks=$(cat "$OUT/churn-p1-$1-$rep.cpu")
        cmds=$(field commands <"$OUT/churn-p1-$1-$rep.json")
        awk -v t="$ticks" -v c="$cmds" -v hz="$CLK_TCK" 'BEGIN { if (c > 0) print t / hz * 1e9 / c }'
    done | median
}

declare -A P32 P1 P1LAT CPU
for t in glockd redis noop; do
    P32[$t]=$(med "churn-p32-$t" ops_per_sec)
    P1[$t]=$(med "churn-p1-$t" ops_per_sec)
    P1LAT[$t]=$(med "churn-p1-$t" p99)
    CPU[$t]=$(cpu_per_cmd "$t")
done

# Open loop at half of Redis's closed-loop pipeline-1 rate: p99 latency, glockd vs Redis.
RATE=$(awk -v r="${P1[redis]}" 'BEGIN { printf "%.0f", r / 2 }')
for rep in $(seq 1 "$REPS"); do
    for t in glockd redis; do
        # shellcheck disable=SC2046
        lg "open-$t-$rep" $(target_flags "$t") --workload churn --conns "$CONNS" \
            --rate "$RATE" --duration "${DUR}s" --warmup "${WARMUP}s"
        log "open loop $RATE/s $t #$rep: p99 $(field p99 <"$OUT/open-$t-$rep.json") µs"
    done
done
declare -A OPEN50 OPEN99
for t in glockd redis; do
    OPEN50[$t]=$(med "open-$t" p50)
    OPEN99[$t]=$(med "open-$t" p99)
done
stop "$NOOP"

# --shards 2, both cores, at pipeline 32 (load generator still on core 1): unpinned
# (-pin=false, the OS places the shard threads) and with glockd's own pinning.
stop "$GLOCKD"
for variant in unpinned pinned; do
    port=$(free_port)
    if [[ $variant == unpinned ]]; then
        start_glockd "$port" 2 - --pin=false
    else
        start_glockd "$port" 2 -
    fi
    pid=$SERVER_PID
    for rep in $(seq 1 "$REPS"); do
        lg "shards2-$variant-$rep" --target glockd --addr "127.0.0.1:$port" --workload churn \
            --conns "$CONNS" --pipeline 32 --duration "${DUR}s" --warmup "${WARMUP}s"
        log "shards 2 $variant #$rep: $(fmt "$(field ops_per_sec <"$OUT/shards2-$variant-$rep.json")") ops/s"
    done
    stop "$pid"
done
S2U=$(med shards2-unpinned ops_per_sec)
S2P=$(med shards2-pinned ops_per_sec)

# rss_per NAME TARGET PID PORT N FORMAT [loadgen flags...]: the server's RSS before, and while a
# hold or idle run (its report in $OUT/NAME-TARGET.json) holds N units; prints bytes per unit.
rss_per() {
    local name=$1 t=$2 pid=$3 port=$4 n=$5 format=$6 before during
    shift 6
    before=$(rss_kib "$pid")
    taskset -c 1 "$BIN/loadgen" --quiet --json --target "$t" --addr "127.0.0.1:$port" \
        "$@" --duration 3s >"$OUT/$name-$t.json" 2>"$OUT/$name-$t.err" &
    local lgpid=$!
    PIDS+=("$lgpid")
    while ! grep -q "loadgen: holding" "$OUT/$name-$t.err" 2>/dev/null; do
        kill -0 "$lgpid" 2>/dev/null || break
        sleep 0.05
    done
    during=$(rss_kib "$pid")
    stop "$lgpid"
    awk -v a="$before" -v b="$during" -v n="$n" -v f="$format" 'BEGIN { printf f, (b - a) * 1024 / n }'
}
# What a newcomer meets: nothing pinned (no taskset; glockd with its defaults, metrics endpoint
# included), pipeline 1 and 32: the default shard count, one shard, two shards, two shards with
# shard-aware clients (--shard-aware over -shard-port), and Redis. NEWCOMER=0 skips it (a
# binary from before -shard-port cannot run it).
if [[ "${NEWCOMER:-1}" == 1 ]]; then
    # Two free ports in a row, for -shard-port with two shards.
    free_pair() {
        local port
        while :; do
            port=$(free_port)
            if ! (exec 3<>"/dev/tcp/127.0.0.1/$((port + 1))") 2>/dev/null; then
                echo "$port"
                return
            fi
        done
    }
    declare -A NPORT NPID
    NVARIANTS=(defaults shards1 shards2 aware redis)
    for v in "${NVARIANTS[@]}"; do
        port=$(free_port)
        case $v in
            defaults) start "n-$v" "$port" "$BIN/glockd" --bind 127.0.0.1 --port "$port" --ws 0 \
                --metrics "127.0.0.1:$(free_port)" ;;
            shards1) start "n-$v" "$port" "$BIN/glockd" --bind 127.0.0.1 --port "$port" --ws 0 \
                --metrics off --shards 1 ;;
            shards2) start "n-$v" "$port" "$BIN/glockd" --bind 127.0.0.1 --port "$port" --ws 0 \
                --metrics off --shards 2 ;;
            aware) start "n-$v" "$port" "$BIN/glockd" --bind 127.0.0.1 --port "$port" --ws 0 \
                --metrics off --shards 2 --shard-port "$(free_pair)" ;;
            redis) start "n-$v" "$port" redis-server --bind 127.0.0.1 --port "$port" --save '' \
                --appendonly no --protected-mode no ;;
        esac
        NPORT[$v]=$port
        NPID[$v]=$SERVER_PID
    done
    for pipeline in 1 32; do
        for rep in $(seq 1 "$REPS"); do
            for v in "${NVARIANTS[@]}"; do
                flags=(--target glockd)
                [[ $v == redis ]] && flags=(--target redis)
                [[ $v == aware ]] && flags+=(--shard-aware)
                before=$(cpu_ticks "${NPID[$v]}")
                name="new-p$pipeline-$v-$rep"
                if ! "$BIN/loadgen" --quiet --json "${flags[@]}" --addr "127.0.0.1:${NPORT[$v]}" \
                    --workload churn --conns "$CONNS" --pipeline "$pipeline" --duration "${DUR}s" \
                    --warmup 0s >"$OUT/$name.json" 2>"$OUT/$name.err"; then
                    log "run $name failed: $(head -c 400 "$OUT/$name.err")"
                fi
                after=$(cpu_ticks "${NPID[$v]}")
                echo $((after - before)) >"$OUT/$name.cpu"
                log "newcomer p$pipeline $v #$rep: $(fmt "$(field ops_per_sec <"$OUT/$name.json")") ops/s"
            done
        done
    done
    for v in "${NVARIANTS[@]}"; do
        stop "${NPID[$v]}"
    done
    # Server CPU per command (ns), median over repetitions.
    new_cpu() { # PIPELINE VARIANT
        local rep ticks cmds
        for rep in $(seq 1 "$REPS"); do
            ticks=$(cat "$OUT/new-p$1-$2-$rep.cpu")
            cmds=$(field commands <"$OUT/new-p$1-$2-$rep.json")
            awk -v t="$ticks" -v c="$cmds" -v hz="$CLK_TCK" 'BEGIN { if (c > 0) print t / hz * 1e9 / c }'
        done | median
    }
    declare -A N1 N32 C1 C32
    for v in "${NVARIANTS[@]}"; do
        N1[$v]=$(med "new-p1-$v" ops_per_sec)
        N32[$v]=$(med "new-p32-$v" ops_per_sec)
        C1[$v]=$(new_cpu 1 "$v")
        C32[$v]=$(new_cpu 32 "$v")
    done
    NEWCOMER_TABLE=$(
        echo
        echo "Nothing pinned, as a newcomer runs it; $REPS runs per cell, ${DUR}s each, medians; $CONNS connections of churn."
        echo
        echo "| | p1 ops/s | p32 ops/s | server CPU per command, p1 (ns) | p32 (ns) |"
        echo "|---|---|---|---|---|"
        for v in "${NVARIANTS[@]}"; do
            case $v in
                defaults) label="\`glockd\` with its defaults" ;;
                shards1) label="\`glockd -shards 1\`" ;;
                shards2) label="\`glockd -shards 2\`" ;;
                aware) label="\`glockd -shards 2\`, shard-aware clients" ;;
                redis) label="Redis" ;;
            esac
            echo "| $label | $(fmt "${N1[$v]}") | $(fmt "${N32[$v]}") | $(fmt "${C1[$v]}") | $(fmt1 "${C32[$v]}") |"
        done
        echo
        echo "Defaults: $(ratio "${N1[defaults]}" "${N1[shards1]}")× (p1) and $(ratio "${N32[defaults]}" "${N32[shards1]}")× (p32) \`-shards 1\`, $(ratio "${N1[defaults]}" "${N1[redis]}")× Redis at p1. CPU per command at \`-shards 2\`: $(ratio "${C1[shards2]}" "${C1[shards1]}")× (p1) and $(ratio "${C32[shards2]}" "${C32[shards1]}")× (p32) \`-shards 1\`; shard-aware: $(ratio "${C1[aware]}" "${C1[shards1]}")× and $(ratio "${C32[aware]}" "${C32[shards1]}")×."
    )
fi

# Memory per held lock: HOLD_LOCKS exclusive locks with 16-byte names.
hold_rss() { # TARGET PID PORT → prints bytes per lock
    rss_per hold "$1" "$2" "$3" "$HOLD_LOCKS" %.1f \
        --workload hold --keys "$HOLD_LOCKS" --key-size 16 --conns 10 --pipeline 256
}
# Memory per idle connection: IDLE_CONNS connections that sent one command each.
idle_rss() { # TARGET PID PORT → prints bytes per connection
    rss_per idle "$1" "$2" "$3" "$IDLE_CONNS" %.0f --workload idle --conns "$IDLE_CONNS"
}

port=$(free_port); start_glockd "$port" 1 0; pid=$SERVER_PID
HOLD_G=$(hold_rss glockd "$pid" "$port")
stop "$pid"
port=$(free_port); start_glockd "$port" 1 0; pid=$SERVER_PID
IDLE_G=$(idle_rss glockd "$pid" "$port")
stop "$pid"
HOLD_R=$(hold_rss redis "$REDIS" "${PORT[redis]}")
stop "$REDIS"
port=$(free_port); start_redis "$port"; pid=$SERVER_PID
IDLE_R=$(idle_rss redis "$pid" "$port")
stop "$pid"
# TLS=1: plain and TLS glockd (one server, both doors) and Redis with --tls-port.
if [[ "${TLS:-0}" == 1 ]]; then
    command -v openssl >/dev/null || { log "TLS=1 needs openssl"; exit 1; }
    CERTS="$OUT/tls"
    mkdir -p "$CERTS"
    (
        cd "$CERTS"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
            -subj "/CN=compare CA" -keyout ca.key -out ca.pem
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
            -keyout server.key -out server.csr
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile server.ext -out server.pem
    ) >"$OUT/tls-openssl.log" 2>&1
    TLSFLAGS=(--tls --ca "$CERTS/ca.pem" --server-name localhost)
    gport=$(free_port); gtls=$(free_port)
    start_glockd "$gport" 1 0 --tls-port "$gtls" --tls-cert "$CERTS/server.pem" \
        --tls-key "$CERTS/server.key" --ws 0 --metrics off
    gpid=$SERVER_PID
    wait_port "$gtls"
    rtls=$(free_port)
    start "redis-tls-$rtls" "$rtls" taskset -c 0 redis-server --bind 127.0.0.1 --port 0 \
        --tls-port "$rtls" --tls-cert-file "$CERTS/server.pem" --tls-key-file "$CERTS/server.key" \
        --tls-ca-cert-file "$CERTS/ca.pem" --tls-auth-clients no --save '' --appendonly no \
        --maxclients $((IDLE_CONNS + 1000)) --protected-mode no
    rpid=$SERVER_PID
    tls_flags() { # plain | tls | redis
        case $1 in
            plain) echo "--target glockd --addr 127.0.0.1:$gport" ;;
            tls) echo "--target glockd --addr 127.0.0.1:$gtls ${TLSFLAGS[*]}" ;;
            redis) echo "--target redis --addr 127.0.0.1:$rtls ${TLSFLAGS[*]}" ;;
        esac
    }
    for pipeline in 32 1; do
        for rep in $(seq 1 "$REPS"); do
            for t in plain tls redis; do
                # shellcheck disable=SC2046
                lg "tls-p$pipeline-$t-$rep" $(tls_flags "$t") --workload churn --conns "$CONNS" \
                    --pipeline "$pipeline" --duration "${DUR}s" --warmup "${WARMUP}s"
                log "tls churn p$pipeline $t #$rep: $(fmt "$(field ops_per_sec <"$OUT/tls-p$pipeline-$t-$rep.json")") ops/s"
            done
        done
    done
    declare -A T32 T1
    for t in plain tls redis; do
        T32[$t]=$(med "tls-p32-$t" ops_per_sec)
        T1[$t]=$(med "tls-p1-$t" ops_per_sec)
    done
    # Handshakes: every connection takes one lock and goes (orphan-storm, one lock each), so
    # connections per second are handshakes per second; the server's CPU time over them.
    for rep in $(seq 1 "$REPS"); do
        before=$(cpu_ticks "$gpid")
        # shellcheck disable=SC2046
        lg "tls-hs-$rep" $(tls_flags tls) --workload orphan-storm --locks-per-conn 1 \
            --conns "$CONNS" --duration "${DUR}s" --warmup 0s
        after=$(cpu_ticks "$gpid")
        echo $((after - before)) >"$OUT/tls-hs-$rep.cpu"
    done
    hs_rate() {
        local rep
        for rep in $(seq 1 "$REPS"); do
            awk -v c="$(field connections <"$OUT/tls-hs-$rep.json")" -v d="$DUR" 'BEGIN { print c / d }'
        done | median
    }
    hs_cpu() { # server CPU per handshake (µs), the orphaning of its one lock included
        local rep
        for rep in $(seq 1 "$REPS"); do
            awk -v t="$(cat "$OUT/tls-hs-$rep.cpu")" -v c="$(field connections <"$OUT/tls-hs-$rep.json")" \
                -v hz="$CLK_TCK" 'BEGIN { if (c > 0) print t / hz * 1e6 / c }'
        done | median
    }
    HS=$(hs_rate); HSCPU=$(hs_cpu)
    stop "$gpid"
    port=$(free_port); tport=$(free_port)
    start_glockd "$port" 1 0 --tls-port "$tport" --tls-cert "$CERTS/server.pem" \
        --tls-key "$CERTS/server.key" --ws 0 --metrics off
    pid=$SERVER_PID
    wait_port "$tport"
    IDLE_PLAIN=$(idle_rss glockd "$pid" "$port")
    IDLE_TLS=$(rss_per idle-tls glockd "$pid" "$tport" "$IDLE_CONNS" %.0f --workload idle \
        --conns "$IDLE_CONNS" "${TLSFLAGS[@]}")
    stop "$pid"
    IDLE_RTLS=$(rss_per idle-tls redis "$rpid" "$rtls" "$IDLE_CONNS" %.0f --workload idle \
        --conns "$IDLE_CONNS" "${TLSFLAGS[@]}")
    stop "$rpid"
    TLS_TABLE=$(
        echo
        echo "TLS (TLS=1): one glockd with -port and -tls-port, Redis with --tls-port, servers on core 0; $REPS runs per cell, ${DUR}s each, medians; $CONNS connections of churn."
        echo
        echo "| measure | glockd plain | glockd TLS | Redis TLS | ratio | goal | met |"
        echo "|---|---|---|---|---|---|---|"
        echo "| churn, pipeline 32 (ops/s) | $(fmt "${T32[plain]}") | $(fmt "${T32[tls]}") | $(fmt "${T32[redis]}") | $(ratio "${T32[tls]}" "${T32[plain]}")× plain, $(ratio "${T32[tls]}" "${T32[redis]}")× Redis TLS | ≥ 0.75× plain, ≥ 1.5× Redis TLS | $(ok "$(awk -v g="${T32[tls]}" -v p="${T32[plain]}" -v r="${T32[redis]}" 'BEGIN { print (g >= 0.75 * p && g >= 1.5 * r) }')") |"
        echo "| churn, pipeline 1 (ops/s) | $(fmt "${T1[plain]}") | $(fmt "${T1[tls]}") | $(fmt "${T1[redis]}") | $(ratio "${T1[tls]}" "${T1[plain]}")× plain | ≥ 0.85× plain | $(ok "$(awk -v g="${T1[tls]}" -v p="${T1[plain]}" 'BEGIN { print (g >= 0.85 * p) }')") |"
        echo "| handshakes per second (connect, one lock, go) | | $(fmt "$HS") | | | | |"
        echo "| server CPU per handshake (µs) | | $(fmt1 "$HSCPU") | | | | |"
        echo "| memory per idle connection (bytes RSS) | $IDLE_PLAIN | $IDLE_TLS | $IDLE_RTLS | $(ratio "$IDLE_TLS" "$IDLE_PLAIN")× plain | | |"
    )
fi
log "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"

cat <<EOF

Machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p' | head -1); $REPS runs per cell, ${DUR}s each, medians; $CONNS connections; servers on core 0, load generator on core 1.

| measure | glockd | Redis | no-op | ratio | goal | met |
|---|---|---|---|---|---|---|
| churn, pipeline 32 (ops/s) | $(fmt "${P32[glockd]}") | $(fmt "${P32[redis]}") | $(fmt "${P32[noop]}") | $(ratio "${P32[glockd]}" "${P32[redis]}")× Redis, $(ratio "${P32[glockd]}" "${P32[noop]}")× no-op | ≥ 2× Redis, ≥ 0.75× no-op | $(ok "$(awk -v g="${P32[glockd]}" -v r="${P32[redis]}" -v n="${P32[noop]}" 'BEGIN { print (g >= 2 * r && g >= 0.75 * n) }')") |
| churn, pipeline 1 (ops/s) | $(fmt "${P1[glockd]}") | $(fmt "${P1[redis]}") | $(fmt "${P1[noop]}") | $(ratio "${P1[glockd]}" "${P1[redis]}")× Redis | ≥ Redis | $(ok "$(awk -v g="${P1[glockd]}" -v r="${P1[redis]}" 'BEGIN { print (g >= r) }')") |
| churn, pipeline 1, p99 (µs) | $(fmt1 "${P1LAT[glockd]}") | $(fmt1 "${P1LAT[redis]}") | $(fmt1 "${P1LAT[noop]}") | | | |
| server CPU per command, pipeline 1 (ns) | $(fmt "${CPU[glockd]}") | $(fmt "${CPU[redis]}") | $(fmt "${CPU[noop]}") | $(ratio "${CPU[glockd]}" "${CPU[noop]}")× no-op | ≤ 1.10× no-op | $(ok "$(awk -v g="${CPU[glockd]}" -v n="${CPU[noop]}" 'BEGIN { print (g <= 1.1 * n) }')") |
| \`--shards 2 -pin=false\`, pipeline 32 (ops/s) | $(fmt "$S2U") | | | $(ratio "$S2U" "${P32[glockd]}")× shards 1 pinned | ≥ 0.90× | $(ok "$(awk -v a="$S2U" -v b="${P32[glockd]}" 'BEGIN { print (a >= 0.9 * b) }')") |
| \`--shards 2\` (pinned by glockd), pipeline 32 (ops/s) | $(fmt "$S2P") | | | $(ratio "$S2P" "${P32[glockd]}")× shards 1 pinned | | |
| memory per held lock, 16-byte names (bytes RSS) | $HOLD_G | $HOLD_R | | $(ratio "$HOLD_G" "$HOLD_R")× Redis | ≤ 60 | $(ok "$(awk -v g="$HOLD_G" 'BEGIN { print (g <= 60) }')") |
| memory per idle connection (bytes RSS) | $IDLE_G | $IDLE_R | | $(ratio "$IDLE_G" "$IDLE_R")× Redis | ≤ 8192 | $(ok "$(awk -v g="$IDLE_G" 'BEGIN { print (g <= 8192) }')") |
| open loop at $RATE/s (½ Redis max, p1), p50 µs | $(fmt1 "${OPEN50[glockd]}") | $(fmt1 "${OPEN50[redis]}") | | | | |
| open loop at $RATE/s (½ Redis max, p1), p99 µs | $(fmt1 "${OPEN99[glockd]}") | $(fmt1 "${OPEN99[redis]}") | | $(ratio "${OPEN99[glockd]}" "${OPEN99[redis]}")× Redis | ≤ 1× Redis | $(ok "$(awk -v g="${OPEN99[glockd]}" -v r="${OPEN99[redis]}" 'BEGIN { print (g <= r) }')") |

Held locks: $HOLD_LOCKS; idle connections: $IDLE_CONNS. Raw JSON reports: $OUT
EOF
echo "${NEWCOMER_TABLE:-}"
echo "${TLS_TABLE:-}"
