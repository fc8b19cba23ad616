//! The server against an in-memory backend, driven by our client and by raw
//! bytes over an in-process pipe.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proto::*;
use crate::server::{serve_connection, Backend, BackendError};
use crate::{Client, ClientError};

struct MemDisk {
    data: Mutex<Vec<u8>>,
    refuse: Option<String>,
    attached: AtomicUsize,
    /// A write waits for a permit here before it lands.
    writes_let_through: tokio::sync::Semaphore,
    writes_begun: AtomicUsize,
    reads_done: AtomicUsize,
}

impl Backend for MemDisk {
    type Buf = Vec<u8>;
    fn export_name(&self) -> &str {
        "r0"
    }
    fn description(&self) -> String {
        "test disk".into()
    }
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn refusal(&self) -> Option<String> {
        self.refuse.clone()
    }
    fn attach(&self) -> Result<(), String> {
        self.refusal().map_or(Ok(()), Err)?;
        self.attached.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn detach(&self) {
        self.attached.fetch_sub(1, Ordering::SeqCst);
    }
    fn alloc(&self, len: usize) -> Vec<u8> {
        vec![0; len]
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, BackendError> {
        let d = self.data.lock().unwrap();
        self.reads_done.fetch_add(1, Ordering::SeqCst);
        Ok(d[offset as usize..offset as usize + len as usize].to_vec())
    }
    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> Result<(), BackendError> {
        self.writes_begun.fetch_add(1, Ordering::SeqCst);
        drop(self.writes_let_through.acquire().await.unwrap());
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    async fn zero(
        &self,
        offset: u64,
        len: u32,
        _unmap: bool,
        _fua: bool,
    ) -> Result<(), BackendError> {
        self.data.lock().unwrap()[offset as usize..offset as usize + len as usize].fill(0);
        Ok(())
    }
}

fn disk(refuse: Option<&str>) -> Arc<MemDisk> {
    Arc::new(MemDisk {
        data: Mutex::new(vec![0; 1 << 20]),
        refuse: refuse.map(str::to_string),
        attached: AtomicUsize::new(0),
        writes_let_through: tokio::sync::Semaphore::new(tokio::sync::Semaphore::MAX_PERMITS),
        writes_begun: AtomicUsize::new(0),
        reads_done: AtomicUsize::new(0),
    })
}

/// Waits (a bounded while) until `done` holds.
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{what} never came");
}

/// A server that stops aborts its connections' tasks: a write already
/// read still lands, and its client counts as attached until it has, so
/// the volume behind is not demoted or shut down under it.
#[tokio::test]
async fn an_aborted_connection_stays_attached_until_its_writes_land() {
    let backend = disk(None);
    backend.writes_let_through.forget_permits(usize::MAX);
    let (a, b) = tokio::io::duplex(1 << 16);
    let connection = tokio::spawn(serve_connection(b, backend.clone()));
    let mut client = Client::handshake(Box::new(a), "r0").await.unwrap();
    assert_eq!(backend.attached.load(Ordering::SeqCst), 1);
    let _writing = tokio::spawn(async move { client.write(4096, &[9; 512], false).await });
    wait_until("the write", || {
        backend.writes_begun.load(Ordering::SeqCst) == 1
    })
    .await;
    connection.abort();
    assert!(connection.await.unwrap_err().is_cancelled());
    assert_eq!(
        backend.attached.load(Ordering::SeqCst),
        1,
        "detached with a write under way"
    );
    backend.writes_let_through.add_permits(1);
    wait_until("the detachment", || {
        backend.attached.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(backend.data.lock().unwrap()[4096..4608], [9; 512]);
}

async fn connect(backend: Arc<MemDisk>, export: &str) -> Result<Client, ClientError> {
    let (a, b) = tokio::io::duplex(1 << 16);
    tokio::spawn(serve_connection(b, backend));
    Client::handshake(Box::new(a), export).await
}

#[tokio::test]
async fn write_read_trim_over_go() {
    let backend = disk(None);
    let mut c = connect(backend.clone(), "r0").await.unwrap();
    assert_eq!(c.size(), 1 << 20);
    assert_ne!(c.transmission_flags() & TFLAG_CAN_MULTI_CONN, 0);
    c.write(100, b"hello", true).await.unwrap();
    assert_eq!(c.read(100, 5).await.unwrap(), b"hello");
    c.trim(100, 2).await.unwrap();
    assert_eq!(c.read(100, 5).await.unwrap(), b"\0\0llo");
    c.flush().await.unwrap();
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn default_export_name_is_accepted_and_others_are_not() {
    assert!(connect(disk(None), "").await.is_ok());
    match connect(disk(None), "other").await {
        Err(ClientError::Refused { message, .. }) => assert!(message.contains("other")),
        other => panic!("expected refusal, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn refusal_reason_reaches_the_client() {
    match connect(disk(Some("node is Secondary")), "r0").await {
        Err(ClientError::Refused { message, .. }) => assert_eq!(message, "node is Secondary"),
        other => panic!("expected refusal, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn out_of_range_requests_fail_without_touching_data() {
    let backend = disk(None);
    let mut c = connect(backend.clone(), "r0").await.unwrap();
    let size = c.size();
    assert!(matches!(
        c.read(size - 1, 2).await,
        Err(ClientError::Request(22, _))
    ));
    assert!(matches!(
        c.write(size - 1, b"ab", false).await,
        Err(ClientError::Request(28, _))
    ));
    assert!(matches!(
        c.write_zeroes(size, 1, false).await,
        Err(ClientError::Request(28, _))
    ));
    // The connection is still usable afterwards.
    c.write(0, b"ok", false).await.unwrap();
    assert_eq!(c.read(0, 2).await.unwrap(), b"ok");
    assert!(backend.data.lock().unwrap()[2..].iter().all(|&b| b == 0));
}

/// Drives the raw handshake up to transmission with EXPORT_NAME.
async fn raw_export_name(stream: &mut tokio::io::DuplexStream) {
    let mut hello = [0u8; 18];
    stream.read_exact(&mut hello).await.unwrap();
    stream
        .write_u32(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)
        .await
        .unwrap();
    stream.write_u64(IHAVEOPT).await.unwrap();
    stream.write_u32(OPT_EXPORT_NAME).await.unwrap();
    stream.write_u32(2).await.unwrap();
    stream.write_all(b"r0").await.unwrap();
    assert_eq!(stream.read_u64().await.unwrap(), 1 << 20);
    stream.read_u16().await.unwrap();
}

#[tokio::test]
async fn unknown_command_gets_einval_and_garbage_closes() {
    let (mut a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(serve_connection(b, disk(None)));
    raw_export_name(&mut a).await;
    let unknown = RequestHeader {
        flags: 0,
        command: Command::Unknown(77),
        handle: 5,
        offset: 0,
        length: 0,
    };
    a.write_all(&unknown.encode()).await.unwrap();
    let mut reply = [0u8; 16];
    a.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply, simple_reply(5, Errno::Inval as u32));
    a.write_all(&[0xAB; 28]).await.unwrap();
    let mut rest = Vec::new();
    a.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert!(
        server.await.unwrap().is_err(),
        "garbage is reported as a protocol error"
    );
}

#[tokio::test]
async fn unsupported_options_get_err_unsup_and_negotiation_continues() {
    let (mut a, b) = tokio::io::duplex(1 << 16);
    tokio::spawn(serve_connection(b, disk(None)));
    let mut hello = [0u8; 18];
    a.read_exact(&mut hello).await.unwrap();
    a.write_u32(CLIENT_FLAG_FIXED_NEWSTYLE).await.unwrap();
    a.write_u64(IHAVEOPT).await.unwrap();
    a.write_u32(99).await.unwrap();
    a.write_u32(3).await.unwrap();
    a.write_all(b"xyz").await.unwrap();
    assert_eq!(a.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
    assert_eq!(a.read_u32().await.unwrap(), 99);
    assert_eq!(a.read_u32().await.unwrap(), REP_ERR_UNSUP);
    let len = a.read_u32().await.unwrap();
    let mut msg = vec![0u8; len as usize];
    a.read_exact(&mut msg).await.unwrap();
    // Still negotiating: LIST works.
    a.write_u64(IHAVEOPT).await.unwrap();
    a.write_u32(OPT_LIST).await.unwrap();
    a.write_u32(0).await.unwrap();
    assert_eq!(a.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
    assert_eq!(a.read_u32().await.unwrap(), OPT_LIST);
    assert_eq!(a.read_u32().await.unwrap(), REP_SERVER);
}

#[tokio::test]
async fn truncated_handshake_ends_quietly() {
    let (mut a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(serve_connection(b, disk(None)));
    let mut hello = [0u8; 18];
    a.read_exact(&mut hello).await.unwrap();
    a.write_all(&[0, 0]).await.unwrap(); // half of the client flags
    drop(a);
    assert!(server.await.unwrap().is_err());
}

/// A client that reads no replies holds up their writing, not its
/// attachment: once its requests are done, and the server stopping has
/// aborted the connection, it counts as attached no more, its replies
/// unsent.
#[tokio::test]
async fn a_client_that_reads_no_replies_does_not_stay_attached() {
    // More replies than the writer's queue and the executor's in-flight
    // limit hold, and far more bytes than the pipe.
    const READS: u64 = 300;
    let backend = disk(None);
    let (mut a, b) = tokio::io::duplex(1 << 16);
    let connection = tokio::spawn(serve_connection(b, backend.clone()));
    raw_export_name(&mut a).await;
    assert_eq!(backend.attached.load(Ordering::SeqCst), 1);
    // Far more reply bytes than the pipe holds.
    for handle in 0..READS {
        let read = RequestHeader {
            flags: 0,
            command: Command::Read,
            handle,
            offset: (handle % 256) << 12,
            length: 1 << 12,
        };
        a.write_all(&read.encode()).await.unwrap();
    }
    wait_until("the reads", || {
        backend.reads_done.load(Ordering::SeqCst) == READS as usize
    })
    .await;
    connection.abort();
    wait_until("the detachment", || {
        backend.attached.load(Ordering::SeqCst) == 0
    })
    .await;
    drop(a);
}
