//! Helpers of the failover loop that need no request context: reading a
//! `retry-after`, and rewriting the body's `model` for one member.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

/// A `retry-after` in seconds or as an HTTP date, capped at an hour so a
/// broken upstream cannot park itself for days.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    const CAP: Duration = Duration::from_secs(3600);
    let text = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = match text.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(text)
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(CAP))
}

/// The body with its JSON `model` renamed per `models`, or `None` when
/// nothing changes (no map, not JSON, no such model).
pub fn rewrite_model(body: &Bytes, models: &HashMap<String, String>) -> Option<Bytes> {
    if models.is_empty() {
        return None;
    }
    let mut json: Value = serde_json::from_slice(body).ok()?;
    let to = models.get(json.get("model")?.as_str()?)?;
    json["model"] = Value::String(to.clone());
    serde_json::to_vec(&json).ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(http::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(http::header::RETRY_AFTER, "999999".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3600)));
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        h.insert(http::header::RETRY_AFTER, soon.parse().unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
    }

    #[test]
    fn model_rewrite_only_when_mapped() {
        let models = HashMap::from([("gpt-4o".to_owned(), "gpt-4o-2024-08-06".to_owned())]);
        let body = Bytes::from_static(br#"{"model":"gpt-4o","messages":[]}"#);
        let out = rewrite_model(&body, &models).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "gpt-4o-2024-08-06");
        assert_eq!(v["messages"], serde_json::json!([]));
        assert!(rewrite_model(&Bytes::from_static(br#"{"model":"other"}"#), &models).is_none());
        assert!(rewrite_model(&Bytes::from_static(b"not json"), &models).is_none());
        assert!(rewrite_model(&body, &HashMap::new()).is_none());
    }
}
