# ublk-ext4: the primary serves /dev/ublkb0 and carries ext4; the secondary
# has no device. The primary refuses to demote while a process holds the
# device open and under the mounted file system, then is killed; the
# secondary is promoted, serves /dev/ublkb1, and its copy passes fsck with
# every file intact. Demoting it waits out a brief opener and removes the
# device.
. "$(dirname "$0")/common.sh"
modprobe ublk_drv
PAIR_UBLK=1 pair 192M
wait_for /dev/ublkb0
[ ! -e /dev/ublkb1 ] || { echo "the secondary serves a ublk device"; exit 1; }
echo "secondary has no ublk device"
bm alpha status | grep -q "ublk device: /dev/ublkb0"
[ "$(cat /sys/block/ublkb0/mq/*/nr_tags | wc -l)" = 2 ] || { echo "not two queues"; exit 1; }
# The daemon runs in a mount namespace of its own.
[ "$(readlink /proc/"$(cat "$dir/alpha.pid")"/ns/mnt)" != "$(readlink /proc/self/ns/mnt)" ] ||
    { echo "the daemon shares our mount namespace"; exit 1; }
# What the device tells the kernel: a write cache (so flushes come), FUA,
# discard and write-zeroes.
q=/sys/block/ublkb0/queue
[ "$(cat $q/write_cache)" = "write back" ] && [ "$(cat $q/fua)" = 1 ] &&
    [ "$(cat $q/discard_granularity)" = 4096 ] && [ "$(cat $q/write_zeroes_max_bytes)" = 67108864 ] ||
    { grep . $q/write_cache $q/fua $q/discard_granularity $q/write_zeroes_max_bytes; exit 1; }
# Data round trip with FUA writes, then WRITE_ZEROES and DISCARD over
# parts of it (our discards read back as zeroes, so replicas stay
# identical). Files, not <(...): the guest has no /dev/fd.
head -c 4M /dev/urandom > "$dir/pattern"
head -c 1M /dev/zero > "$dir/zeroes"
dd if="$dir/pattern" of=/dev/ublkb0 bs=1M oflag=direct,dsync status=none
dd if=/dev/ublkb0 of="$dir/readback" bs=1M count=4 iflag=direct status=none
cmp "$dir/readback" "$dir/pattern"
blkdiscard -z -o 1048576 -l 1048576 /dev/ublkb0
blkdiscard -o 3145728 -l 1048576 /dev/ublkb0
dd if=/dev/ublkb0 of="$dir/readback" bs=1M count=4 iflag=direct status=none
cp "$dir/pattern" "$dir/expected"
dd if="$dir/zeroes" of="$dir/expected" bs=1M seek=1 conv=notrunc status=none
dd if="$dir/zeroes" of="$dir/expected" bs=1M seek=3 conv=notrunc status=none
cmp "$dir/readback" "$dir/expected"
echo "queue attributes, FUA writes, WRITE_ZEROES and DISCARD as expected"
# Any process with the device open blocks demotion, not only a mount,
# and the refusal names it.
sleep 600 < /dev/ublkb0 &
holder=$!
if bm alpha secondary 2>"$dir/refusal"; then
    echo "alpha demoted under an open device"; exit 1
fi
grep -q "open by pid $holder " "$dir/refusal" || { cat "$dir/refusal"; exit 1; }
echo "demotion refused while open: $(cat "$dir/refusal")"
kill "$holder"
wait "$holder" 2>/dev/null || true
mkfs.ext4 -q /dev/ublkb0
mkdir -p /mnt/a /mnt/b
mount /dev/ublkb0 /mnt/a
write_files /mnt/a
check_files /mnt/a
sync
if bm alpha secondary 2>"$dir/refusal"; then
    echo "alpha demoted under a mounted file system"; exit 1
fi
grep -q "in use" "$dir/refusal" || { cat "$dir/refusal"; exit 1; }
echo "demotion refused while mounted: $(cat "$dir/refusal")"
# Frozen, ext4 is clean on disk, as after an orderly stop of the writers.
fsfreeze -f /mnt/a
kill -9 "$(cat "$dir/alpha.pid")"
wait "$(cat "$dir/alpha.pid")" 2>/dev/null || true
echo "primary killed; promoting the secondary"
promote_after_failover beta
wait_for /dev/ublkb1
fsck.ext4 -f -n /dev/ublkb1
mount -o ro /dev/ublkb1 /mnt/b
check_files /mnt/b
echo "every file intact on the promoted secondary"
umount /mnt/b
# A brief opener, as a udev probe is, is waited for rather than refused.
sleep 1 < /dev/ublkb1 &
prober=$!
for _ in $(seq 50); do
    [ "$(readlink /proc/$prober/fd/0)" = /dev/ublkb1 ] && break
    sleep 0.1
done
[ "$(readlink /proc/$prober/fd/0)" = /dev/ublkb1 ] || { echo "the prober did not open the device"; exit 1; }
bm beta secondary
echo "demotion waited for a brief opener"
for _ in $(seq 100); do [ -e /dev/ublkb1 ] || break; sleep 0.1; done
[ ! -e /dev/ublkb1 ] || { echo "/dev/ublkb1 still exists after demotion"; exit 1; }
echo "demoted: /dev/ublkb1 removed"
