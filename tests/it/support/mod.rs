//! Test support: a gateway started in process on ephemeral ports, fake
//! upstreams that are real hyper servers, and a small HTTP client.
// Not every test module uses every helper.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod gateway;
pub mod raw;
pub mod redis;
pub mod relay;
pub mod upstream;

use std::time::Duration;

pub use client::{Client, Reply as ClientReply};
pub use gateway::TestGateway;
pub use raw::{AfterAnswer, RawUpstream, raw_exchange};
pub use redis::RedisServer;
pub use relay::Relay;
pub use upstream::{MockUpstream, Seen, TestPki, UpstreamReply, app_config, tls_listener_config};

/// Polls `check` until it holds, for at most `within`.
pub async fn eventually<F: FnMut() -> bool>(within: Duration, mut check: F) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A loopback port that refuses connections for as long as this lives:
/// its socket is bound and never listens. Unlike a port bound and let go,
/// no other test's listener can be given it meanwhile (which turned a
/// refused connection into another server's answer).
pub struct RefusedPort {
    _socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl RefusedPort {
    pub fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let port = socket.local_addr().expect("bound address").port();
        RefusedPort {
            _socket: socket,
            port,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Reads what arrives on `conn` until it closes or goes quiet for
/// `quiet`: the answers, and whether the connection was closed.
pub async fn answers(
    conn: &mut tokio::net::TcpStream,
    quiet: std::time::Duration,
) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(quiet, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

/// Sends `request` (raw bytes) on a new connection to `addr`, then reads
/// as [`answers`] does.
pub async fn exchange(
    addr: std::net::SocketAddr,
    request: &[u8],
    quiet: std::time::Duration,
) -> (String, bool) {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(request).await.expect("write the request");
    answers(&mut conn, quiet).await
}
