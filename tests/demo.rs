//! The README's first command, `scripts/demo`, runs `blkmirror demo`: it runs to completion.

mod common;

use std::process::Command;

/// `demo` builds its two-node resource, mirrors writes, resyncs the
/// difference after the secondary was away, fails over, and reports success.
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
        stdout.contains("beta's disk holds the same bytes as alpha's"),
        "{stdout}"
    );
    assert!(stdout.contains("resynced 4194304 bytes"), "{stdout}");
    assert!(
        stdout.contains("beta serves every byte alpha acknowledged"),
        "{stdout}"
    );
    assert!(stdout.contains("demo ok"), "{stdout}");
}
