//! Budget alerts leave the request path here: each one is logged as a
//! `budget_alert` warning, counted, and (when `budget.webhook_url` is set)
//! POSTed as JSON by a background task with bounded retries, so a slow or
//! dead webhook never delays a request.

use std::time::Duration;

use http::Request;
use serde_json::json;
use tokio::sync::mpsc;

use crate::body;
use crate::state::budget::Alert;
use crate::upstream::client;

/// Alerts waiting for the webhook; beyond this many, new ones are dropped
/// (and still logged and counted).
const QUEUE: usize = 256;
const ATTEMPTS: u32 = 3;

/// One alert to deliver.
pub struct Delivery {
    pub url: String,
    pub scope: String,
    /// Whose spend, for a tier's per-identity budget (`None`: global).
    pub identity: Option<String>,
    pub alert: Alert,
}

/// Starts the webhook sender; returns where to queue deliveries.
pub fn spawn_webhook_sender() -> Option<mpsc::Sender<Delivery>> {
    let rt = tokio::runtime::Handle::try_current().ok()?;
    let (tx, mut rx) = mpsc::channel::<Delivery>(QUEUE);
    rt.spawn(async move {
        while let Some(d) = rx.recv().await {
            deliver(d).await;
        }
    });
    Some(tx)
}

async fn deliver(d: Delivery) {
    let Ok(uri) = d.url.parse::<http::Uri>() else {
        tracing::warn!("budget webhook_url is not a URL");
        return;
    };
    let http_client = match uri.scheme_str() {
        Some("https") => match client::build_tls(None, Duration::from_secs(5)) {
            Ok(c) => c,
            Err(_) => return,
        },
        _ => client::build_plain(Duration::from_secs(5)),
    };
    let payload = json!({
        "event": "budget_alert",
        "scope": d.scope,
        "identity": d.identity,
        "threshold": d.alert.threshold,
        "spent_usd": d.alert.spent_usd,
        "budget_usd": d.alert.budget_usd,
    })
    .to_string();
    for attempt in 0..ATTEMPTS {
        let req = Request::post(uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body::full(payload.clone()));
        let Ok(req) = req else { return };
        match tokio::time::timeout(Duration::from_secs(10), http_client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => return,
            _ => tokio::time::sleep(Duration::from_millis(500 << attempt)).await,
        }
    }
    // The URL may carry a token: it is not logged.
    tracing::warn!(scope = %d.scope, "budget webhook failed after {ATTEMPTS} attempts");
}
