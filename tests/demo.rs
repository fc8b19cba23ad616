//! The README's first command, `blkmirror demo`, runs to completion.

mod common;

use std::process::Command;

/// `demo` builds its two-node resource, writes and reads back through NBD,
/// restarts the primary, and reports success.
#[test]
fn demo_runs_to_completion() {
    let out = Command::new(common::BIN).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("refused: demo is Secondary on node beta"),
        "{stdout}"
    );
    assert!(
        stdout.contains("after the restart every byte still matches"),
        "{stdout}"
    );
    assert!(stdout.contains("demo ok"), "{stdout}");
}
