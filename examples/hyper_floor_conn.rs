//! Like `hyper_floor`, but each client connection gets its own upstream
//! connection through `hyper::client::conn::http1` (no shared pool): how
//! much any shared pool costs on top of hyper itself.
//!
//! `cargo run --release --example hyper_floor_conn -- 127.0.0.1:18083 127.0.0.1:18000`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::sync::Mutex;

type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, hyper::Error>;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 18083)));
    let upstream: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 18000)));
    let Ok(listener) = tokio::net::TcpListener::bind(listen).await else {
        eprintln!("hyper_floor_conn: cannot listen on {listen}");
        return;
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            let _ = up.set_nodelay(true);
            let Ok((sender, conn)) =
                hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(up)).await
            else {
                return;
            };
            tokio::spawn(conn);
            let sender = Arc::new(Mutex::new(sender));
            let service = service_fn(move |req: Request<Incoming>| {
                let sender = sender.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let req = Request::from_parts(parts, body.boxed_unsync());
                    let mut s = sender.lock().await;
                    let resp = match s.send_request(req).await {
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
