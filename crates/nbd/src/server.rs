//! The NBD server: fixed-newstyle handshake, then a transmission phase in
//! which requests run concurrently and replies go out as they complete.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::proto::*;

/// Requests one connection may have in flight; beyond that the reader stops
/// taking more until one completes (back-pressure to the client's socket).
pub const IN_FLIGHT_PER_CONNECTION_MAX: usize = 128;
/// Requests read but not yet started, between the reader and the executor.
const REQUEST_QUEUE_MAX: usize = 16;
/// Bytes of request data (write payloads and read results) one connection
/// may hold at once, counted in units: a client cannot make the node
/// allocate more than this, whatever it sends.
const BUDGET_UNIT_BYTES: u32 = 64 * 1024;
const BUDGET_UNITS_PER_CONNECTION: usize = 2048; // 128 MiB
const _: () = assert!(PAYLOAD_MAX_BYTES / BUDGET_UNIT_BYTES <= BUDGET_UNITS_PER_CONNECTION as u32);
/// Socket reads are buffered so a burst of small requests costs one syscall.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Replies are buffered so the read replies that are ready together go out
/// in one syscall (63 of 4 KiB); a larger read's data bypasses the buffer.
const REPLY_BUFFER_BYTES: usize = 256 * 1024;
/// A client that has not finished the handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// An error for the client: the NBD error value and a line for the log.
#[derive(Debug, Clone)]
pub struct BackendError {
    pub errno: Errno,
    pub message: String,
}

/// What the NBD server needs from the volume it exports.
pub trait Backend: Send + Sync + 'static {
    /// A buffer the backend can do I/O from (e.g. aligned for O_DIRECT).
    type Buf: AsRef<[u8]> + AsMut<[u8]> + Send + 'static;

    fn export_name(&self) -> &str;
    fn description(&self) -> String;
    fn size(&self) -> u64;
    /// `Some(reason)` when this node must not serve I/O now (e.g. it is
    /// secondary): NBD_OPT_INFO is refused with that reason.
    fn refusal(&self) -> Option<String>;
    /// Admits a client into the transmission phase, or refuses it with a
    /// reason; checked and counted in one step, so a demotion cannot slip
    /// between the check and the count.
    fn attach(&self) -> Result<(), String>;
    /// The attached client has gone.
    fn detach(&self);
    fn alloc(&self, len: usize) -> Self::Buf;
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Self::Buf, BackendError>> + Send;
    fn write(
        &self,
        offset: u64,
        data: Self::Buf,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Zeroes a range; `unmap` allows deallocating it (TRIM, or WRITE_ZEROES
    /// without NO_HOLE).
    fn zero(
        &self,
        offset: u64,
        len: u32,
        unmap: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("Connection I/O failed")]
    Io(#[from] std::io::Error),
    #[error("Client broke the protocol: {0}")]
    Protocol(String),
    #[error("Client did not finish the handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error(transparent)]
    Fatal(#[from] FatalRequest),
}

/// Serves one client connection to completion.
pub async fn serve_connection<S, B>(stream: S, backend: Arc<B>) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    B: Backend,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let mut writer = reply_writer(writer);
    let negotiated = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake(&mut reader, &mut writer, &backend),
    )
    .await
    .map_err(|_| ConnectionError::HandshakeTimeout(HANDSHAKE_TIMEOUT))??;
    let Some((structured, attachment)) = negotiated else {
        return Ok(()); // the client aborted or asked for nothing more
    };
    transmission(reader, writer, attachment, structured).await
}

/// A client admitted by [`Backend::attach`]; detaches when dropped.
struct Attachment<B: Backend>(Arc<B>);

impl<B: Backend> Attachment<B> {
    fn new(backend: &Arc<B>) -> Result<Attachment<B>, String> {
        backend.attach()?;
        Ok(Attachment(backend.clone()))
    }
}

impl<B: Backend> Drop for Attachment<B> {
    fn drop(&mut self) {
        self.0.detach();
    }
}

const TRANSMISSION_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    // A flush is an fdatasync of the one backing file, so it covers writes
    // acknowledged on every connection.
    | TFLAG_CAN_MULTI_CONN;

/// Returns `Some((structured_replies, attachment))` when the client entered
/// transmission.
async fn handshake<R, W, B>(
    reader: &mut R,
    writer: &mut W,
    backend: &Arc<B>,
) -> Result<Option<(bool, Attachment<B>)>, ConnectionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    B: Backend,
{
    writer.write_u64(NBDMAGIC).await?;
    writer.write_u64(IHAVEOPT).await?;
    writer
        .write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .await?;
    writer.flush().await?;
    let client_flags = reader.read_u32().await?;
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(ConnectionError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & CLIENT_FLAG_NO_ZEROES != 0;
    let mut structured = false;
    for _ in 0..OPTIONS_PER_CONNECTION_MAX {
        let magic = reader.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(ConnectionError::Protocol(format!(
                "bad option magic {magic:#x}"
            )));
        }
        let option = reader.read_u32().await?;
        let len = reader.read_u32().await?;
        let mut reply = OptionReply {
            writer: &mut *writer,
            option,
        };
        if len > OPTION_DATA_MAX_BYTES {
            if len > OPTION_DRAIN_MAX_BYTES {
                return Err(ConnectionError::Protocol(format!(
                    "option {option} carries {len} bytes"
                )));
            }
            tokio::io::copy(
                &mut (&mut *reader).take(u64::from(len)),
                &mut tokio::io::sink(),
            )
            .await?;
            reply
                .error(REP_ERR_TOO_BIG, "option data too large")
                .await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        reader.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                // No way to report an error on this path: unknown names and
                // refusals close the connection, as the spec says.
                if !name_matches(&**backend, &data) {
                    return Err(ConnectionError::Protocol(
                        "EXPORT_NAME for an unknown export".into(),
                    ));
                }
                let attachment = Attachment::new(backend).map_err(|reason| {
                    ConnectionError::Protocol(format!("EXPORT_NAME refused: {reason}"))
                })?;
                writer.write_u64(backend.size()).await?;
                writer.write_u16(TRANSMISSION_FLAGS).await?;
                if !no_zeroes {
                    writer.write_all(&[0u8; 124]).await?;
                }
                writer.flush().await?;
                return Ok(Some((false, attachment)));
            }
            OPT_ABORT => {
                reply.send(REP_ACK, &[]).await?;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply.error(REP_ERR_INVALID, "LIST takes no data").await?;
                    continue;
                }
                let name = backend.export_name().as_bytes();
                let mut entry = (name.len() as u32).to_be_bytes().to_vec();
                entry.extend_from_slice(name);
                entry.extend_from_slice(backend.description().as_bytes());
                reply.send(REP_SERVER, &entry).await?;
                reply.send(REP_ACK, &[]).await?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply
                        .error(REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                        .await?;
                    continue;
                }
                structured = true;
                reply.send(REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some(name) = parse_info_request(&data) else {
                    reply
                        .error(REP_ERR_INVALID, "malformed INFO/GO request")
                        .await?;
                    continue;
                };
                if !name_matches(&**backend, name) {
                    let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
                    reply.error(REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                }
                let admitted = if option == OPT_GO {
                    Attachment::new(backend).map(Some)
                } else {
                    backend.refusal().map_or(Ok(None), Err)
                };
                let attachment = match admitted {
                    Ok(a) => a,
                    Err(reason) => {
                        reply.error(REP_ERR_POLICY, &reason).await?;
                        continue;
                    }
                };
                send_infos(&mut reply, &**backend).await?;
                reply.send(REP_ACK, &[]).await?;
                if let Some(attachment) = attachment {
                    return Ok(Some((structured, attachment)));
                }
            }
            OPT_STARTTLS => reply.error(REP_ERR_UNSUP, "TLS is not supported").await?,
            _ => reply.error(REP_ERR_UNSUP, "option not supported").await?,
        }
    }
    Err(ConnectionError::Protocol(format!(
        "more than {OPTIONS_PER_CONNECTION_MAX} options"
    )))
}

fn name_matches<B: Backend>(backend: &B, name: &[u8]) -> bool {
    // The empty name selects the default export, which is our only one.
    name.is_empty() || name == backend.export_name().as_bytes()
}

/// Returns the export name of an INFO/GO payload (the info requests are
/// ignored: we send every info we have).
fn parse_info_request(data: &[u8]) -> Option<&[u8]> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let count_at = 4 + name_len;
    let count = u16::from_be_bytes(data.get(count_at..count_at + 2)?.try_into().ok()?) as usize;
    (data.len() == count_at + 2 + 2 * count).then_some(name)
}

async fn send_infos<W: AsyncWrite + Unpin, B: Backend>(
    reply: &mut OptionReply<'_, W>,
    backend: &B,
) -> std::io::Result<()> {
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&backend.size().to_be_bytes());
    export.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    reply.send(REP_INFO, &export).await?;
    let mut name = INFO_NAME.to_be_bytes().to_vec();
    name.extend_from_slice(backend.export_name().as_bytes());
    reply.send(REP_INFO, &name).await?;
    let mut description = INFO_DESCRIPTION.to_be_bytes().to_vec();
    description.extend_from_slice(backend.description().as_bytes());
    reply.send(REP_INFO, &description).await?;
    let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [
        BLOCK_SIZE_MIN_BYTES,
        BLOCK_SIZE_PREFERRED_BYTES,
        PAYLOAD_MAX_BYTES,
    ] {
        sizes.extend_from_slice(&v.to_be_bytes());
    }
    reply.send(REP_INFO, &sizes).await
}

struct OptionReply<'a, W> {
    writer: &'a mut W,
    option: u32,
}

impl<W: AsyncWrite + Unpin> OptionReply<'_, W> {
    async fn send(&mut self, reply_type: u32, data: &[u8]) -> std::io::Result<()> {
        self.writer.write_u64(OPTION_REPLY_MAGIC).await?;
        self.writer.write_u32(self.option).await?;
        self.writer.write_u32(reply_type).await?;
        self.writer.write_u32(data.len() as u32).await?;
        self.writer.write_all(data).await?;
        self.writer.flush().await
    }

    async fn error(&mut self, reply_type: u32, message: &str) -> std::io::Result<()> {
        tracing::debug!(option = self.option, message, "option refused");
        self.send(reply_type, message.as_bytes()).await
    }
}

/// One reply on its way to the writer task.
enum Reply<Buf> {
    Done {
        handle: u64,
        result: Result<(), BackendError>,
    },
    Read {
        handle: u64,
        offset: u64,
        result: Result<Buf, BackendError>,
    },
}

async fn transmission<R, W, B>(
    reader: R,
    writer: BufWriter<W>,
    attachment: Attachment<B>,
    structured: bool,
) -> Result<(), ConnectionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let backend = attachment.0.clone();
    let (tx, rx) = mpsc::channel::<Parsed<B::Buf>>(REQUEST_QUEUE_MAX);
    let executor = tokio::spawn(execute_and_reply(writer, rx, attachment, structured));
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let memory = Arc::new(Semaphore::new(BUDGET_UNITS_PER_CONNECTION));
    let outcome = loop {
        let mut header_bytes = [0u8; REQUEST_HEADER_BYTES];
        match reader.read_exact(&mut header_bytes).await {
            Ok(_) => {}
            // A client that vanishes without DISC: finish what is in flight.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let header = match RequestHeader::decode(&header_bytes) {
            Ok(h) => h,
            Err(e) => break Err(e.into()),
        };
        // Wait for room in the byte budget before allocating anything.
        let budget = match memory
            .clone()
            .acquire_many_owned(budget_units(&header))
            .await
        {
            Ok(permit) => permit,
            Err(_) => break Ok(()),
        };
        let mut payload = None;
        if header.payload_len() > 0 {
            let mut buf = backend.alloc(header.payload_len());
            if let Err(e) = reader.read_exact(buf.as_mut()).await {
                break Err(e.into());
            }
            payload = Some(buf);
        }
        if header.command == Command::Disconnect {
            break Ok(());
        }
        let parsed = Parsed {
            header,
            payload,
            budget,
        };
        if tx.send(parsed).await.is_err() {
            break Ok(()); // the executor stopped: its error is reported below
        }
    };
    // Every request already read gets its reply before the connection closes.
    drop(tx);
    let written = executor
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    outcome.and(written.map_err(Into::into))
}

/// A request as read off the wire: its header, the payload of a write, and
/// its share of the connection's byte budget, held until the reply is sent.
struct Parsed<Buf> {
    header: RequestHeader,
    payload: Option<Buf>,
    budget: OwnedSemaphorePermit,
}

/// Budget units a request holds: its data (write payload or read result)
/// in 64 KiB units, and at least one.
fn budget_units(header: &RequestHeader) -> u32 {
    let data_bytes = match header.command {
        Command::Read | Command::Write => header.length.min(PAYLOAD_MAX_BYTES),
        _ => 0,
    };
    data_bytes.div_ceil(BUDGET_UNIT_BYTES).max(1)
}

/// Runs requests concurrently inside this one task and hands each reply to
/// the writer as soon as its request completes, in whatever order that is.
/// Writing happens in its own task so a slow client socket never delays
/// starting the next requests, nor finishing those under way.
///
/// It holds the client's attachment until its last request is done, even
/// when the server stops and aborts the connection's reading task: the
/// volume is not demoted or shut down under its writes. It lets it go
/// before the last replies are written, which a client that reads nothing
/// could hold up forever.
async fn execute_and_reply<W, B>(
    writer: BufWriter<W>,
    mut requests: mpsc::Receiver<Parsed<B::Buf>>,
    attachment: Attachment<B>,
    structured: bool,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let (replies, replies_rx) = mpsc::channel(IN_FLIGHT_PER_CONNECTION_MAX);
    let writer_task = tokio::spawn(write_replies(writer, replies_rx, structured));
    let size = attachment.0.size();
    let backend = &*attachment.0;
    let mut in_flight = FuturesUnordered::new();
    // Replies the writer has no room for yet (each holds its budget share).
    let mut unsent = VecDeque::new();
    let mut accepting = true;
    let mut client_gone = false;
    while accepting || !in_flight.is_empty() {
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                // When the client is gone (the writer failed, its error is
                // reported below), requests already started still run to
                // the end: a write stopped halfway could reach one disk of
                // the mirror and not the other.
                if client_gone {
                    // Nobody reads the reply: dropped.
                } else if !unsent.is_empty() {
                    // Behind replies already waiting, so none is overtaken.
                    unsent.push_back(done);
                } else {
                    match replies.try_send(done) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(done)) => unsent.push_back(done),
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            client_gone = true;
                            accepting = false;
                        }
                    }
                }
            }
            room = replies.reserve(), if !unsent.is_empty() => match room {
                Ok(room) => room.send(unsent.pop_front().expect("not empty")),
                Err(_) => {
                    client_gone = true;
                    accepting = false;
                    unsent.clear();
                }
            },
            // (Replies waiting are bounded by the byte budget they hold.)
            request = requests.recv(),
                if accepting && in_flight.len() < IN_FLIGHT_PER_CONNECTION_MAX =>
            {
                match request {
                    Some(Parsed { header, payload, budget }) => in_flight.push(async move {
                        (execute(backend, header, payload, size).await, budget)
                    }),
                    None => accepting = false,
                }
            }
            else => break,
        }
    }
    drop(in_flight);
    drop(attachment);
    for done in unsent {
        if replies.send(done).await.is_err() {
            break;
        }
    }
    drop(replies);
    writer_task
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
}

/// The buffered writer of a connection's handshake answers and replies.
fn reply_writer<W: AsyncWrite>(writer: W) -> BufWriter<W> {
    BufWriter::with_capacity(REPLY_BUFFER_BYTES, writer)
}

/// Writes replies as they come, batching whatever is ready into one flush.
/// Each reply's budget share is released once it is written.
async fn write_replies<W, Buf>(
    mut writer: BufWriter<W>,
    mut replies: mpsc::Receiver<(Reply<Buf>, OwnedSemaphorePermit)>,
    structured: bool,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    Buf: AsRef<[u8]>,
{
    while let Some((reply, _budget)) = replies.recv().await {
        write_reply(&mut writer, reply, structured).await?;
        while let Ok((reply, _budget)) = replies.try_recv() {
            write_reply(&mut writer, reply, structured).await?;
        }
        writer.flush().await?;
    }
    writer.shutdown().await
}

async fn execute<B: Backend>(
    backend: &B,
    header: RequestHeader,
    payload: Option<B::Buf>,
    size: u64,
) -> Reply<B::Buf> {
    let handle = header.handle;
    let refuse = |errno| BackendError {
        errno,
        message: format!(
            "refused {:?} at {}+{}",
            header.command, header.offset, header.length
        ),
    };
    if let Err(errno) = header.check(size) {
        return match header.command {
            Command::Read => Reply::Read {
                handle,
                offset: header.offset,
                result: Err(refuse(errno)),
            },
            _ => Reply::Done {
                handle,
                result: Err(refuse(errno)),
            },
        };
    }
    let fua = header.flags & CMD_FLAG_FUA != 0;
    let result = match header.command {
        Command::Read => {
            return Reply::Read {
                handle,
                offset: header.offset,
                result: backend.read(header.offset, header.length).await,
            }
        }
        Command::Write => {
            let data = payload.expect("write requests carry their payload");
            backend.write(header.offset, data, fua).await
        }
        Command::Flush => backend.flush().await,
        Command::Trim => backend.zero(header.offset, header.length, true, fua).await,
        Command::WriteZeroes => {
            let unmap = header.flags & CMD_FLAG_NO_HOLE == 0;
            backend.zero(header.offset, header.length, unmap, fua).await
        }
        Command::Disconnect | Command::Unknown(_) => unreachable!("handled before execution"),
    };
    Reply::Done { handle, result }
}

async fn write_reply<W: AsyncWrite + Unpin, Buf: AsRef<[u8]>>(
    writer: &mut BufWriter<W>,
    reply: Reply<Buf>,
    structured: bool,
) -> std::io::Result<()> {
    match reply {
        Reply::Done { handle, result } => {
            let error = match &result {
                Ok(()) => 0,
                Err(e) => {
                    tracing::debug!(errno = ?e.errno, message = %e.message, "request failed");
                    e.errno as u32
                }
            };
            writer.write_all(&simple_reply(handle, error)).await
        }
        Reply::Read {
            handle,
            offset,
            result,
        } => match (result, structured) {
            (Ok(data), false) => {
                writer.write_all(&simple_reply(handle, 0)).await?;
                writer.write_all(data.as_ref()).await
            }
            (Ok(data), true) if data.as_ref().is_empty() => {
                // OFFSET_DATA needs at least one byte; an empty read ends with NONE.
                writer
                    .write_all(&structured_header(
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_NONE,
                        handle,
                        0,
                    ))
                    .await
            }
            (Ok(data), true) => {
                let data = data.as_ref();
                let header = structured_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    handle,
                    8 + data.len() as u32,
                );
                writer.write_all(&header).await?;
                writer.write_all(&offset.to_be_bytes()).await?;
                writer.write_all(data).await
            }
            (Err(e), false) => {
                writer
                    .write_all(&simple_reply(handle, e.errno as u32))
                    .await
            }
            (Err(e), true) => {
                writer
                    .write_all(&structured_error(handle, e.errno, &e.message))
                    .await
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A sink that counts the writes it is handed.
    #[derive(Default)]
    struct CountingSink {
        writes: usize,
        bytes: usize,
    }

    impl AsyncWrite for CountingSink {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.writes += 1;
            self.bytes += buf.len();
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn read_replies_ready_together_go_out_in_one_write() {
        const READS: usize = 32;
        let (tx, rx) = mpsc::channel(IN_FLIGHT_PER_CONNECTION_MAX);
        let budget = Arc::new(Semaphore::new(READS));
        for handle in 0..READS as u64 {
            let reply = Reply::Read {
                handle,
                offset: handle * 4096,
                result: Ok(vec![handle as u8; 4096]),
            };
            let permit = budget.clone().try_acquire_owned().unwrap();
            tx.send((reply, permit)).await.unwrap();
        }
        drop(tx);
        let mut sink = CountingSink::default();
        let writer = reply_writer(&mut sink);
        write_replies(writer, rx, true).await.unwrap();
        // A structured reply: its 20-byte header, the offset, the data.
        assert_eq!(sink.bytes, READS * (20 + 8 + 4096));
        assert_eq!(sink.writes, 1, "32 read replies in one write");
    }
}
