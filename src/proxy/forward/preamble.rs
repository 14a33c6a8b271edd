//! Holding back an SSE stream's preamble (role-only chunk, comments, empty
//! deltas) until its first content, so an upstream that fails before any
//! text still fails over (SPEC §3).

use super::*;

/// Events of a stream preamble held back at most, and their bytes.
const PREAMBLE_EVENTS: usize = 16;

const PREAMBLE_BYTES: usize = 16 * 1024;

pub(super) fn is_event_stream<B>(resp: &Response<B>) -> bool {
    resp.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| sse::is_event_stream(v.as_bytes()))
}

/// For an SSE response, reads until its first content event (bounded in
/// events, bytes, by `deadline` and by `idle` between frames, as the
/// stream is once it flows) and returns the response with what was read
/// put back in front; an error if the stream fails, stalls or ends first,
/// so that the caller can fail over. At `deadline`, if `release` says
/// so then, the stream goes on as it is instead. Other answers are held
/// for their first bytes ([`first_frame_held`]), while another member
/// `can_take_over`.
pub(super) async fn hold_preamble(
    resp: Response<BoxBody>,
    deadline: Instant,
    release: impl Fn() -> bool,
    can_take_over: impl Fn() -> bool,
    idle: Duration,
) -> Result<Response<BoxBody>, Preamble> {
    if !is_event_stream(&resp) {
        return first_frame_held(resp, deadline, release, can_take_over, idle).await;
    }
    // A compressed stream (sent though sluice asked for `identity`) has
    // no events to read: it passes as it came, as on a single upstream.
    if headers::is_compressed(resp.headers()) {
        return Ok(resp);
    }
    let (parts, mut body) = resp.into_parts();
    let mut held = Vec::new();
    let mut splitter = sse::EventSplitter::default();
    let (mut events, mut bytes) = (0usize, 0usize);
    loop {
        let quiet_at = Instant::now() + idle;
        let frame = match tokio::time::timeout_at(deadline.min(quiet_at).into(), body.frame()).await
        {
            Err(_) if quiet_at < deadline => return Err(Preamble::Quiet),
            Err(_) if release() => break,
            Err(_) => return Err(Preamble::TimedOut),
            Ok(None) => return Err(Preamble::Broke("stream ended before content")),
            Ok(Some(Err(_))) => return Err(Preamble::Broke("stream broke before content")),
            Ok(Some(Ok(frame))) => frame,
        };
        let Some(data) = frame.data_ref() else {
            held.push(frame);
            break; // trailers: nothing more to wait for
        };
        bytes += data.len();
        splitter.push(data);
        held.push(frame);
        let mut content = false;
        while let Some(event) = splitter.next_event() {
            events += 1;
            if !content && sse::is_error_event(&event) {
                // It failed before producing anything: the next member
                // can still answer instead (SPEC §3).
                return Err(Preamble::ReportedError);
            }
            content |= !sse::is_preamble(&event);
        }
        if content || events >= PREAMBLE_EVENTS || bytes >= PREAMBLE_BYTES {
            break;
        }
    }
    Ok(Response::from_parts(
        parts,
        body::Replay::new(held, body).boxed_unsync(),
    ))
}

/// A pool member's answer other than a stream, held until its body's
/// first bytes: one that breaks before them (an upstream that closed or
/// garbled its body right after the head), or stalls before them, has
/// sent the client nothing, so the next member may still answer (SPEC
/// §3) rather than the client getting an empty reply or a cut one.
/// Bounded by `deadline` (first_byte) and `idle`, as a stream's preamble
/// is; past `idle`, when no member `can_take_over`, and at `deadline`,
/// when `release` says so then, it goes on as it is, as it would on a
/// route to its upstream alone.
async fn first_frame_held(
    resp: Response<BoxBody>,
    deadline: Instant,
    release: impl Fn() -> bool,
    can_take_over: impl Fn() -> bool,
    idle: Duration,
) -> Result<Response<BoxBody>, Preamble> {
    if http_body::Body::is_end_stream(resp.body()) {
        return Ok(resp);
    }
    let (parts, mut body) = resp.into_parts();
    let quiet_at = Instant::now() + idle;
    match tokio::time::timeout_at(deadline.min(quiet_at).into(), body.frame()).await {
        Err(_) if quiet_at < deadline && can_take_over() => Err(Preamble::Quiet),
        Err(_) if quiet_at < deadline || release() => Ok(Response::from_parts(parts, body)),
        Err(_) => Err(Preamble::TimedOut),
        Ok(Some(Err(_))) => Err(Preamble::Broke("answer broke before its body")),
        Ok(Some(Ok(first))) => Ok(Response::from_parts(
            parts,
            body::Replay::new(vec![first], body).boxed_unsync(),
        )),
        Ok(None) => Ok(Response::from_parts(parts, body)),
    }
}

/// Why a held stream preamble never reached content.
pub(super) enum Preamble {
    /// No content within `first_byte` (or the request's deadline).
    TimedOut,
    /// Nothing at all for the upstream's `idle`.
    Quiet,
    /// The stream broke or ended.
    Broke(&'static str),
    /// The stream's first event past the preamble was an error.
    ReportedError,
}

impl Preamble {
    pub(super) fn text(&self) -> &'static str {
        match self {
            Preamble::TimedOut => "timed out before content",
            Preamble::Quiet => "went quiet before content",
            Preamble::Broke(text) => text,
            Preamble::ReportedError => "stream reported an error before content",
        }
    }
}
