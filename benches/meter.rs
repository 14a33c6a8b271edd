//! Micro-benchmarks of usage metering, the work sluice does on every
//! answer it passes: a JSON chat completion read whole at its end, and a
//! 200-chunk OpenAI stream read event by event, with and without the
//! usage chunk stripped. `cargo bench --bench meter`.
use bytes::Bytes;
use sluice::llm::usage::Meter;

fn main() {
    divan::main();
}

fn openai_stream(chunks: usize) -> Vec<Bytes> {
    let mut frames = Vec::new();
    frames.push(Bytes::from_static(br#"data: {"id":"chatcmpl-AbC123xyz","object":"chat.completion.chunk","created":1732700000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}

"#));
    for i in 0..chunks {
        frames.push(Bytes::from(format!("data: {{\"id\":\"chatcmpl-AbC123xyz\",\"object\":\"chat.completion.chunk\",\"created\":1732700000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n")));
    }
    frames.push(Bytes::from_static(br#"data: {"id":"chatcmpl-AbC123xyz","object":"chat.completion.chunk","created":1732700000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}

"#));
    frames.push(Bytes::from_static(br#"data: {"id":"chatcmpl-AbC123xyz","object":"chat.completion.chunk","created":1732700000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":200,"total_tokens":212}}

"#));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

#[divan::bench]
fn meter_200_chunks(bencher: divan::Bencher) {
    let frames = openai_stream(200);
    bencher.bench_local(|| {
        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        for f in &frames {
            m.observe(f);
        }
        m.finish()
    });
}

#[divan::bench]
fn meter_and_strip_200_chunks(bencher: divan::Bencher) {
    let frames = openai_stream(200);
    bencher.bench_local(|| {
        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        m.strip_usage_chunk();
        let mut replaced = 0;
        for f in &frames {
            replaced += usize::from(m.observe(f).is_some());
        }
        (m.finish(), replaced)
    });
}

#[divan::bench]
fn json_answer(bencher: divan::Bencher) {
    let body = Bytes::from_static(br#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}"#);
    bencher.bench_local(|| {
        let mut m = Meter::for_content_type(b"application/json").unwrap();
        m.observe(&body);
        m.finish()
    });
}

/// A streamed chat request with a long conversation (~64 KB of messages):
/// sluice adds `stream_options.include_usage` to it.
#[divan::bench]
fn ask_for_usage_64k_request(bencher: divan::Bencher) {
    let turn = r#"{"role":"user","content":"Summarize the following paragraph about rivers, sluices and the locks that let boats climb from one level to the next, in plain words."},"#;
    let mut body =
        String::from(r#"{"model":"gpt-4o-mini","stream":true,"temperature":0.7,"messages":["#);
    while body.len() < 64 * 1024 {
        body.push_str(turn);
    }
    body.push_str(r#"{"role":"user","content":"Thanks!"}]}"#);
    let body = body.into_bytes();
    bencher.bench_local(|| sluice::llm::sse::ask_for_usage(&body));
}
