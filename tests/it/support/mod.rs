//! Test support: a gateway started in process on ephemeral ports, fake
//! upstreams that are real hyper servers, and a small HTTP client.
// Not every test module uses every helper.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod gateway;
pub mod raw;
pub mod redis;
pub mod upstream;

use std::time::Duration;

pub use client::{Client, Reply as ClientReply};
pub use gateway::TestGateway;
pub use raw::{AfterAnswer, RawUpstream};
pub use redis::RedisServer;
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
