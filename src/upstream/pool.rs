//! Helpers of the failover loop that need no request context: reading a
//! `retry-after`, and rewriting the body's `model` for one member.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use crate::llm::{facts, splice};

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
/// nothing changes (no map, not JSON, no such model). Only the name's
/// bytes change: a structured output's schema keeps its key order, which
/// the model follows, and numbers keep their spelling.
pub fn rewrite_model(body: &Bytes, models: &HashMap<String, String>) -> Option<Bytes> {
    if models.is_empty() {
        return None;
    }
    let Some(request) = facts::parse::<ModelRequest>(body) else {
        return rewrite_model_whole(body, models);
    };
    let raw = request.model.0?;
    let to = models.get(&serde_json::from_str::<String>(raw.get()).ok()?)?;
    let name = serde_json::to_vec(to).ok()?;
    Some(splice::spliced(
        body,
        splice::span_of(body, raw.get())?,
        &name,
    ))
}

/// [`rewrite_model`] for a body the typed view refuses: `model` written
/// twice, which upstreams read as its last value, as `Value` does. The
/// whole body is rewritten.
fn rewrite_model_whole(body: &Bytes, models: &HashMap<String, String>) -> Option<Bytes> {
    let mut json: Value = serde_json::from_slice(body).ok()?;
    let to = models.get(json.get("model")?.as_str()?)?;
    json["model"] = Value::String(to.clone());
    serde_json::to_vec(&json).ok().map(Bytes::from)
}

/// A request's `model` as written.
#[derive(serde::Deserialize)]
struct ModelRequest<'a> {
    #[serde(borrow, default)]
    model: splice::Member<'a>,
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

    #[test]
    fn a_model_rewrite_keeps_every_other_byte() {
        let models = HashMap::from([("alias".to_owned(), "gpt-4o-mini".to_owned())]);
        let body = Bytes::from_static(
            br#"{"seed":123456789012345678901,"temperature":1e0, "model" : "alias","response_format":{"z":1,"a":"\u00e9"}}"#,
        );
        assert_eq!(
            &rewrite_model(&body, &models).unwrap()[..],
            br#"{"seed":123456789012345678901,"temperature":1e0, "model" : "gpt-4o-mini","response_format":{"z":1,"a":"\u00e9"}}"#
        );
        // Escaped in the request, the name is still the one renamed.
        let escaped = Bytes::from_static(br#"{"model":"\u0061lias"}"#);
        assert_eq!(
            &rewrite_model(&escaped, &models).unwrap()[..],
            br#"{"model":"gpt-4o-mini"}"#
        );
        // Written twice, the last one counts, as upstreams read it.
        let twice = Bytes::from_static(br#"{"model":"x","model":"alias"}"#);
        let out: Value = serde_json::from_slice(&rewrite_model(&twice, &models).unwrap()).unwrap();
        assert_eq!(out["model"], "gpt-4o-mini");
        assert!(rewrite_model(&Bytes::from_static(br#"{"model":7}"#), &models).is_none());
        assert!(rewrite_model(&Bytes::from_static(br#"["alias"]"#), &models).is_none());
    }
}
