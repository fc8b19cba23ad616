//! The control socket: one JSON request per line, one JSON response per
//! line, on a Unix socket only root (the socket's owner) can reach.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::volume::VolumeStatus;
use crate::Error;

/// Longest request line accepted; requests are tiny.
pub const REQUEST_LINE_MAX_BYTES: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Primary {
        force: bool,
    },
    Secondary,
    Connect {
        #[serde(default)]
        discard_my_data: bool,
    },
    Disconnect,
    Invalidate,
    Resync {
        full: bool,
    },
    Verify,
    /// Test builds: replace the injected disk faults (see blkmirror-io).
    Fault {
        spec: String,
    },
    Down,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Ok,
    Status(Box<VolumeStatus>),
    Error { message: String },
}

/// Sends one request to a running node and returns its answer.
pub async fn call(socket: &Path, request: &Request) -> Result<Response, Error> {
    let not_up = |source| Error::NotUp {
        socket: socket.display().to_string(),
        source,
    };
    let stream = UnixStream::connect(socket).await.map_err(not_up)?;
    let (reader, mut writer) = stream.into_split();
    let mut line = serde_json::to_string(request).expect("requests always serialise");
    line.push('\n');
    writer.write_all(line.as_bytes()).await.map_err(not_up)?;
    let mut answer = String::new();
    BufReader::new(reader)
        .read_line(&mut answer)
        .await
        .map_err(not_up)?;
    if answer.is_empty() {
        return Err(Error::Control(
            "the node closed the control connection without answering (is it going down?)".into(),
        ));
    }
    serde_json::from_str(&answer)
        .map_err(|e| Error::Control(format!("unreadable answer {answer:?}: {e}")))
}

/// Reads one bounded request line from a control client.
pub async fn read_request(stream: &mut BufReader<UnixStream>) -> Result<Request, String> {
    let mut line = Vec::new();
    let mut limited = (&mut *stream).take(REQUEST_LINE_MAX_BYTES as u64);
    limited
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&line).map_err(|e| format!("bad control request: {e}"))
}

pub async fn write_response(
    stream: &mut BufReader<UnixStream>,
    response: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_string(response).expect("responses always serialise");
    line.push('\n');
    stream.get_mut().write_all(line.as_bytes()).await
}
