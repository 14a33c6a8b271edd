//! The admin listener: `/healthz` (alive), `/readyz` (serving, 503 while
//! starting or draining) and `/metrics` (Prometheus text format). It lives
//! on its own port so the Service that clients use never exposes it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::accept::AcceptErrors;
use crate::body::{BoxBody, full};
use crate::gateway::Gateway;
use crate::proxy::error::ProxyError;
use crate::proxy::headers::{X_REQUEST_ID, request_id};

/// How long an admin connection may take to send a request head, also
/// its first byte: the port is reachable from outside the pod, and a
/// connection that says nothing must not hold a descriptor for ever.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The most admin connections open at once: Prometheus and the kubelet
/// need a handful, and a flood on this port must not spend the
/// descriptors the proxy serves with. A new connection past it closes
/// the oldest, so that connections held open (never sending, or never
/// reading their answers) cannot keep a probe out.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

pub async fn serve(gw: Arc<Gateway>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    // HTTP/1.1 only (Prometheus and the kubelet speak it): the protocol
    // sniffing of an auto builder waits for a first byte with no timer.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    let builder = Arc::new(builder);
    let mut accept_errors = AcceptErrors::new("admin");
    // Oldest first.
    let mut open: VecDeque<AbortHandle> = VecDeque::with_capacity(MAX_ADMIN_CONNECTIONS);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_errors.back_off(&e).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        open.retain(|connection| !connection.is_finished());
        if open.len() >= MAX_ADMIN_CONNECTIONS
            && let Some(oldest) = open.pop_front()
        {
            oldest.abort();
        }
        let gw = gw.clone();
        let builder = builder.clone();
        let connection = tokio::spawn(async move {
            let service = service_fn(move |req| {
                let gw = gw.clone();
                async move { Ok::<_, Infallible>(respond(&gw, &req).await) }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        open.push_back(connection.abort_handle());
    }
}

/// Every answer carries `x-request-id` (the caller's, else a new one),
/// as the proxy's do (SPEC §3): a probe's failure can be matched to
/// what the prober logged.
async fn respond(gw: &Gateway, req: &Request<Incoming>) -> Response<BoxBody> {
    let mut resp = answer(gw, req).await;
    resp.headers_mut()
        .insert(X_REQUEST_ID, request_id(req.headers()));
    resp
}

async fn answer(gw: &Gateway, req: &Request<Incoming>) -> Response<BoxBody> {
    // Errors in the OpenAI shape, as every error sluice makes (SPEC §3).
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let allow = HeaderValue::from_static("GET, HEAD");
        return ProxyError::MethodNotAllowed { allow }.into_response();
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if gw.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            let mut resp = Response::new(full(gw.render_metrics().await));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => ProxyError::RouteNotFound.into_response(),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<BoxBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
