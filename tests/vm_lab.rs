//! The VM lab scenarios (`scripts/vm-lab`), each in a fresh qemu guest on
//! a kernel that has the nbd and ublk_drv modules this machine's kernel
//! lacks, run with the binary this test build made. One guest at a time:
//! each wants both cores.

mod common;

use std::process::Command;
use std::sync::Mutex;

use common::skip;

static ONE_GUEST_AT_A_TIME: Mutex<()> = Mutex::new(());

fn scenario(name: &str) {
    let _turn = ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let top = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let status = Command::new(format!("{top}/scripts/vm-lab"))
        .args([name, env!("CARGO_BIN_EXE_blkmirror")])
        .status()
        .expect("scripts/vm-lab runs");
    match status.code() {
        Some(0) => {}
        Some(77) => skip(&format!("vm-lab {name}: the lab cannot be set up here")),
        _ => panic!("vm-lab scenario {name} failed ({status}); its console output is above"),
    }
}

/// The kernel's own NBD client on our export carries ext4 through a
/// failover: fsck clean, every file intact on the promoted secondary.
#[test]
fn kernel_nbd() {
    scenario("kernel-nbd");
}

/// ublk end to end: the primary's /dev/ublkb0 carries ext4, a device
/// open in another process or mounted blocks demotion, the secondary has no device until promoted
/// after the primary is killed; fsck clean, every file intact, and
/// demotion removes the device.
#[test]
fn ublk_ext4() {
    scenario("ublk-ext4");
}

/// kill -9 of the daemon under fio with verify: the restarted daemon
/// recovers /dev/ublkb0 and fio finishes with no error.
#[test]
fn ublk_recovery() {
    scenario("ublk-recovery");
}
