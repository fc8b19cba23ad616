# ublk-recovery: kill -9 the primary's daemon under a fio stream with
# verify on /dev/ublkb0, restart it: the device and fio live on (user
# recovery, requests in flight reissued), and fio finishes with no error.
. "$(dirname "$0")/common.sh"
modprobe ublk_drv
PAIR_UBLK=1 pair 160M
wait_for /dev/ublkb0
# The rate cap keeps the write pass at 12 s or more, so the kill at 3 s
# lands among writes in flight, not in the verify pass after them.
fio --name=recovery --filename=/dev/ublkb0 --direct=1 --ioengine=libaio \
    --rw=randwrite --bs=4k --iodepth=16 --size=24M --rate_iops=500 --verify=crc32c \
    --verify_fatal=1 --randrepeat=0 --eta=never --output="$dir/fio.out" &
fio_pid=$!
sleep 3
kill -0 "$fio_pid" || { echo "fio ended before the kill"; cat "$dir/fio.out"; exit 1; }
kill -9 "$(cat "$dir/alpha.pid")"
wait "$(cat "$dir/alpha.pid")" 2>/dev/null || true
echo "daemon killed under fio; restarting it"
sleep 1
start_node alpha
for _ in $(seq 600); do kill -0 "$fio_pid" 2>/dev/null || break; sleep 1; done
if kill -0 "$fio_pid" 2>/dev/null; then
    echo "fio hangs 10 min after the restart"; exit 1
fi
if ! wait "$fio_pid"; then
    echo "fio failed:"; cat "$dir/fio.out"; exit 1
fi
grep -q "resuming as Primary" "$dir/alpha.log" || { echo "no recovery in the log"; exit 1; }
grep -E "err= *0" "$dir/fio.out" | head -1
# The verify pass read everything back (24 MiB) and found it right.
grep -E "read: IOPS=.*\(24\.0MiB/" "$dir/fio.out" || { cat "$dir/fio.out"; exit 1; }
echo "fio finished with no error across the restart"
bm alpha status
bm alpha wait-sync --timeout 300 2>&1 | cat
bm alpha verify | tee "$dir/verify"
grep -q "the replicas are identical" "$dir/verify"
