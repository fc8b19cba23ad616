//! The NBD frontend: our own codec of the NBD protocol (fixed newstyle,
//! structured replies for reads), a concurrent server over any [`Backend`],
//! and a small client.
#![forbid(unsafe_code)]

pub mod client;
pub mod proto;
pub mod server;

use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use client::{Client, ClientError};
pub use server::{serve_connection, Backend, BackendError};

pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Clients served at once; more are turned away until one leaves.
pub const CONNECTIONS_MAX: usize = 64;

/// Accepts clients until `stop` turns true, then ends every connection.
pub async fn accept_loop<B: Backend>(
    listener: Listener,
    backend: Arc<B>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok((_, peer)) if connections.len() >= CONNECTIONS_MAX => {
                tracing::warn!(%peer, "NBD client turned away: {CONNECTIONS_MAX} connections already");
            }
            Ok((stream, peer)) => {
                let backend = backend.clone();
                connections.spawn(async move {
                    tracing::debug!(%peer, "NBD client connected");
                    match serve_connection(stream, backend).await {
                        Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
                        Err(e) => tracing::warn!(%peer, error = %e, "NBD connection ended"),
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting an NBD client failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    connections.shutdown().await;
}

/// Socket send buffer asked for, so a whole large read reply fits in one
/// write instead of several round trips (the kernel caps it at wmem_max).
const SEND_BUFFER_BYTES: usize = 4 << 20;

fn widen_send_buffer(socket: &impl std::os::fd::AsFd) {
    if let Err(e) = nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::SndBuf,
        &SEND_BUFFER_BYTES,
    ) {
        tracing::debug!(error = %e, "cannot widen the socket send buffer");
    }
}

trait BoxedStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> BoxedStream for T {}

async fn accept(listener: &Listener) -> std::io::Result<(Box<dyn BoxedStream>, String)> {
    Ok(match listener {
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            widen_send_buffer(&s);
            (Box::new(s), "unix".to_string())
        }
        Listener::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            s.set_nodelay(true)?;
            widen_send_buffer(&s);
            (Box::new(s), addr.to_string())
        }
    })
}

#[cfg(test)]
mod tests;
