//! A connector whose whole connect, TCP and TLS handshake together, is
//! bounded by the upstream's `timeouts.connect`. hyper-util's HTTP
//! connector bounds the TCP part only: a port that accepts and then never
//! answers a ClientHello (a black-holed balancer, a wrong port) would hold
//! each attempt until `first_byte`, five minutes by default.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `inner`, each of whose connects is given `timeout` in all.
#[derive(Clone)]
pub struct Timed<C> {
    inner: C,
    timeout: Duration,
}

impl<C> Timed<C> {
    pub fn new(inner: C, timeout: Duration) -> Self {
        Timed { inner, timeout }
    }
}

impl<C> Service<Uri> for Timed<C>
where
    C: Service<Uri>,
    C::Response: 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                // Read as the TCP connect's own timeout is: `TimedOut`.
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the TLS handshake did not end within the connect timeout",
                )
                .into()),
            }
        })
    }
}
