//! Accepting connections within bounds: a cap on open connections (a semaphore held by
//! each connection; at the cap the listener waits and the kernel's backlog holds the rest),
//! a handshake deadline (a peer that has not sent the 24-byte HTTP/2 preface, or the
//! start of its TLS handshake, in time is closed), a read-idle timeout (HTTP/2 keepalive
//! pings make every live client send something well within it), and a pause after a
//! failed accept (out of file descriptors) instead of a busy loop.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes of the HTTP/2 client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const PREFACE_BYTES: usize = 24;
/// Wait after a failed accept: EMFILE and ENFILE persist until a connection closes.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Connection bounds of the gRPC listener.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectionLimits {
    /// Open connections at most; more wait in the listen backlog.
    pub max_connections: usize,
    /// Time from accept to the first 24 bytes (the HTTP/2 preface, or a TLS hello).
    pub handshake_timeout: Duration,
    /// Time without a byte from the peer after which the connection is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval; a live client acks it, which keeps it under `idle_timeout`.
    pub keepalive_interval: Duration,
    /// Time a PING may go unacknowledged before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Concurrent streams (RPCs) per connection.
    pub max_concurrent_streams: u32,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 2048,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            max_concurrent_streams: 256,
        }
    }
}

/// Accepted connections of `listener`, at most `limits.max_connections` open at once.
pub fn bounded_incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> impl Stream<Item = Result<BoundedConn, io::Error>> {
    let listener = CappedListener::new(listener, limits.max_connections);
    futures_util::stream::unfold((listener, limits), |(listener, limits)| async move {
        let (tcp, slot, _) = listener.accept_slotted().await;
        let conn = BoundedConn::new(
            tcp,
            slot,
            limits.handshake_timeout,
            Some(limits.idle_timeout),
        );
        Some((Ok(conn), (listener, limits)))
    })
}

/// A listener whose accepted connections each hold one slot of a cap.
#[derive(Debug)]
pub struct CappedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl CappedListener {
    pub fn new(inner: TcpListener, max_connections: usize) -> Self {
        Self {
            inner,
            slots: Arc::new(Semaphore::new(max_connections.max(1))),
        }
    }

    /// The next connection and its slot; waits while the cap is reached, and pauses
    /// after a failed accept instead of spinning.
    pub async fn accept_slotted(&self) -> (TcpStream, OwnedSemaphorePermit, SocketAddr) {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        loop {
            match self.inner.accept().await {
                Ok((tcp, addr)) => {
                    // Nagle plus delayed ACKs would add ~40 ms to every small reply.
                    let _ = tcp.set_nodelay(true);
                    return (tcp, slot, addr);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed; pausing");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A TCP connection holding its slot under the cap, closed (read error `TimedOut`) when
/// its handshake or idle deadline passes.
#[derive(Debug)]
pub struct BoundedConn {
    tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// None once the handshake is over on a connection without an idle timeout.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Handshake bytes still expected; 0 once the handshake phase is over.
    handshake_left: usize,
    last_read: Instant,
    idle_timeout: Option<Duration>,
}

impl BoundedConn {
    /// `tcp` must send its first 24 bytes within `handshake_timeout`, and then a byte at
    /// least every `idle_timeout` when there is one.
    pub fn new(
        tcp: TcpStream,
        slot: OwnedSemaphorePermit,
        handshake_timeout: Duration,
        idle_timeout: Option<Duration>,
    ) -> Self {
        let now = Instant::now();
        Self {
            tcp,
            _slot: slot,
            deadline: Some(Box::pin(tokio::time::sleep_until(now + handshake_timeout))),
            handshake_left: PREFACE_BYTES,
            last_read: now,
            idle_timeout,
        }
    }

    fn handshake_done(&mut self) {
        match (self.deadline.as_mut(), self.idle_timeout) {
            (Some(deadline), Some(idle)) => deadline.as_mut().reset(self.last_read + idle),
            _ => self.deadline = None,
        }
    }

    /// Whether the deadline really passed; an idle deadline that reads pushed back is
    /// re-armed instead (cheaper than resetting the timer on every read).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let Some(deadline) = self.deadline.as_mut() else {
                return false;
            };
            if deadline.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.handshake_left > 0 {
                return true;
            }
            let Some(idle) = self.idle_timeout else {
                self.deadline = None;
                return false;
            };
            let idle_until = self.last_read + idle;
            if idle_until <= Instant::now() {
                return true;
            }
            deadline.as_mut().reset(idle_until);
        }
    }
}

impl AsyncRead for BoundedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                if read > 0 {
                    this.last_read = Instant::now();
                    if this.handshake_left > 0 {
                        this.handshake_left = this.handshake_left.saturating_sub(read);
                        if this.handshake_left == 0 {
                            this.handshake_done();
                        }
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                if this.handshake_left > 0 {
                    "no handshake before the deadline"
                } else {
                    "idle past the timeout"
                },
            ))),
            other => other,
        }
    }
}

impl AsyncWrite for BoundedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl Connected for BoundedConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

/// Raises the soft limit on open files to the hard limit, so the connection cap (not
/// EMFILE) is what bounds connections; returns the soft limit now in force.
///
/// # Errors
/// When the limits cannot be read or set.
#[cfg(unix)]
pub fn raise_fd_limit() -> io::Result<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit)?;
    }
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}
