//! Serving a router on a TCP listener with limits against slow and hostile clients: a cap
//! on open connections (answered 503 beyond it), a deadline for request headers, for
//! request bodies and for whole requests. `axum::serve` has none of these: 100 slowloris
//! connections stayed open for good, and at ~1,100 idle sockets the process ran out of
//! file descriptors and both listeners stopped accepting.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};

/// What one listener tolerates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// From the first byte of a request (or an idle keep-alive connection) to its last
    /// header line.
    pub header_timeout: Duration,
    /// Between two chunks of a request body.
    pub body_timeout: Duration,
    /// A whole request, from its headers to its answer.
    pub request_timeout: Duration,
    /// How long open connections may finish their requests once shutdown begins.
    pub drain: Duration,
}

impl Limits {
    /// The public webhook listener: platforms deliver in bursts.
    pub const WEBHOOKS: Limits = Limits {
        max_connections: 4096,
        header_timeout: Duration::from_secs(10),
        body_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
        drain: Duration::from_secs(10),
    };
    /// The private admin listener: a few scrapers and operators.
    pub const ADMIN: Limits = Limits {
        max_connections: 256,
        header_timeout: Duration::from_secs(10),
        body_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(60),
        drain: Duration::from_secs(5),
    };
}

/// Serves `router` on `listener` until `cancel`, then lets open connections finish for
/// up to `limits.drain`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    cancel: CancellationToken,
    name: &'static str,
) {
    let router = router.layer((
        TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, limits.request_timeout),
        RequestBodyTimeoutLayer::new(limits.body_timeout),
    ));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_timeout)
        .keep_alive_timeout(limits.header_timeout);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut refusals = Refusals::default();
    loop {
        let (stream, _) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, typically: pause instead of spinning.
                    refusals.note(name, &format!("accept failed: {error}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refusals.note(name, "connection limit reached; answered 503");
            tokio::spawn(refuse(stream));
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            // hyper's header deadline starts with the first byte: a client that connects
            // and says nothing is cut off here.
            let mut first = [0u8; 1];
            if !matches!(
                tokio::time::timeout(header_timeout, stream.peek(&mut first)).await,
                Ok(Ok(1..))
            ) {
                drop(permit);
                return;
            }
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            // A connection that ends in an error (reset, header timeout) is the client's
            // business, not ours.
            let _ = watcher.watch(connection).await;
            drop(permit);
        });
    }
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "connections still open after the drain deadline; closed"
        );
    }
}

/// Answers a connection over the limit with a bare 503 and closes it.
async fn refuse(mut stream: TcpStream) {
    let answer = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer)).await;
}

/// A log line written at most once a minute, with how many times it happened: a flood of
/// refusals (bad signatures, connections over the cap) writes a bounded amount of log.
#[derive(Debug, Default)]
pub struct Throttled {
    since_last_log: u64,
    last_log: Option<tokio::time::Instant>,
}

impl Throttled {
    /// Counts one occurrence; returns how many happened since the last line when a line
    /// is due now.
    pub fn due(&mut self) -> Option<u64> {
        self.since_last_log += 1;
        let due = self
            .last_log
            .is_none_or(|last| last.elapsed() >= Duration::from_secs(60));
        if !due {
            return None;
        }
        let count = self.since_last_log;
        self.since_last_log = 0;
        self.last_log = Some(tokio::time::Instant::now());
        Some(count)
    }
}

/// Refusals of one listener, logged through a `Throttled` line.
#[derive(Debug, Default)]
struct Refusals(Throttled);

impl Refusals {
    fn note(&mut self, name: &'static str, what: &str) {
        if let Some(refused) = self.0.due() {
            tracing::warn!(listener = name, refused, "{what}");
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    const TIGHT: Limits = Limits {
        max_connections: 2,
        header_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_secs(5),
        drain: Duration::from_secs(1),
    };

    async fn start() -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let router = Router::new().route(
            "/",
            axum::routing::post(|body: axum::body::Bytes| async move { format!("{}", body.len()) })
                .get(|| async { "ok" }),
        );
        let cancel = CancellationToken::new();
        tokio::spawn(serve(listener, router, TIGHT, cancel.clone(), "test"));
        (address, cancel)
    }

    /// Everything the server sends until it closes the connection (bounded: a server that
    /// never closes fails the test instead of hanging it).
    async fn read_until_closed(stream: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection")
            .expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[test]
    fn a_flood_writes_one_line_a_minute_with_its_count() {
        let mut line = Throttled::default();
        assert_eq!(line.due(), Some(1), "the first one is logged");
        for _ in 0..10_000 {
            assert_eq!(line.due(), None, "the rest of the minute is counted");
        }
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_cut_off() {
        let (address, cancel) = start().await;
        let mut slow = TcpStream::connect(address).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
            .await
            .expect("write");
        let answer = read_until_closed(&mut slow).await;
        assert!(!answer.contains("200 OK"), "{answer}");
        // Nor one that connects and says nothing at all.
        let mut silent = TcpStream::connect(address).await.expect("connect");
        assert_eq!(read_until_closed(&mut silent).await, "");
        // Nor one that keeps an answered connection open and idle.
        let mut idle = TcpStream::connect(address).await.expect("connect");
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let answered = read_until_closed(&mut idle).await;
        assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_body_announced_but_never_sent_is_cut_off() {
        let (address, cancel) = start().await;
        let mut liar = TcpStream::connect(address).await.expect("connect");
        liar.write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n0123456789",
        )
        .await
        .expect("write");
        // Closed after a 4xx (the handler's body read timed out), not held open.
        let answer = read_until_closed(&mut liar).await;
        assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
        cancel.cancel();
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_answered_503_and_freed_slots_are_reused() {
        let (address, cancel) = start().await;
        // Two connections in the middle of a request hold both slots.
        let mut held = Vec::new();
        for _ in 0..TIGHT.max_connections {
            let mut stream = TcpStream::connect(address).await.expect("connect");
            stream
                .write_all(b"GET / HTTP/1.1\r\n")
                .await
                .expect("write");
            held.push(stream);
        }
        let mut third = TcpStream::connect(address).await.expect("connect");
        let refused = read_until_closed(&mut third).await;
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        // The held ones are cut off by the header deadline; a new client gets through.
        for stream in &mut held {
            read_until_closed(stream).await;
        }
        let mut client = TcpStream::connect(address).await.expect("connect");
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let answer = read_until_closed(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        cancel.cancel();
    }
}
