//! The NBD frontend against real third-party clients (qemu-io, qemu-img,
//! nbdinfo, nbdcopy, fio's nbd engine, nbdsh), each talking to a real
//! `blkmirror up` process, plus hostile input on the raw socket.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// nbdsh with the system python that has the libnbd bindings.
fn nbdsh(script: &str) -> std::process::Output {
    Command::new("nbdsh")
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .args(["-c", script])
        .output()
        .unwrap()
}

/// Runs an nbdsh script that must succeed.
fn nbdsh_ok(script: &str) {
    let out = nbdsh(script);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn have_nbdsh() -> bool {
    if !have("nbdsh") {
        return false;
    }
    let ok = nbdsh("import nbd").status.success();
    if !ok {
        skip("nbdsh cannot import the nbd python module");
    }
    ok
}

/// qemu-io's patterns, zero writes, discards, FUA writes and flushes land
/// exactly where asked in the backing file, aligned or not.
#[test]
fn qemu_io_patterns_zeroes_discard_fua_flush() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let _alpha = res.primary("alpha");
    res.qemu_io(
        "alpha",
        &[
            "write -P 0xab 0 1M",
            "write -P 0x77 1M 1M",
            "write -P 0x66 2M 1M",
            "write -z 1M 1M",
            "discard 2M 1M",
            "write -f -P 0xcd 3M 64k",
            "write -P 0x11 12345 1000",
            "flush",
        ],
    );
    // Read back through a second client, then check the disk itself.
    res.qemu_io(
        "alpha",
        &[
            "read -P 0xab 0 12345",
            "read -P 0x11 12345 1000",
            "read -P 0xab 13345 1035231",
            "read -P 0 1M 1M",
            "read -P 0 2M 1M",
            "read -P 0xcd 3M 64k",
        ],
    );
    assert!(res.disk_holds("alpha", 0, 12345, 0xab));
    assert!(res.disk_holds("alpha", 12345, 1000, 0x11));
    assert!(res.disk_holds("alpha", 1 << 20, 2 << 20, 0));
    assert!(res.disk_holds("alpha", 3 << 20, 65536, 0xcd));
    // A wrong pattern must make qemu-io fail, or the reads above prove nothing.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &res.uri("alpha"), "-c", "read -P 0xee 0 4k"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "qemu-io accepted a wrong pattern");
}

/// The export's last byte is writable and one past it is refused with
/// qemu's view of the size matching the data area.
#[test]
fn qemu_io_respects_the_export_end() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let _alpha = res.primary("alpha");
    let last = DATA_BYTES - 4096;
    res.qemu_io(
        "alpha",
        &[
            &format!("write -P 0x5a {last} 4k"),
            &format!("read -P 0x5a {last} 4k"),
        ],
    );
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &res.uri("alpha"),
            "-c",
            &format!("write -P 1 {DATA_BYTES} 4k"),
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("write failed") && !text.contains("wrote 4096"),
        "a write past the end succeeded: {text}"
    );
    let length = res.qemu_io("alpha", &["length"]);
    assert_eq!(
        length.trim(),
        format!("{} MiB", DATA_BYTES >> 20),
        "qemu's view of the size"
    );
}

/// qemu-img converts a random image onto the export and back, and
/// qemu-img compare finds them identical.
#[test]
fn qemu_img_convert_and_compare() {
    if !have("qemu-img") {
        return;
    }
    let res = Resource::new();
    let _alpha = res.primary("alpha");
    let src = res.dir.path().join("src.raw");
    let mut data = vec![0u8; DATA_BYTES as usize];
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        if i % 3 != 0 {
            chunk.copy_from_slice(&pattern(7, (i << 20) as u64, chunk.len()));
        }
    }
    std::fs::write(&src, &data).unwrap();
    let uri = res.uri("alpha");
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));
    let back = res.dir.path().join("back.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "image read back differs"
    );
    // compare must notice a difference, or the check above is empty.
    res.ok("alpha", &["status"]);
    res.qemu_io("alpha", &["write -P 0x42 5M 4k"]);
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "compare missed a changed block");
}

/// nbdinfo reports the data-area size and the flags we advertise, and
/// --list names the export.
#[test]
fn nbdinfo_size_flags_and_list() {
    if !have("nbdinfo") {
        return;
    }
    let res = Resource::new();
    let _alpha = res.primary("alpha");
    let info: serde_json::Value = serde_json::from_str(&run(
        Command::new("nbdinfo").args(["--json", &res.uri("alpha")])
    ))
    .unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], DATA_BYTES);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(export[flag], true, "{flag} in {export}");
    }
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["block_size_maximum"], 32 << 20);
    let socket = res.nbd_socket("alpha");
    let list = run(Command::new("nbdinfo").args([
        "--list",
        "--json",
        &format!("nbd+unix://?socket={}", socket.display()),
    ]));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [RESOURCE]);
}

/// nbdcopy with several connections copies a file onto the export and back
/// out, byte for byte (CAN_MULTI_CONN in real use).
#[test]
fn nbdcopy_both_ways_with_several_connections() {
    if !have("nbdcopy") {
        return;
    }
    let res = Resource::new();
    let _alpha = res.primary("alpha");
    let src = res.dir.path().join("src.raw");
    let data = pattern(3, 0, DATA_BYTES as usize);
    std::fs::write(&src, &data).unwrap();
    let uri = res.uri("alpha");
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=16"])
        .arg(&src)
        .arg(&uri));
    let out = res.dir.path().join("out.raw");
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=16", &uri])
        .arg(&out));
    assert!(
        std::fs::read(&out).unwrap() == data,
        "nbdcopy round trip differs"
    );
    assert!(res.data_on_disk("alpha", 0, 1 << 20) == data[..1 << 20]);
}

/// fio's nbd engine writes random 4 KiB blocks at depth 16 and verifies
/// every one with crc32c.
#[test]
fn fio_nbd_engine_verifies_crc32c() {
    if !have("fio") {
        return;
    }
    let res = Resource::new();
    let _alpha = res.primary("alpha");
    let out = run(&mut res.fio(
        "alpha",
        &[
            "--name=verify",
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    ));
    let json_start = out.find('{').expect("fio printed JSON");
    let report: serde_json::Value = serde_json::from_str(&out[json_start..]).unwrap();
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 16 << 20);
    assert_eq!(
        job["read"]["io_bytes"],
        16 << 20,
        "verify phase read everything back"
    );
}

/// One zeroing request over the whole volume, more extents than the
/// activity log holds (16), is split to fit, and reaches both disks.
#[test]
fn zeroing_more_than_the_activity_log_holds() {
    if !have_nbdsh() || !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    res.set("al-extents", "16");
    let (_alpha, _beta) = synced_pair(&res);
    res.qemu_io("alpha", &["write -P 0x6d 0 63M"]);
    assert!(res.disk_holds("beta", 0, DATA_BYTES as usize, 0x6d));
    let script = format!(
        "h.connect_uri('{}')\n\
         h.zero({DATA_BYTES}, 0, nbd.CMD_FLAG_NO_HOLE)\n\
         h.trim({DATA_BYTES}, 0)\n\
         h.flush()\n",
        res.uri("alpha")
    );
    nbdsh_ok(&script);
    assert!(res.disk_holds("beta", 0, DATA_BYTES as usize, 0));
    res.assert_identical();
    let status = res.status("alpha");
    assert_eq!(status["out_of_sync_bytes"], 0, "{status}");
    assert_eq!(status["replication"], "Established", "{status}");
}

/// The old NBD_OPT_EXPORT_NAME path (non-fixed newstyle, 124 zero bytes)
/// works for libnbd.
#[test]
fn nbdsh_export_name_path() {
    if !have_nbdsh() {
        return;
    }
    let res = Resource::new();
    let _alpha = res.primary("alpha");
    let script = format!(
        "h.set_handshake_flags(0)\n\
         h.connect_uri('{}')\n\
         assert h.get_protocol() == 'newstyle', h.get_protocol()\n\
         assert h.get_size() == {DATA_BYTES}\n\
         h.pwrite(b'\\x5c' * 8192, 40960)\n\
         h.flush()\n\
         assert h.pread(8192, 40960) == b'\\x5c' * 8192\n\
         h.shutdown()\n",
        res.uri("alpha")
    );
    nbdsh_ok(&script);
    assert!(res.disk_holds("alpha", 40960, 8192, 0x5c));
}

/// A client that dies with many requests in flight neither crashes the node
/// nor leaves it counting a ghost client; the next client is served.
#[test]
fn client_dying_with_requests_in_flight() {
    if !have_nbdsh() {
        return;
    }
    let res = Resource::new();
    let mut alpha = res.primary("alpha");
    let script = format!(
        "import os\n\
         h.connect_uri('{}')\n\
         buf = nbd.Buffer.from_bytearray(bytearray(b'\\x01' * 1048576))\n\
         for i in range(48):\n\
         \x20   h.aio_pwrite(buf, i * 1048576)\n\
         for i in range(48):\n\
         \x20   h.aio_pread(nbd.Buffer(1048576), i * 1048576)\n\
         os._exit(0)\n",
        res.uri("alpha")
    );
    nbdsh_ok(&script);
    assert!(alpha.is_running(), "node died: {}", alpha.log());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = res.json("alpha", &["status", "--json"]);
        if status["nbd_clients"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dead client still counted: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The next client is served.
    let mut next = raw_transmission(&res);
    request(&mut next, 3, 0, 7, 0, 0);
    assert_eq!(reply(&mut next), (0, 7), "a flush after the dead client");
}

/// Reads the fixed-newstyle greeting and completes EXPORT_NAME on a raw socket.
fn raw_transmission(res: &Resource) -> UnixStream {
    let mut s = UnixStream::connect(res.nbd_socket("alpha")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    s.write_all(b"IHAVEOPT").unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    s.write_all(&(RESOURCE.len() as u32).to_be_bytes()).unwrap();
    s.write_all(RESOURCE.as_bytes()).unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    assert_eq!(
        u64::from_be_bytes(export[..8].try_into().unwrap()),
        DATA_BYTES
    );
    s
}

fn request(s: &mut UnixStream, ty: u16, flags: u16, handle: u64, offset: u64, len: u32) {
    let mut h = Vec::with_capacity(28);
    h.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&ty.to_be_bytes());
    h.extend_from_slice(&handle.to_be_bytes());
    h.extend_from_slice(&offset.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    s.write_all(&h).unwrap();
}

/// Returns (error, handle) of a simple reply.
fn reply(s: &mut UnixStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(r[..4], 0x6744_6698u32.to_be_bytes());
    (
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
    )
}

/// True when the server hung up (end of stream or reset) within the read timeout.
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Out-of-range, oversize and unknown requests get the spec's errors, the
/// connection survives them, and no byte outside the request changes.
#[test]
fn bad_requests_get_errors_and_touch_nothing() {
    let res = Resource::new();
    let mut alpha = res.primary("alpha");
    let before = std::fs::read(res.disk("alpha")).unwrap();
    let mut s = raw_transmission(&res);
    request(&mut s, 0, 0, 1, DATA_BYTES - 1, 2); // read past the end
    assert_eq!(reply(&mut s), (22, 1), "EINVAL");
    request(&mut s, 0, 0, 2, u64::MAX - 1, 4096); // offset overflow
    assert_eq!(reply(&mut s), (22, 2));
    request(&mut s, 0, 0, 3, 0, (32 << 20) + 1); // oversize read
    assert_eq!(reply(&mut s), (75, 3), "EOVERFLOW");
    request(&mut s, 1, 0, 4, DATA_BYTES, 4); // write past the end, with payload
    s.write_all(&[0xEE; 4]).unwrap();
    assert_eq!(reply(&mut s), (28, 4), "ENOSPC");
    request(&mut s, 6, 0, 5, DATA_BYTES - 4096, 8192); // zeroes past the end
    assert_eq!(reply(&mut s), (28, 5));
    request(&mut s, 4, 0, 6, DATA_BYTES, 1); // trim past the end
    assert_eq!(reply(&mut s), (22, 6));
    request(&mut s, 99, 0, 7, 0, 0); // unknown command
    assert_eq!(reply(&mut s), (22, 7));
    request(&mut s, 0, 1 << 7, 8, 0, 512); // flag we never advertised
    assert_eq!(reply(&mut s), (22, 8));
    // Still usable after all of that.
    request(&mut s, 3, 0, 9, 0, 0);
    assert_eq!(reply(&mut s), (0, 9));
    // An oversize write cannot be skipped safely: the server hangs up.
    request(&mut s, 1, 0, 10, 0, 64 << 20);
    assert!(closed(&mut s), "oversize write left the connection open");
    assert!(alpha.is_running());
    assert!(
        std::fs::read(res.disk("alpha")).unwrap() == before,
        "a refused request changed the disk"
    );
}

/// Garbage instead of a handshake, a truncated handshake and a garbage
/// request header each end only their own connection.
#[test]
fn garbage_and_truncated_handshakes_end_only_their_connection() {
    let res = Resource::new();
    let mut alpha = res.primary("alpha");
    // Garbage client flags (unknown bits).
    let mut s = UnixStream::connect(res.nbd_socket("alpha")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(closed(&mut s));
    // Truncated: half the client flags, then hang up.
    let mut s = UnixStream::connect(res.nbd_socket("alpha")).unwrap();
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&[0, 0]).unwrap();
    drop(s);
    // Garbage in place of a request.
    let mut s = raw_transmission(&res);
    s.write_all(&[0x5A; 28]).unwrap();
    assert!(closed(&mut s));
    assert!(alpha.is_running(), "{}", alpha.log());
    let mut s = raw_transmission(&res);
    request(&mut s, 3, 0, 1, 0, 0);
    assert_eq!(reply(&mut s), (0, 1), "the node still serves new clients");
}

/// The export is also served over TCP.
#[test]
fn tcp_export_works() {
    if !have("qemu-io") {
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let res = Resource::with_nbd(|_, node| {
        if node == "alpha" {
            format!("tcp:127.0.0.1:{port}")
        } else {
            "tcp:127.0.0.1:1".to_string()
        }
    });
    let _alpha = res.primary("alpha");
    let uri = format!("nbd://127.0.0.1:{port}/{RESOURCE}");
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x21 0 64k",
        "-c",
        "read -P 0x21 0 64k",
    ]));
    assert!(res.disk_holds("alpha", 0, 65536, 0x21));
}

/// The secondary's export refuses third-party clients with a reason.
#[test]
fn secondary_refuses_nbdinfo() {
    if !have("nbdinfo") {
        return;
    }
    let res = Resource::new();
    res.ok("alpha", &["create-md"]);
    let _alpha = res.up("alpha");
    // libnbd prints the server's reason only in its debug log.
    let out = Command::new("nbdinfo")
        .env("LIBNBD_DEBUG", "1")
        .arg(res.uri("alpha"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Secondary"), "{stderr}");
}

/// A loop device attached for the length of a test.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &std::path::Path) -> Option<LoopDevice> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            skip(&format!(
                "cannot attach a loop device ({}); needs root and the loop module",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return None;
        }
        Some(LoopDevice(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["--detach", &self.0]).status();
    }
}

/// A real block device as the disk: sized by the kernel, O_DIRECT, and
/// discard / write-zeroes through fallocate on the device, all read back
/// as zeroes.
#[test]
fn block_device_disk() {
    if !have("losetup") || !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let Some(device) = LoopDevice::attach(&res.disk("alpha")) else {
        return;
    };
    let text = std::fs::read_to_string(&res.config).unwrap();
    let text = text.replace(&res.disk("alpha").display().to_string(), &device.0);
    std::fs::write(&res.config, text).unwrap();
    let alpha = res.primary("alpha");
    let status = res.json("alpha", &["status", "--json"]);
    assert_eq!(status["data_size"], DATA_BYTES, "{status}");
    res.qemu_io(
        "alpha",
        &[
            "write -P 0x99 0 4M",
            "discard 1M 1M",
            "write -z 2M 512k",
            "write -P 0x98 12345 777",
            "flush",
            "read -P 0x99 0 12345",
            "read -P 0x98 12345 777",
            "read -P 0 1M 1M",
            "read -P 0 2M 512k",
            "read -P 0x99 2560k 1536k",
        ],
    );
    res.down("alpha", alpha);
    // What the device holds is what the backing file of the loop device holds.
    assert!(res.disk_holds("alpha", 1 << 20, 1 << 20, 0));
    assert!(res.disk_holds("alpha", 3 << 20, 1 << 20, 0x99));
}
