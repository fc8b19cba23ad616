//! The VM lab scenarios (`scripts/vm-lab`), each in a fresh qemu guest on
//! a kernel that has the nbd module this machine's kernel lacks, run with
//! the binary this test build made.

mod common;

use std::process::Command;

use common::skip;

fn scenario(name: &str) {
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
