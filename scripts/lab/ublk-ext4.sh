# ublk-ext4: the primary serves /dev/ublkb0 and carries ext4; the secondary
# has no device. The primary refuses to demote under the mounted file
# system, then is killed; the secondary is promoted, serves /dev/ublkb1,
# and its copy passes fsck with every file intact. Demoting it removes the
# device.
. "$(dirname "$0")/common.sh"
modprobe ublk_drv
PAIR_UBLK=1 pair 192M
wait_for /dev/ublkb0
[ ! -e /dev/ublkb1 ] || { echo "the secondary serves a ublk device"; exit 1; }
echo "secondary has no ublk device"
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
bm beta secondary
for _ in $(seq 100); do [ -e /dev/ublkb1 ] || break; sleep 0.1; done
[ ! -e /dev/ublkb1 ] || { echo "/dev/ublkb1 still exists after demotion"; exit 1; }
echo "demoted: /dev/ublkb1 removed"
