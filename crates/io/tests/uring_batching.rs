//! The io_uring store submits entries in batches from its reaper task: an
//! entry must reach the kernel even when its caller stops waiting at once,
//! and a burst of requests on the production runtime (one thread) all
//! complete.

use std::time::{Duration, Instant};

use blkmirror_io::{AlignedBuf, Engine, Store};
use futures_util::FutureExt;

const DISK_BYTES: u64 = 4 << 20;

fn uring_store(dir: &std::path::Path) -> (Store, std::path::PathBuf) {
    let path = dir.join("d.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    let store = Store::open(&path, Engine::Uring).unwrap();
    assert_eq!(store.engine(), Engine::Uring, "io_uring must be available");
    (store, path)
}

#[tokio::test(flavor = "current_thread")]
async fn a_write_whose_caller_stops_waiting_still_reaches_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = uring_store(dir.path());
    let offset = 1 << 20;
    {
        // Polled once (the entry is pushed), then dropped before the
        // reaper has had a turn to submit it.
        let write = store.write(offset, AlignedBuf::from_slice(&[0xa5; 4096]), false);
        assert!(
            write.now_or_never().is_none(),
            "a write cannot finish without the reaper"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let disk = std::fs::read(&path).unwrap();
        if disk[offset as usize..offset as usize + 4096] == [0xa5; 4096] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned write never reached the disk"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_burst_of_small_and_large_requests_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = uring_store(dir.path());
    let store = std::sync::Arc::new(store);
    // 200 4 KiB writes (batched) and 4 writes of 256 KiB (submitted at
    // once), all in flight together, each with its own pattern.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let store = store.clone();
        tasks.spawn(async move {
            let data = AlignedBuf::from_slice(&[i as u8; 4096]);
            store.write(i * 4096, data, false).await.unwrap();
        });
    }
    for i in 0..4u64 {
        let store = store.clone();
        tasks.spawn(async move {
            let data = AlignedBuf::from_slice(&[0xf0 | i as u8; 256 << 10]);
            store
                .write((2 << 20) + i * (256 << 10), data, false)
                .await
                .unwrap();
        });
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        store.flush().await.unwrap();
    })
    .await
    .expect("every request completes");
    let disk = std::fs::read(&path).unwrap();
    for i in 0..200usize {
        assert!(
            disk[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8),
            "small write {i}"
        );
    }
    for i in 0..4usize {
        let start = (2 << 20) + i * (256 << 10);
        assert!(
            disk[start..start + (256 << 10)]
                .iter()
                .all(|&b| b == 0xf0 | i as u8),
            "large write {i}"
        );
    }
}
