//! Accepted connections under a cap: past `max` open connections on a port, a new one is closed
//! at once (a client sees the connection reset and retries elsewhere) instead of holding a socket
//! and a task for as long as it likes. Each accepted connection carries its permit; closing it
//! frees the slot.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Open connections one port keeps by default (`--max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;

/// A TCP connection holding one of its port's connection slots.
#[derive(Debug)]
pub struct Counted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// A listener that admits at most `max` open connections, with Nagle's algorithm off (streamed
/// tokens are small writes that must not wait for the peer's delayed ACK).
pub struct CappedListener {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
}

impl CappedListener {
    pub fn new(listener: TcpListener, max: usize) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// The next connection that gets a slot; connections past the cap are closed as they come.
    /// A failed accept (out of file descriptors, a connection reset before it was taken) is
    /// logged and retried after a pause, as axum's own listener does, so the port never stops.
    pub async fn accept_counted(&mut self) -> (Counted, SocketAddr) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%error, "TCP_NODELAY not set");
                    }
                    return (
                        Counted {
                            stream,
                            _slot: slot,
                        },
                        peer,
                    );
                }
                Err(_) => {
                    tracing::warn!(%peer, max = self.max, "connection refused: the port has its maximum of open connections");
                    drop(stream);
                }
            }
        }
    }

    /// The accepted connections as the stream tonic serves.
    pub fn into_incoming(
        self,
    ) -> impl futures::Stream<Item = io::Result<Counted>> + Send + 'static {
        futures::stream::unfold(self, |mut listener| async move {
            let (io, _) = listener.accept_counted().await;
            Some((Ok(io), listener))
        })
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.accept_counted().await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// tonic sets TCP_NODELAY only on listeners it binds; without it a small response (an expert
    /// partial sum, a streamed token) can wait ~40 ms for the peer's delayed ACK.
    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut capped = CappedListener::new(listener, 4);
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = tokio::time::timeout(Duration::from_secs(10), capped.accept_counted())
            .await
            .expect("the connection is accepted");
        assert!(accepted.stream.nodelay().unwrap());
    }
}
