# bench-block-devices: fio on our ublk device and through the kernel's NBD
# client on our export, against the same fio on a loop device over the same
# backing file. Under TCG only the ratios mean anything.
. "$(dirname "$0")/common.sh"
modprobe nbd nbds_max=2
modprobe loop
modprobe ublk_drv
runtime=${LAB_BENCH_RUNTIME:-10}
cat > "$dir/r0.toml" <<EOF
name = "r0"
[nodes.alpha]
disk = "$dir/alpha.img"
links = ["127.0.0.1:7801"]
control = "$dir/alpha.ctl"
nbd = "unix:$dir/alpha.nbd"
ublk = { id = 0, queues = 1, depth = 64 }
[nodes.beta]
disk = "$dir/beta.img"
links = ["127.0.0.1:7802"]
control = "$dir/beta.ctl"
nbd = "unix:$dir/beta.nbd"
EOF
# Preallocated, so neither side pays for allocating blocks.
fallocate -l 257M "$dir/alpha.img"
bm alpha create-md >/dev/null
"$BLKMIRROR" -c "$dir/r0.toml" -n alpha up 2>"$dir/alpha.log" &
for _ in $(seq 100); do bm alpha status >/dev/null 2>&1 && break; sleep 0.1; done
bm alpha primary --force
nbd_client -unix "$dir/alpha.nbd" /dev/nbd0 -N r0 >/dev/null
wait_for /dev/ublkb0
# The loop device sees the same bytes: the data area after the 1 MiB of
# metadata.
loop=$(losetup --find --show --direct-io=on --offset $((1 << 20)) "$dir/alpha.img")
run() { # DEVICE RW BS DEPTH -> IOPS
    fio --name=b --filename="$1" --direct=1 --ioengine=libaio --rw="$2" --bs="$3" \
        --iodepth="$4" --size=192M --time_based --runtime="$runtime" --ramp_time=1 \
        --norandommap --randrepeat=0 --output-format=terse 2>/dev/null |
        tail -1 | awk -F';' '{print $8 + $49}'
}
for job in "randwrite 4k 32" "randread 4k 32" "write 1M 8" "read 1M 8"; do
    set -- $job
    loop_iops=$(run "$loop" "$1" "$2" "$3")
    ublk_iops=$(run /dev/ublkb0 "$1" "$2" "$3")
    nbd_iops=$(run /dev/nbd0 "$1" "$2" "$3")
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
    echo "LAB-BENCH $1 bs=$2 qd=$3: loop $loop_iops, ublk $ublk_iops, kernel NBD $nbd_iops IOPS;" \
        "ublk/loop $(ratio "$ublk_iops" "$loop_iops")," \
        "NBD/loop $(ratio "$nbd_iops" "$loop_iops")," \
        "ublk/NBD $(ratio "$ublk_iops" "$nbd_iops")"
done
nbd_client -d /dev/nbd0 >/dev/null
losetup -d "$loop"
