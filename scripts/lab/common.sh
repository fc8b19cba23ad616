# Helpers for the lab scenarios (sourced inside the guest): a two-node
# resource on loopback, with disks in the guest's memory.
dir=/tmp/r0
mkdir -p "$dir"
bm() { local node=$1; shift; "$BLKMIRROR" -c "$dir/r0.toml" -n "$node" "$@"; }
nbd_client() {
    LD_LIBRARY_PATH="$LAB_ROOT/lib/x86_64-linux-gnu:$LAB_ROOT/usr/lib/x86_64-linux-gnu" \
        "$LAB_ROOT/sbin/nbd-client" "$@"
}
# pair SIZE: creates, starts and syncs alpha (primary) and beta.
pair() {
    cat > "$dir/r0.toml" <<EOF
name = "r0"
timeout = 3
[nodes.alpha]
disk = "$dir/alpha.img"
links = ["127.0.0.1:7801"]
control = "$dir/alpha.ctl"
nbd = "unix:$dir/alpha.nbd"
[nodes.beta]
disk = "$dir/beta.img"
links = ["127.0.0.1:7802"]
control = "$dir/beta.ctl"
nbd = "unix:$dir/beta.nbd"
EOF
    truncate -s "$1" "$dir/alpha.img" "$dir/beta.img"
    bm alpha create-md >/dev/null
    bm beta create-md >/dev/null
    for node in alpha beta; do
        # Not through `bm`: $! must be the node itself, for kill -9.
        "$BLKMIRROR" -c "$dir/r0.toml" -n "$node" up 2>"$dir/$node.log" &
        echo $! > "$dir/$node.pid"
    done
    for _ in $(seq 200); do
        bm alpha status >/dev/null 2>&1 && bm beta status >/dev/null 2>&1 && break
        sleep 0.1
    done
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
