//! Liveness and readiness for orchestrators (Kubernetes probes, Compose health checks), on a
//! small plain-HTTP listener of their own (`--probe-listen`): `GET /live` answers 200 while the
//! process answers at all (it never fails because the process is busy), `GET /ready` answers
//! 200 while the role can do its work, else 503 with the reason. The same readiness is served
//! as gRPC health (`grpc.health.v1`) on the role's gRPC port, for the service named
//! [`GRPC_SERVICE`].
//!
//! The listener reads one request line and headers (8 KiB at most, 5 s at most) and closes
//! the connection after each answer: nothing else is served on it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Whether the role can do its work now, and if not, why.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The name gRPC health reports readiness under (besides the empty name, the whole server).
pub const GRPC_SERVICE: &str = "switchyard.v1.Ready";

/// How often gRPC health is brought up to date with the readiness.
const GRPC_HEALTH_INTERVAL: Duration = Duration::from_millis(500);

const MAX_REQUEST: usize = 8 << 10;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The probe flag every role takes.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ProbeFlags {
    /// Serve `GET /live` and `GET /ready` (plain HTTP, for orchestrators' probes) on this
    /// address.
    #[arg(long = "probe-listen", env = "SWITCHYARD_PROBE_LISTEN")]
    pub probe_listen: Option<std::net::SocketAddr>,
}

/// Serves the probes on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, ready: Readiness, shutdown: impl Future<Output = ()> + Send) {
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            _ = &mut shutdown => return,
            conn = listener.accept() => conn,
        };
        match conn {
            Ok((stream, _)) => {
                let ready = ready.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(READ_TIMEOUT, answer(stream, ready)).await;
                });
            }
            Err(e) => {
                tracing::warn!("probe listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Binds `flags`' address (if any) and serves the probes there in the background until
/// `shutdown`; returns the bound address.
pub async fn start(
    flags: &ProbeFlags,
    ready: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<Option<std::net::SocketAddr>> {
    let Some(address) = flags.probe_listen else { return Ok(None) };
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("--probe-listen {address}: {e}")))?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, ready, shutdown));
    Ok(Some(bound))
}

async fn answer(mut stream: TcpStream, ready: Readiness) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || request.len() + n > MAX_REQUEST {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request[..request.iter().position(|&b| b == b'\r').unwrap_or(0)]).to_string();
    let mut words = line.split(' ');
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("GET", "/live") => ("200 OK", "live\n".to_string()),
        ("GET", "/ready") => match ready() {
            Ok(()) => ("200 OK", "ready\n".to_string()),
            Err(why) => ("503 Service Unavailable", format!("not ready: {why}\n")),
        },
        ("GET", _) => ("404 Not Found", "GET /live or /ready\n".to_string()),
        _ => ("405 Method Not Allowed", "GET /live or /ready\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// gRPC health for a role's server: SERVING for the whole server and for [`GRPC_SERVICE`]
/// while `ready` holds, kept up to date in the background.
pub fn grpc_health(
    ready: Readiness,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let now = ready().is_ok();
            if last != Some(now) {
                let status =
                    if now { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
                reporter.set_service_status("", status).await;
                reporter.set_service_status(GRPC_SERVICE, status).await;
                last = Some(now);
            }
            tokio::time::sleep(GRPC_HEALTH_INTERVAL).await;
        }
    });
    service
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    fn get(address: std::net::SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(address).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_always_ready_while_the_role_can_work() {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let ready: Readiness =
            Arc::new(move || if f.load(Ordering::Relaxed) { Ok(()) } else { Err("no leader known".into()) });
        let flags = ProbeFlags { probe_listen: Some("127.0.0.1:0".parse().unwrap()) };
        let address = start(&flags, ready, std::future::pending()).await.unwrap().unwrap();
        let answers = tokio::task::spawn_blocking(move || {
            let before = (get(address, "/live"), get(address, "/ready"));
            flag.store(true, Ordering::Relaxed);
            (before, get(address, "/ready"), get(address, "/metrics"))
        })
        .await
        .unwrap();
        let ((live, not_ready), ready, other) = answers;
        assert!(live.starts_with("HTTP/1.1 200"), "{live}");
        assert!(not_ready.starts_with("HTTP/1.1 503") && not_ready.contains("no leader known"), "{not_ready}");
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    }
}
