//! A small NBD client: one request at a time, simple replies. Used by
//! `blkmirror demo` and by tests that need to speak NBD from Rust; interop is
//! proven with third-party clients, not with this one.

use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::proto::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("NBD connection failed")]
    Io(#[from] std::io::Error),
    #[error("Server broke the protocol: {0}")]
    Protocol(String),
    #[error("Server refused export {export:?}: {message}")]
    Refused { export: String, message: String },
    #[error("Server answered error {0} to {1}")]
    Request(u32, &'static str),
}

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub struct Client {
    stream: Box<dyn Stream>,
    size: u64,
    transmission_flags: u16,
    next_handle: u64,
}

impl Client {
    pub async fn connect_unix(path: &Path, export: &str) -> Result<Client, ClientError> {
        Client::handshake(Box::new(UnixStream::connect(path).await?), export).await
    }

    pub async fn connect_tcp(
        addr: std::net::SocketAddr,
        export: &str,
    ) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Client::handshake(Box::new(stream), export).await
    }

    /// Fixed-newstyle handshake ending in NBD_OPT_GO for `export`.
    pub async fn handshake(
        mut stream: Box<dyn Stream>,
        export: &str,
    ) -> Result<Client, ClientError> {
        let protocol = |m: &str| ClientError::Protocol(m.to_string());
        if stream.read_u64().await? != NBDMAGIC || stream.read_u64().await? != IHAVEOPT {
            return Err(protocol("not a newstyle NBD server"));
        }
        let flags = stream.read_u16().await?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("server is not fixed-newstyle"));
        }
        stream
            .write_u32(CLIENT_FLAG_FIXED_NEWSTYLE | (u32::from(flags) & CLIENT_FLAG_NO_ZEROES))
            .await?;
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        stream.write_u64(IHAVEOPT).await?;
        stream.write_u32(OPT_GO).await?;
        stream.write_u32(data.len() as u32).await?;
        stream.write_all(&data).await?;
        stream.flush().await?;
        let (mut size, mut transmission_flags) = (None, 0);
        loop {
            if stream.read_u64().await? != OPTION_REPLY_MAGIC {
                return Err(protocol("bad option reply magic"));
            }
            let _option = stream.read_u32().await?;
            let reply_type = stream.read_u32().await?;
            let len = stream.read_u32().await?;
            if len > OPTION_DATA_MAX_BYTES {
                return Err(protocol("option reply too large"));
            }
            let mut payload = vec![0u8; len as usize];
            stream.read_exact(&mut payload).await?;
            match reply_type {
                REP_ACK => break,
                REP_INFO if payload.len() == 12 && payload[0..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(payload[2..10].try_into().unwrap()));
                    transmission_flags = u16::from_be_bytes(payload[10..12].try_into().unwrap());
                }
                REP_INFO => {}
                t if t & (1 << 31) != 0 => {
                    return Err(ClientError::Refused {
                        export: export.to_string(),
                        message: String::from_utf8_lossy(&payload).into_owned(),
                    })
                }
                t => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected option reply {t}"
                    )))
                }
            }
        }
        let size = size.ok_or_else(|| protocol("GO succeeded without NBD_INFO_EXPORT"))?;
        Ok(Client {
            stream,
            size,
            transmission_flags,
            next_handle: 1,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    async fn request(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        what: &'static str,
    ) -> Result<(), ClientError> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let header = RequestHeader {
            flags,
            command,
            handle,
            offset,
            length,
        };
        self.stream.write_all(&header.encode()).await?;
        self.stream.write_all(payload).await?;
        self.stream.flush().await?;
        if command == Command::Disconnect {
            return Ok(());
        }
        let mut reply = [0u8; SIMPLE_REPLY_HEADER_BYTES];
        self.stream.read_exact(&mut reply).await?;
        if reply[0..4] != SIMPLE_REPLY_MAGIC.to_be_bytes() || reply[8..16] != handle.to_be_bytes() {
            return Err(ClientError::Protocol("unexpected reply".into()));
        }
        match u32::from_be_bytes(reply[4..8].try_into().unwrap()) {
            0 => Ok(()),
            e => Err(ClientError::Request(e, what)),
        }
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        self.request(Command::Read, 0, offset, len, &[], "read")
            .await?;
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).await?;
        Ok(data)
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ClientError::Protocol("write too large".into()))?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(Command::Write, flags, offset, len, data, "write")
            .await
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.request(Command::Flush, 0, 0, 0, &[], "flush").await
    }

    pub async fn trim(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(Command::Trim, 0, offset, len, &[], "trim")
            .await
    }

    pub async fn write_zeroes(
        &mut self,
        offset: u64,
        len: u32,
        no_hole: bool,
    ) -> Result<(), ClientError> {
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.request(
            Command::WriteZeroes,
            flags,
            offset,
            len,
            &[],
            "write zeroes",
        )
        .await
    }

    pub async fn disconnect(mut self) -> Result<(), ClientError> {
        self.request(Command::Disconnect, 0, 0, 0, &[], "disconnect")
            .await?;
        // The server closes once everything in flight is answered.
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest).await?;
        Ok(())
    }
}
