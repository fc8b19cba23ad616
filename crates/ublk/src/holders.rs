//! Which processes hold a block device open. The kernel counts a block
//! device's openers but does not say who they are, so this looks through
//! every process's open files, as `fuser` does.

use std::fmt;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// A process with the device open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its command name, as `ps` shows it.
    pub command: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.command)
    }
}

/// The processes other than this one that hold block device `rdev` open
/// through a node under /dev, by pid. Only files whose path is under /dev
/// are examined, so a hung FUSE server elsewhere cannot stall the search.
/// A process that ends while we look is skipped.
pub fn holders(rdev: u64) -> Vec<Holder> {
    let me = std::process::id();
    let Ok(processes) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<Holder> = processes
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            (pid != me && holds(&entry.path(), rdev)).then(|| Holder {
                pid,
                command: fs::read_to_string(entry.path().join("comm"))
                    .map(|c| c.trim_end().to_string())
                    .unwrap_or_default(),
            })
        })
        .collect();
    found.sort_by_key(|h| h.pid);
    found
}

/// The holders of `rdev` that still hold it after up to `grace`. Probes
/// such as udev's and blkid's open a device for a moment, so a holder
/// that closes within `grace` is not one to refuse for.
pub fn lasting_holders(rdev: u64, grace: Duration) -> Vec<Holder> {
    let deadline = Instant::now() + grace;
    loop {
        let found = holders(rdev);
        if found.is_empty() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(RECHECK_INTERVAL.min(deadline - Instant::now()));
    }
}

/// How often `lasting_holders` looks again.
const RECHECK_INTERVAL: Duration = Duration::from_millis(50);

/// Whether the process at `/proc/PID` has block device `rdev` open.
fn holds(process: &Path, rdev: u64) -> bool {
    let Ok(fds) = fs::read_dir(process.join("fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path()).is_ok_and(|target| target.starts_with("/dev"))
            && fs::metadata(fd.path())
                .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == rdev)
    })
}

/// "pid 1 (a), pid 2 (b)".
pub fn describe(holders: &[Holder]) -> String {
    holders
        .iter()
        .map(Holder::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Says why a test is skipped, on stderr directly: the test harness
    /// captures `eprintln!`.
    fn skip(reason: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "skipped: {reason}");
    }

    /// Runs these tests one at a time: a child that one test spawns holds
    /// copies of the other test's open files until it execs, so running
    /// together each could see the other's children as holders.
    fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A loop device over a small file, detached on drop.
    struct LoopDevice(String);

    impl LoopDevice {
        fn new(backing: &Path) -> Option<LoopDevice> {
            let out = Command::new("losetup")
                .args(["--find", "--show"])
                .arg(backing)
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| LoopDevice(String::from_utf8_lossy(&out.stdout).trim().to_string()))
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }

    /// A loop device over a 1 MiB file in `dir`, and its device number;
    /// `None` (after saying why) where none can be attached.
    fn loop_device(dir: &Path) -> Option<(LoopDevice, u64)> {
        let backing = dir.join("disk");
        fs::write(&backing, vec![0u8; 1 << 20]).unwrap();
        let Some(device) = LoopDevice::new(&backing) else {
            skip("no loop device to attach here (needs root, loop and losetup)");
            return None;
        };
        let rdev = fs::metadata(&device.0).unwrap().rdev();
        Some((device, rdev))
    }

    #[test]
    fn a_process_holding_a_block_device_is_found_and_this_one_is_not() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let Some((device, rdev)) = loop_device(dir.path()) else {
            return;
        };
        let ours = fs::File::open(&device.0).unwrap();
        assert!(holders(rdev).is_empty(), "this process is left out");

        let mut holder = Command::new("sleep")
            .arg("30")
            .stdin(fs::File::open(&device.0).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let found = holders(rdev);
        assert_eq!(
            found,
            vec![Holder {
                pid: holder.id(),
                command: "sleep".into()
            }]
        );
        assert_eq!(describe(&found), format!("pid {} (sleep)", holder.id()));

        holder.kill().unwrap();
        holder.wait().unwrap();
        assert!(holders(rdev).is_empty(), "gone with its process");
        drop(ours);
    }

    #[test]
    fn a_brief_holder_is_waited_for_and_a_lasting_one_is_not() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let Some((device, rdev)) = loop_device(dir.path()) else {
            return;
        };
        let hold = |seconds: &str| {
            Command::new("sleep")
                .arg(seconds)
                .stdin(fs::File::open(&device.0).unwrap())
                .spawn()
                .unwrap()
        };

        // Like a udev probe: it closes the device well within the grace.
        let mut brief = hold("0.3");
        assert_eq!(holders(rdev).len(), 1);
        let started = Instant::now();
        assert!(lasting_holders(rdev, Duration::from_secs(10)).is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "did not wait it out"
        );
        brief.wait().unwrap();

        let mut lasting = hold("30");
        let started = Instant::now();
        let found = lasting_holders(rdev, Duration::from_millis(300));
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(
            found.iter().map(|h| h.pid).collect::<Vec<_>>(),
            vec![lasting.id()]
        );
        lasting.kill().unwrap();
        lasting.wait().unwrap();
    }
}
