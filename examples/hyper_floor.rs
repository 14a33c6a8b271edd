//! The floor of a hyper-based proxy: the same server and pooled client
//! sluice uses, with no routing, auth, metrics or logging. `bench/run.sh`
//! can run it beside sluice (`FLOOR=1`) to tell framework cost from
//! sluice's own.
//!
//! `cargo run --release --example hyper_floor -- 127.0.0.1:18082 http://127.0.0.1:18000`

use std::convert::Infallible;
use std::net::SocketAddr;

use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, hyper::Error>;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 18082)));
    let upstream: http::Uri = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| http::Uri::from_static("http://127.0.0.1:18000"));
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Body> =
        Client::builder(TokioExecutor::new()).build(connector);
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hyper_floor: cannot listen on {listen}: {e}");
            return;
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let client = client.clone();
                let upstream = upstream.clone();
                async move {
                    let (mut parts, body) = req.into_parts();
                    let mut uri = upstream.into_parts();
                    uri.path_and_query = parts.uri.path_and_query().cloned();
                    parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
                    let req = Request::from_parts(parts, body.boxed_unsync());
                    let resp = match client.request(req).await {
                        Ok(resp) => resp.map(|b| b.boxed_unsync()),
                        Err(_) => {
                            let mut r = http::Response::new(
                                http_body_util::Empty::new()
                                    .map_err(|never| match never {})
                                    .boxed_unsync(),
                            );
                            *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                            r
                        }
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
