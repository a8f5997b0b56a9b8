//! What every gRPC server of Switchyard (router, expert node, coordinator) accepts from the
//! network: a bounded number of connections, a deadline for a new connection's first bytes,
//! and HTTP/2 keepalives that drop peers that stopped answering. Without them, a process that
//! opens connections and sends nothing holds the server's sockets and memory for good.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The limits of a role's gRPC server (flattened into its flags).
#[derive(clap::Args, Clone, Debug)]
pub struct ConnectionLimits {
    /// gRPC connections served at once; one more is closed as soon as it is accepted.
    #[arg(long = "grpc-max-connections", env = "SWITCHYARD_GRPC_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// A gRPC connection that has sent nothing this many milliseconds after it was accepted is
    /// closed.
    #[arg(long = "grpc-handshake-timeout-ms", env = "SWITCHYARD_GRPC_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// HTTP/2 keepalive pings on gRPC connections every this many seconds; a peer that does not
    /// answer one within 20 s is dropped.
    #[arg(long = "grpc-keepalive-secs", env = "SWITCHYARD_GRPC_KEEPALIVE_SECS", default_value_t = 30)]
    pub keepalive_secs: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits { max_connections: 1024, handshake_timeout_ms: 10_000, keepalive_secs: 30 }
    }
}

/// How long a keepalive ping may go unanswered.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Refused connections are logged at most this often.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl ConnectionLimits {
    /// A tonic server builder with the keepalives set.
    pub fn builder(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(self.keepalive_secs.max(1))))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .tcp_keepalive(Some(Duration::from_secs(60)))
    }

    /// `listener`'s connections, with Nagle's algorithm off, at most `max_connections` at once
    /// (the rest closed on accept), each closed if it sends nothing within the handshake
    /// timeout.
    ///
    /// Nagle: tonic's own `tcp_nodelay` applies only to sockets it binds itself; without this, a
    /// response that spans several TCP segments waits for the peer's delayed ACK (tens of
    /// milliseconds) on every dispatch.
    pub fn incoming(&self, listener: TcpListener) -> impl Stream<Item = io::Result<Limited>> + use<> {
        use tokio_stream::StreamExt;
        let slots = Arc::new(Semaphore::new(self.max_connections.max(1)));
        let (max, handshake) = (self.max_connections, Duration::from_millis(self.handshake_timeout_ms));
        let last_refusal: Mutex<Option<Instant>> = Mutex::new(None);
        tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(move |conn| {
            let conn = match conn {
                Ok(conn) => conn,
                Err(e) => return Some(Err(e)),
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                let mut last = last_refusal.lock().expect("refusal log lock");
                if last.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
                    *last = Some(Instant::now());
                    tracing::warn!(peer = ?conn.peer_addr().ok(), "{max} gRPC connections open: closing new ones");
                }
                return None;
            };
            if let Err(e) = conn.set_nodelay(true) {
                return Some(Err(e));
            }
            let deadline = Some(Box::pin(tokio::time::sleep(handshake)));
            Some(Ok(Limited { io: conn, _slot: permit, deadline }))
        })
    }
}

/// A free loopback address for a listener that must come back on the same port after a
/// restart (a coordinator, whose raft state records its address): a port below the kernel's
/// ephemeral range, so that no outgoing connection can take it meanwhile (a port from
/// `bind(0)` is in that range). Falls back to `bind(0)` when the range below is full.
pub fn stable_loopback_address() -> io::Result<std::net::SocketAddr> {
    let lowest_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (20_000u16.min(lowest_ephemeral / 2), lowest_ephemeral);
    let span = u32::from(high - low).max(1);
    // A different starting point per process and call, so parallel callers do not collide.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let seed = std::process::id() ^ nanos;
    for i in 0..span.min(512) {
        let port = low + ((seed.wrapping_add(i.wrapping_mul(7919))) % span) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr();
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Whether `given` equals `secret`, in a time that depends on their lengths only (not on where
/// they first differ), so a secret cannot be guessed byte by byte from response times. Every
/// server comparing a caller's secret (a raft token, an API key's hash) uses this.
pub fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    let mut diff = given.len() ^ secret.len();
    for (i, &s) in secret.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(!s) ^ s);
    }
    // Keeps the compiler from turning the loop back into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// An accepted connection holding one of the server's slots until it is dropped.
pub struct Limited {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// Until the first bytes arrive: when the connection is closed for silence.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for Limited {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let silent_too_long = this.deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if silent_too_long {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer sent nothing within the handshake timeout",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for Limited {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"s3cret!", b"s3cret"));
        assert!(!same_secret(b"S3cret", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
    }

    /// Whether the server closed `conn` (EOF or reset) within `within`.
    fn closed(conn: &mut std::net::TcpStream, within: Duration) -> bool {
        conn.set_read_timeout(Some(within)).unwrap();
        let mut byte = [0u8; 1];
        match conn.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_over_the_limit_and_silent_ones_are_closed() {
        use tokio_stream::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let limits = ConnectionLimits { max_connections: 2, handshake_timeout_ms: 300, keepalive_secs: 30 };
        let mut incoming = Box::pin(limits.incoming(listener));
        // Serve: read until EOF or error, then drop (which frees the slot).
        tokio::spawn(async move {
            while let Some(Ok(mut conn)) = incoming.next().await {
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = [0u8; 64];
                    while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        let results = tokio::task::spawn_blocking(move || {
            let mut first = std::net::TcpStream::connect(address).unwrap();
            let mut second = std::net::TcpStream::connect(address).unwrap();
            std::io::Write::write_all(&mut second, b"PRI").unwrap();
            // The third is over the limit: closed at once.
            let mut third = std::net::TcpStream::connect(address).unwrap();
            let third_closed = closed(&mut third, Duration::from_secs(5));
            // The first never speaks: closed after the handshake timeout; the second spoke.
            let first_closed = closed(&mut first, Duration::from_secs(5));
            let second_open = !closed(&mut second, Duration::from_millis(500));
            // The first's slot is free again.
            let mut fourth = std::net::TcpStream::connect(address).unwrap();
            std::io::Write::write_all(&mut fourth, b"PRI").unwrap();
            let fourth_open = !closed(&mut fourth, Duration::from_millis(500));
            (third_closed, first_closed, second_open, fourth_open)
        })
        .await
        .unwrap();
        assert_eq!(results, (true, true, true, true), "(over the limit, silent, speaking, after a slot freed)");
    }
}
