# kernel-nbd: the Linux kernel's NBD client, attached to the primary's
# export, carries ext4; the primary is killed, the secondary is promoted and
# exported, and its copy passes fsck with every file intact.
. "$(dirname "$0")/common.sh"
modprobe nbd nbds_max=4
pair 192M
nbd_client -unix "$dir/alpha.nbd" /dev/nbd0 -N r0
mkfs.ext4 -q /dev/nbd0
mkdir -p /mnt/a /mnt/b
mount /dev/nbd0 /mnt/a
write_files /mnt/a
check_files /mnt/a
sync
# Frozen, ext4 is clean on disk, as after an orderly stop of the writers.
fsfreeze -f /mnt/a
kill -9 "$(cat "$dir/alpha.pid")"
wait "$(cat "$dir/alpha.pid")" 2>/dev/null || true
echo "primary killed; promoting the secondary"
promote_after_failover beta
nbd_client -unix "$dir/beta.nbd" /dev/nbd1 -N r0
fsck.ext4 -f -n /dev/nbd1
mount -o ro /dev/nbd1 /mnt/b
check_files /mnt/b
echo "every file intact on the promoted secondary"
umount /mnt/b
nbd_client -d /dev/nbd1
