//! The floor of a hyper-based proxy: the same server, pooled client
//! (sluice's own, `sluice::upstream::client`) and runtime choice sluice
//! uses, with no routing, auth, metrics or logging. `bench/run.sh` can run
//! it beside sluice (`FLOOR=1`) to tell framework cost from sluice's own.
//!
//! `cargo run --release --example hyper_floor -- 127.0.0.1:18082 http://127.0.0.1:18000`

use std::convert::Infallible;
use std::net::SocketAddr;

use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sluice::body::BodyError;

fn main() {
    // As `sluice run` does: one worker thread means a current-thread runtime.
    let one = std::env::var("TOKIO_WORKER_THREADS").is_ok_and(|v| v.trim() == "1");
    let runtime = if one {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match runtime {
        Ok(rt) => rt.block_on(serve()),
        Err(e) => eprintln!("hyper_floor: cannot start the runtime: {e}"),
    }
}

async fn serve() {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 18082)));
    let upstream: http::Uri = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| http::Uri::from_static("http://127.0.0.1:18000"));
    let client = sluice::upstream::client::build_plain(std::time::Duration::from_secs(5));
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
                    let req =
                        Request::from_parts(parts, body.map_err(BodyError::new).boxed_unsync());
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
            // The listener's settings that matter for cost (src/server/listener.rs).
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().writev(false);
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
