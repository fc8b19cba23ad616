# Helpers for the lab scenarios (sourced inside the guest): a two-node
# resource on loopback, with disks in the guest's memory.
dir=/tmp/r0
mkdir -p "$dir"
bm() { local node=$1; shift; "$BLKMIRROR" -c "$dir/r0.toml" -n "$node" "$@"; }
nbd_client() {
    LD_LIBRARY_PATH="$LAB_ROOT/lib/x86_64-linux-gnu:$LAB_ROOT/usr/lib/x86_64-linux-gnu" \
        "$LAB_ROOT/sbin/nbd-client" "$@"
}
# start_node NODE: `up` in the background, its pid in $dir/NODE.pid (not
# through `bm`: $! must be the node itself, for kill -9); waits until it
# answers.
start_node() {
    BLKMIRROR_LOG=${LAB_LOG:-info} "$BLKMIRROR" -c "$dir/r0.toml" -n "$1" up 2>>"$dir/$1.log" &
    echo $! > "$dir/$1.pid"
    for _ in $(seq 200); do
        bm "$1" status >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "node $1 did not come up:"; cat "$dir/$1.log"; return 1
}
# pair SIZE: creates, starts and syncs alpha (primary) and beta. With
# PAIR_UBLK=1 each node has a ublk device: alpha /dev/ublkb0 (two queues),
# beta /dev/ublkb1 (one), served while primary.
pair() {
    ublk_alpha="" ublk_beta=""
    if [ "${PAIR_UBLK:-}" = 1 ]; then
        ublk_alpha="ublk = { id = 0, queues = 2, depth = 32 }" ublk_beta="ublk = { id = 1, depth = 32 }"
    fi
    cat > "$dir/r0.toml" <<EOF
name = "r0"
timeout = 3
[nodes.alpha]
disk = "$dir/alpha.img"
links = ["127.0.0.1:7801"]
control = "$dir/alpha.ctl"
nbd = "unix:$dir/alpha.nbd"
$ublk_alpha
[nodes.beta]
disk = "$dir/beta.img"
links = ["127.0.0.1:7802"]
control = "$dir/beta.ctl"
nbd = "unix:$dir/beta.nbd"
$ublk_beta
EOF
    truncate -s "$1" "$dir/alpha.img" "$dir/beta.img"
    bm alpha create-md >/dev/null
    bm beta create-md >/dev/null
    start_node alpha
    start_node beta
    bm alpha primary --force
    # Plain progress lines, not a bar: the console is a terminal.
    bm alpha wait-sync --timeout 600 2>&1 | cat
}
# promote NODE: `primary --force` once the node has noticed its primary is
# gone (until then it refuses: two primaries).
promote_after_failover() {
    for _ in $(seq 300); do
        bm "$1" primary --force 2>/dev/null && return
        sleep 0.1
    done
    bm "$1" primary --force
}
# wait_for PATH: until the device node exists (devtmpfs makes it).
wait_for() {
    for _ in $(seq 300); do
        [ -e "$1" ] && return
        sleep 0.1
    done
    echo "$1 did not appear"; return 1
}
# Known files: writes them under $1 and records their checksums.
write_files() {
    for i in $(seq 1 12); do
        head -c $((i * 300 * 1024)) /dev/urandom > "$1/file$i"
    done
    mkdir -p "$1/dir/sub"
    seq 1 100000 > "$1/dir/sub/numbers"
    (cd "$1" && find . -type f | sort | xargs sha256sum) > "$dir/sums"
}
check_files() {
    (cd "$1" && sha256sum --quiet -c "$dir/sums")
}
