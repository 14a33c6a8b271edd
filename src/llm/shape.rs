//! The shapes of OpenAI API requests, for `validate: openai`: required
//! fields, types, roles and ranges of chat completions, completions,
//! embeddings and responses requests, checked before a malformed request
//! costs an upstream call. A failure names the JSON path to blame.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// Why a request does not have its endpoint's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// `messages[1].role`; empty for the body as a whole.
    pub path: String,
    pub message: String,
}

/// Which OpenAI endpoint a path is, by its end (any prefix before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
}

/// A request path as an API reads it, trailing slashes dropped. The path
/// is already in normal form (`proxy::route::normalized`: escapes of
/// letters decoded, dot segments resolved), so `/v1/chat/%63ompletions`
/// reaches validation and metering as chat completions.
pub fn api_path(path: &str) -> &str {
    path.trim_end_matches('/')
}

/// The path as an app routes it that takes paths in any case (Express,
/// ASP.NET Core; compare with [`ends_with_ignore_case`]) or drops `;`
/// parameters from its segments (Java servers): without those and
/// without a final slash.
pub fn routed_path(path: &str) -> std::borrow::Cow<'_, str> {
    let path = api_path(path);
    if !path.contains(';') {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(segment.split(';').next().unwrap_or(segment));
    }
    std::borrow::Cow::Owned(api_path(&out).to_owned())
}

/// Whether `path` ends with `suffix`, in any case.
pub fn ends_with_ignore_case(path: &str, suffix: &str) -> bool {
    path.len() >= suffix.len()
        && path.as_bytes()[path.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

impl Endpoint {
    /// Read as an app that takes paths in any case (Express, ASP.NET
    /// Core) or drops `;` parameters (Java servers) would route it: a
    /// spelling that reaches its chat handler is validated and metered
    /// as chat.
    pub fn of(path: &str) -> Option<Self> {
        let path = routed_path(path);
        let ends_with = |suffix: &str| ends_with_ignore_case(&path, suffix);
        if ends_with("/chat/completions") {
            Some(Endpoint::ChatCompletions)
        } else if ends_with("/completions") {
            Some(Endpoint::Completions)
        } else if ends_with("/embeddings") {
            Some(Endpoint::Embeddings)
        } else if ends_with("/responses") {
            Some(Endpoint::Responses)
        } else {
            None
        }
    }
}

/// Whether the path names the model, as Azure OpenAI's
/// `/openai/deployments/{deployment}/chat/completions` does: its bodies
/// carry no `model`.
pub fn model_in_path(path: &str) -> bool {
    path.contains("/deployments/")
}

const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// Checks `body` against `endpoint`'s shape; `model_in_path` when the
/// path names the model (see [`model_in_path`]).
pub fn check(endpoint: Endpoint, model_in_path: bool, body: &Value) -> Result<(), Invalid> {
    let Some(body) = body.as_object() else {
        return Err(Invalid {
            path: String::new(),
            message: format!("the body must be a JSON object, not {}", kind(body)),
        });
    };
    let at = Obj {
        map: body,
        path: Cow::Borrowed(""),
    };
    // A responses request may take its model from a stored prompt
    // (`prompt: {id}`); an Azure deployment's path names it.
    if model_in_path || endpoint == Endpoint::Responses {
        at.optional("model", &[Type::String])?;
    } else {
        at.required("model", &[Type::String])?;
    }
    at.non_empty_string("model")?;
    match endpoint {
        Endpoint::ChatCompletions => chat(&at),
        Endpoint::Completions => completions(&at),
        Endpoint::Embeddings => embeddings(&at),
        Endpoint::Responses => responses(&at),
    }
}

fn chat(at: &Obj<'_>) -> Result<(), Invalid> {
    let messages = at.required("messages", &[Type::Array])?;
    let messages = messages.as_array().map(Vec::as_slice).unwrap_or_default();
    if messages.is_empty() {
        return Err(at.invalid("messages", "must hold at least one message".to_owned()));
    }
    for (i, message) in messages.iter().enumerate() {
        let m = object(message, format!("messages[{i}]"))?;
        let map = m.map;
        m.required("role", &[Type::String])?;
        let role = map.get("role").and_then(Value::as_str).unwrap_or("");
        if !ROLES.contains(&role) {
            return Err(m.invalid(
                "role",
                format!("must be one of {}, not {role:?}", ROLES.join(", ")),
            ));
        }
        match role {
            // An assistant's tool call has no text; nor may the legacy
            // `function` role's result.
            "assistant" | "function" => {
                m.optional("content", &[Type::String, Type::Array, Type::Null])?;
            }
            _ => {
                m.required("content", &[Type::String, Type::Array])?;
            }
        }
        if role == "tool" {
            m.required("tool_call_id", &[Type::String])?;
        }
        if let Some(Value::Array(parts)) = map.get("content") {
            for (j, part) in parts.iter().enumerate() {
                content_part(&object(part, m.path_of(&format!("content[{j}]")))?)?;
            }
        }
        if let Some(calls) = map.get("tool_calls") {
            m.typed("tool_calls", calls, &[Type::Array, Type::Null])?;
            for (j, call) in calls.as_array().into_iter().flatten().enumerate() {
                let call = object(call, m.path_of(&format!("tool_calls[{j}]")))?;
                call.required("id", &[Type::String])?;
                // A `custom` tool's call carries `custom: {name, input}`
                // instead; types this does not know are left to the API.
                let kind = call.map.get("type").and_then(Value::as_str);
                if kind.is_none_or(|k| k == "function") {
                    let function = call.required_object("function")?;
                    function.required("name", &[Type::String])?;
                    function.required("arguments", &[Type::String])?;
                }
            }
        }
    }
    if let Some(tools) = at.map.get("tools") {
        at.typed("tools", tools, &[Type::Array, Type::Null])?;
        for (i, tool) in tools.as_array().into_iter().flatten().enumerate() {
            let tool = object(tool, format!("tools[{i}]"))?;
            tool.required("type", &[Type::String])?;
            if tool.map.get("type").and_then(Value::as_str) == Some("function") {
                let function = tool.required_object("function")?;
                function.required("name", &[Type::String])?;
                function.non_empty_string("name")?;
            }
        }
    }
    match at.map.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(choice @ Value::Object(map)) => {
            // `{"type": "function", "function": {"name": …}}`; other
            // types (`allowed_tools`, `custom`) are left to the API.
            if map.get("type").and_then(Value::as_str) == Some("function") {
                object(choice, "tool_choice".to_owned())?
                    .required_object("function")?
                    .required("name", &[Type::String])?;
            }
        }
        Some(Value::String(choice)) if ["none", "auto", "required"].contains(&choice.as_str()) => {}
        Some(other) => {
            return Err(at.invalid(
                "tool_choice",
                format!("must be none, auto, required or an object naming a tool, not {other}"),
            ));
        }
    }
    if let Some(format) = at.map.get("response_format") {
        at.typed("response_format", format, &[Type::Object, Type::Null])?;
        if format.is_object() {
            let format = object(format, "response_format".to_owned())?;
            format.required("type", &[Type::String])?;
            if format.map.get("type").and_then(Value::as_str) == Some("json_schema") {
                format
                    .required_object("json_schema")?
                    .required("name", &[Type::String])?;
            }
        }
    }
    sampling(at)?;
    at.optional("max_tokens", &[Type::Integer, Type::Null])?;
    at.at_least("max_tokens", 1)?;
    at.optional("max_completion_tokens", &[Type::Integer, Type::Null])?;
    at.at_least("max_completion_tokens", 1)?;
    at.optional("stop", &[Type::String, Type::Array, Type::Null])?;
    stream_options(at)?;
    at.optional("seed", &[Type::Integer, Type::Null])?;
    at.optional("logprobs", &[Type::Bool, Type::Null])?;
    at.optional("top_logprobs", &[Type::Integer, Type::Null])?;
    at.range("top_logprobs", 0.0, 20.0)?;
    at.optional("parallel_tool_calls", &[Type::Bool, Type::Null])?;
    if let Some(bias) = at.map.get("logit_bias") {
        at.typed("logit_bias", bias, &[Type::Object, Type::Null])?;
        if bias.is_object() {
            let bias = object(bias, "logit_bias".to_owned())?;
            for (token, value) in bias.map {
                bias.typed(token, value, &[Type::Number])?;
                bias.range(token, -100.0, 100.0)?;
            }
        }
    }
    metadata(at)?;
    at.optional("user", &[Type::String, Type::Null])
}

/// `stream_options`, where its one flag is a boolean.
fn stream_options(at: &Obj<'_>) -> Result<(), Invalid> {
    at.optional("stream_options", &[Type::Object, Type::Null])?;
    if let Some(options) = at.map.get("stream_options").filter(|o| o.is_object()) {
        object(options, "stream_options".to_owned())?
            .optional("include_usage", &[Type::Bool, Type::Null])?;
    }
    Ok(())
}

/// `metadata`: an object of strings.
fn metadata(at: &Obj<'_>) -> Result<(), Invalid> {
    if let Some(metadata) = at.map.get("metadata") {
        at.typed("metadata", metadata, &[Type::Object, Type::Null])?;
        if metadata.is_object() {
            let metadata = object(metadata, "metadata".to_owned())?;
            for (key, value) in metadata.map {
                metadata.typed(key, value, &[Type::String])?;
            }
        }
    }
    Ok(())
}

/// A message's content part: its `type`, and for the types OpenAI
/// defines, the member that carries it (other types pass, for APIs
/// newer than this check).
fn content_part(part: &Obj<'_>) -> Result<(), Invalid> {
    part.required("type", &[Type::String])?;
    let carrier = match part.map.get("type").and_then(Value::as_str) {
        Some("text") => return part.required("text", &[Type::String]).map(drop),
        Some("image_url") => Some(("image_url", "url")),
        Some("input_audio") => Some(("input_audio", "data")),
        _ => None,
    };
    if let Some((member, inner)) = carrier {
        part.required_object(member)?
            .required(inner, &[Type::String])?;
    }
    Ok(())
}

/// `value` as an object at `path`, or the error saying it is not one.
fn object(value: &Value, path: String) -> Result<Obj<'_>, Invalid> {
    match value.as_object() {
        Some(map) => Ok(Obj {
            map,
            path: Cow::Owned(path),
        }),
        None => Err(Invalid {
            message: format!("`{path}` must be an object, not {}", kind(value)),
            path,
        }),
    }
}

fn completions(at: &Obj<'_>) -> Result<(), Invalid> {
    // Required, as OpenAI's API reference has it (a missing prompt is
    // OpenAI's 400 `missing_required_parameter`), and nullable, as its
    // API spec has it (null is its `<|endoftext|>` default).
    at.required("prompt", &[Type::String, Type::Array, Type::Null])?;
    sampling(at)?;
    at.optional("max_tokens", &[Type::Integer, Type::Null])?;
    at.at_least("max_tokens", 0)?;
    at.optional("stop", &[Type::String, Type::Array, Type::Null])?;
    stream_options(at)?;
    at.optional("logprobs", &[Type::Integer, Type::Null])?;
    at.range("logprobs", 0.0, 5.0)?;
    at.optional("best_of", &[Type::Integer, Type::Null])?;
    at.at_least("best_of", 1)?;
    at.optional("suffix", &[Type::String, Type::Null])
}

fn embeddings(at: &Obj<'_>) -> Result<(), Invalid> {
    let input = at.required("input", &[Type::String, Type::Array])?;
    let empty = match input {
        Value::String(s) => s.is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    };
    if empty {
        return Err(at.invalid("input", "must not be empty".to_owned()));
    }
    // A list is of texts, of tokens, or of lists of tokens, none empty.
    if let Value::Array(items) = input {
        let texts = items
            .iter()
            .all(|i| i.as_str().is_some_and(|s| !s.is_empty()));
        let tokens = items.iter().all(|i| i.is_u64());
        let token_lists = items.iter().all(|i| {
            i.as_array()
                .is_some_and(|t| !t.is_empty() && t.iter().all(Value::is_u64))
        });
        if !(texts || tokens || token_lists) {
            return Err(at.invalid(
                "input",
                "must be a list of texts, of tokens or of token lists, none empty".to_owned(),
            ));
        }
    }
    at.optional("dimensions", &[Type::Integer, Type::Null])?;
    at.at_least("dimensions", 1)?;
    at.optional("encoding_format", &[Type::String, Type::Null])?;
    if let Some(format) = at.map.get("encoding_format").and_then(Value::as_str)
        && format != "float"
        && format != "base64"
    {
        return Err(at.invalid(
            "encoding_format",
            format!("must be float or base64, not {format:?}"),
        ));
    }
    at.optional("user", &[Type::String, Type::Null])
}

fn responses(at: &Obj<'_>) -> Result<(), Invalid> {
    // Null is left out, as with a stored prompt that supplies the input.
    at.optional("input", &[Type::String, Type::Array, Type::Null])?;
    at.optional("instructions", &[Type::String, Type::Null])?;
    at.optional("stream", &[Type::Bool, Type::Null])?;
    at.optional("temperature", &[Type::Number, Type::Null])?;
    at.range("temperature", 0.0, 2.0)?;
    at.optional("top_p", &[Type::Number, Type::Null])?;
    at.range("top_p", 0.0, 1.0)?;
    at.optional("max_output_tokens", &[Type::Integer, Type::Null])?;
    at.at_least("max_output_tokens", 1)?;
    at.optional("tools", &[Type::Array, Type::Null])?;
    if let Some(Value::Array(tools)) = at.map.get("tools") {
        for (i, tool) in tools.iter().enumerate() {
            object(tool, at.path_of(&format!("tools[{i}]")))?.required("type", &[Type::String])?;
        }
    }
    if let Some(Value::Array(items)) = at.map.get("input") {
        for (i, item) in items.iter().enumerate() {
            let item = object(item, at.path_of(&format!("input[{i}]")))?;
            // A message (typed so, or untyped with a role): a role the
            // API knows, and text or parts.
            let typed = item.map.get("type").and_then(Value::as_str);
            if matches!(typed, None | Some("message")) && item.map.contains_key("role") {
                item.required("role", &[Type::String])?;
                let role = item.map.get("role").and_then(Value::as_str).unwrap_or("");
                if !["user", "assistant", "system", "developer"].contains(&role) {
                    return Err(item.invalid(
                        "role",
                        format!("must be user, assistant, system or developer, not {role:?}"),
                    ));
                }
                item.required("content", &[Type::String, Type::Array])?;
            }
        }
    }
    metadata(at)?;
    at.optional("previous_response_id", &[Type::String, Type::Null])
}

/// Fields chat and completions share.
fn sampling(at: &Obj<'_>) -> Result<(), Invalid> {
    at.optional("stream", &[Type::Bool, Type::Null])?;
    at.optional("temperature", &[Type::Number, Type::Null])?;
    at.range("temperature", 0.0, 2.0)?;
    at.optional("top_p", &[Type::Number, Type::Null])?;
    at.range("top_p", 0.0, 1.0)?;
    at.optional("n", &[Type::Integer, Type::Null])?;
    at.range("n", 1.0, 128.0)?;
    at.optional("presence_penalty", &[Type::Number, Type::Null])?;
    at.range("presence_penalty", -2.0, 2.0)?;
    at.optional("frequency_penalty", &[Type::Number, Type::Null])?;
    at.range("frequency_penalty", -2.0, 2.0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    String,
    Integer,
    Number,
    Bool,
    Array,
    Object,
    Null,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::String => "a string",
            Type::Integer => "an integer",
            Type::Number => "a number",
            Type::Bool => "a boolean",
            Type::Array => "an array",
            Type::Object => "an object",
            Type::Null => "null",
        }
    }

    fn admits(self, value: &Value) -> bool {
        match self {
            Type::String => value.is_string(),
            // A whole number written as a float (`100.0`, `1e2`), as JSON
            // Schema counts it and Python code that computes one sends it.
            Type::Integer => {
                value.is_i64()
                    || value.is_u64()
                    || value.as_f64().is_some_and(|n| {
                        n.fract() == 0.0
                            && (-9.223_372_036_854_776e18..1.844_674_407_370_955_2e19).contains(&n)
                    })
            }
            Type::Number => value.is_number(),
            Type::Bool => value.is_boolean(),
            Type::Array => value.is_array(),
            Type::Object => value.is_object(),
            Type::Null => value.is_null(),
        }
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An object being checked, and where it is in the body.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: Cow<'a, str>,
}

impl<'a> Obj<'a> {
    fn path_of(&self, field: &str) -> String {
        if self.path.is_empty() {
            field.to_owned()
        } else {
            format!("{}.{field}", self.path)
        }
    }

    /// The member `field`, required to be an object.
    fn required_object(&self, field: &str) -> Result<Obj<'a>, Invalid> {
        let value = self.required(field, &[Type::Object])?;
        object(value, self.path_of(field))
    }

    fn invalid(&self, field: &str, what: String) -> Invalid {
        let path = self.path_of(field);
        Invalid {
            message: format!("`{path}` {what}"),
            path,
        }
    }

    fn required(&self, field: &str, types: &[Type]) -> Result<&'a Value, Invalid> {
        match self.map.get(field) {
            None => Err(self.invalid(field, "is required".to_owned())),
            Some(value) => {
                self.typed(field, value, types)?;
                Ok(value)
            }
        }
    }

    fn optional(&self, field: &str, types: &[Type]) -> Result<(), Invalid> {
        match self.map.get(field) {
            None => Ok(()),
            Some(value) => self.typed(field, value, types),
        }
    }

    fn typed(&self, field: &str, value: &Value, types: &[Type]) -> Result<(), Invalid> {
        if types.iter().any(|t| t.admits(value)) {
            return Ok(());
        }
        let wanted: Vec<&str> = types.iter().map(|t| t.name()).collect();
        Err(self.invalid(
            field,
            format!("must be {}, not {}", wanted.join(" or "), kind(value)),
        ))
    }

    fn non_empty_string(&self, field: &str) -> Result<(), Invalid> {
        match self.map.get(field).and_then(Value::as_str) {
            Some("") => Err(self.invalid(field, "must not be empty".to_owned())),
            _ => Ok(()),
        }
    }

    fn range(&self, field: &str, min: f64, max: f64) -> Result<(), Invalid> {
        match self.map.get(field).and_then(Value::as_f64) {
            Some(v) if !(min..=max).contains(&v) => {
                Err(self.invalid(field, format!("must be between {min} and {max}, not {v}")))
            }
            _ => Ok(()),
        }
    }

    fn at_least(&self, field: &str, min: i64) -> Result<(), Invalid> {
        match self.map.get(field) {
            Some(v) if v.as_f64().is_some_and(|n| n < min as f64) => {
                Err(self.invalid(field, format!("must be at least {min}, not {v}")))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(body: Value) -> Result<(), Invalid> {
        check(Endpoint::ChatCompletions, false, &body)
    }

    #[test]
    fn a_good_chat_request_passes() {
        let body = json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": null, "tool_calls": []},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"},
                {"role": "function", "name": "f", "content": null}
            ],
            "temperature": 0.2, "max_tokens": 10, "stream": true,
            "stream_options": {"include_usage": true}
        });
        assert_eq!(chat(body), Ok(()));
    }

    #[test]
    fn failures_name_the_path() {
        let cases = [
            (json!([]), ""),
            (json!({"messages": []}), "model"),
            (json!({"model": 4, "messages": []}), "model"),
            (json!({"model": "m"}), "messages"),
            (json!({"model": "m", "messages": []}), "messages"),
            (json!({"model": "m", "messages": ["hi"]}), "messages[0]"),
            (
                json!({"model": "m", "messages": [{"content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "x"}]}),
                "messages[1].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].tool_call_id",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"text": "x"}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}),
                "temperature",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}),
                "max_tokens",
            ),
        ];
        let user = |extra: Value| {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            body
        };
        let part = |p: Value| json!({"model": "m", "messages": [{"role": "user", "content": [p]}]});
        let nested = [
            (part(json!({"type": "text"})), "messages[0].content[0].text"),
            (
                part(json!({"type": "image_url", "image_url": {}})),
                "messages[0].content[0].image_url.url",
            ),
            (
                json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]}]}),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                user(json!({"tools": [{"type": "function"}]})),
                "tools[0].function",
            ),
            (
                user(json!({"tools": [{"type": "function", "function": {"name": ""}}]})),
                "tools[0].function.name",
            ),
            (user(json!({"tool_choice": "sometimes"})), "tool_choice"),
            (user(json!({"max_tokens": 1.5})), "max_tokens"),
            (
                user(json!({"tool_choice": {"type": "function", "function": {}}})),
                "tool_choice.function.name",
            ),
            (user(json!({"logprobs": "yes"})), "logprobs"),
            (user(json!({"top_logprobs": 30})), "top_logprobs"),
            (user(json!({"metadata": {"a": 1}})), "metadata.a"),
            (user(json!({"max_tokens": 0.0})), "max_tokens"),
            (user(json!({"n": 1e300})), "n"),
            (
                user(
                    json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
                ),
                "response_format.json_schema.name",
            ),
        ];
        for (body, path) in cases.into_iter().chain(nested) {
            let err = chat(body.clone()).expect_err(&body.to_string());
            assert_eq!(err.path, path, "{body}: {}", err.message);
        }
    }

    /// Whole numbers written as floats pass where an integer belongs,
    /// as JSON Schema (OpenAI's API spec) reads them.
    #[test]
    fn whole_floats_are_integers() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 100.0, "n": 1.0, "seed": 1e2, "max_completion_tokens": 2E1});
        assert_eq!(chat(body), Ok(()));
    }

    /// Valid requests of the current API pass: content parts of types
    /// this check does not know, explicit nulls, tools and schemas.
    #[test]
    fn modern_requests_pass() {
        let body = json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
                    {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}},
                    {"type": "file", "file": {"file_id": "file-1"}},
                    {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            ],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}},
            "user": null,
        });
        assert_eq!(chat(body), Ok(()));
        // A custom tool's call (GPT-5's free-form tools) has no `function`.
        let custom = json!({
            "model": "gpt-5",
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "custom", "custom": {"name": "code_exec", "input": "print(1)"}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "1"},
            ],
            "tools": [{"type": "custom", "custom": {"name": "code_exec"}}],
        });
        assert_eq!(chat(custom), Ok(()));
        let nulls = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": null, "response_format": null, "tool_choice": null});
        assert_eq!(chat(nulls), Ok(()));
        let embed = json!({"model": "e", "input": "x", "dimensions": null, "encoding_format": null, "user": null});
        assert_eq!(check(Endpoint::Embeddings, false, &embed), Ok(()));
    }

    /// A stored prompt gives a responses request its model; an Azure
    /// deployment's path does for any endpoint. Elsewhere it is required.
    #[test]
    fn the_model_may_come_from_a_prompt_or_the_path() {
        let prompt = json!({"prompt": {"id": "pmpt_1"}, "input": "hi"});
        assert_eq!(check(Endpoint::Responses, false, &prompt), Ok(()));
        let azure = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert!(model_in_path("/openai/deployments/gpt4/chat/completions"));
        assert_eq!(check(Endpoint::ChatCompletions, true, &azure), Ok(()));
        assert_eq!(
            check(Endpoint::ChatCompletions, false, &azure).map_err(|e| e.path),
            Err("model".to_owned())
        );
        let empty = json!({"model": "", "messages": [{"role": "user", "content": "hi"}]});
        assert!(check(Endpoint::ChatCompletions, true, &empty).is_err());
        assert!(!model_in_path("/v1/chat/completions"));
    }

    #[test]
    fn slashed_paths_are_the_endpoints_they_name() {
        assert_eq!(
            Endpoint::of("/v1/chat/completions/"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(api_path("/v1/models"), "/v1/models");
        for spelling in [
            "/v1/Chat/Completions",
            "/v1/chat/completions;x",
            "/v1/chat/completions;jsessionid=1/",
        ] {
            assert_eq!(
                Endpoint::of(spelling),
                Some(Endpoint::ChatCompletions),
                "{spelling}"
            );
        }
        assert_eq!(Endpoint::of("/v1/models;x"), None);
        assert_eq!(
            Endpoint::of("/v1/chat;x/completions"),
            Some(Endpoint::ChatCompletions)
        );
    }

    #[test]
    fn other_endpoints() {
        assert_eq!(Endpoint::of("/v1/embeddings"), Some(Endpoint::Embeddings));
        assert_eq!(
            Endpoint::of("/openai/v1/completions"),
            Some(Endpoint::Completions)
        );
        assert_eq!(Endpoint::of("/v1/models"), None);
        let embed = |b: Value| check(Endpoint::Embeddings, false, &b).map_err(|e| e.path);
        assert_eq!(embed(json!({"model": "e", "input": "x"})), Ok(()));
        assert_eq!(
            embed(json!({"model": "e", "input": []})),
            Err("input".into())
        );
        assert_eq!(embed(json!({"model": "e"})), Err("input".into()));
        let responses = |b: Value| check(Endpoint::Responses, false, &b).map_err(|e| e.path);
        assert_eq!(responses(json!({"model": "m", "input": "hi"})), Ok(()));
        assert_eq!(
            responses(json!({"prompt": {"id": "pmpt_1"}, "input": null})),
            Ok(())
        );
        assert_eq!(
            responses(json!({"model": "m", "input": 5})),
            Err("input".into())
        );
        let completions = |b: Value| check(Endpoint::Completions, false, &b).map_err(|e| e.path);
        assert_eq!(completions(json!({"model": "m", "prompt": "x"})), Ok(()));
        assert_eq!(completions(json!({"model": "m", "prompt": null})), Ok(()));
        assert_eq!(
            completions(json!({"model": "m", "prompt": "x", "n": 0})),
            Err("n".into())
        );
        assert_eq!(completions(json!({"model": "m"})), Err("prompt".into()));
    }

    /// Fields whose types and ranges the API's reference fixes: a wrong
    /// one is named, and every valid form still passes.
    #[test]
    fn typed_options_and_lists_are_checked() {
        let chat = |extra: Value| {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
                body.extend(extra.clone());
            }
            check(Endpoint::ChatCompletions, false, &body).map_err(|e| e.path)
        };
        for (extra, path) in [
            (json!({"parallel_tool_calls": "no"}), "parallel_tool_calls"),
            (
                json!({"stream_options": {"include_usage": "yes"}}),
                "stream_options.include_usage",
            ),
            (json!({"logit_bias": {"50256": 200}}), "logit_bias.50256"),
            (json!({"logit_bias": {"50256": "x"}}), "logit_bias.50256"),
            (json!({"n": 129}), "n"),
        ] {
            assert_eq!(chat(extra.clone()), Err(path.into()), "{extra}");
        }
        for extra in [
            json!({"parallel_tool_calls": false, "n": 128, "logit_bias": {"50256": -100}}),
            json!({"stream_options": {"include_usage": true, "include_obfuscation": false}}),
            json!({"logit_bias": null, "stream_options": null, "parallel_tool_calls": null}),
        ] {
            assert_eq!(chat(extra.clone()), Ok(()), "{extra}");
        }
        let completions = |b: Value| check(Endpoint::Completions, false, &b).map_err(|e| e.path);
        let prompt = |extra: Value| {
            let mut body = json!({"model": "m", "prompt": "x"});
            if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
                body.extend(extra.clone());
            }
            completions(body)
        };
        assert_eq!(prompt(json!({"logprobs": 6})), Err("logprobs".into()));
        assert_eq!(prompt(json!({"logprobs": true})), Err("logprobs".into()));
        assert_eq!(prompt(json!({"best_of": 0})), Err("best_of".into()));
        assert_eq!(prompt(json!({"logprobs": 5, "best_of": 2})), Ok(()));
        let embed = |input: Value| {
            check(
                Endpoint::Embeddings,
                false,
                &json!({"model": "e", "input": input}),
            )
            .map_err(|e| e.path)
        };
        for bad in [json!([1, "a"]), json!([""]), json!([[]]), json!([[1], 2])] {
            assert_eq!(embed(bad.clone()), Err("input".into()), "{bad}");
        }
        for good in [json!(["a", "b"]), json!([1, 2]), json!([[1, 2], [3]])] {
            assert_eq!(embed(good.clone()), Ok(()), "{good}");
        }
        let responses = |extra: Value| {
            let mut body = json!({"model": "m"});
            if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
                body.extend(extra.clone());
            }
            check(Endpoint::Responses, false, &body).map_err(|e| e.path)
        };
        for (extra, path) in [
            (
                json!({"input": [{"role": "bogus", "content": "x"}]}),
                "input[0].role",
            ),
            (
                json!({"input": [{"role": "user", "content": 5}]}),
                "input[0].content",
            ),
            (json!({"input": [5]}), "input[0]"),
            (json!({"tools": [{"name": "f"}]}), "tools[0].type"),
            (json!({"metadata": {"a": 1}}), "metadata.a"),
        ] {
            assert_eq!(responses(extra.clone()), Err(path.into()), "{extra}");
        }
        let items = json!({"input": [
            {"role": "developer", "content": "be brief"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "{}"},
            {"type": "item_reference", "id": "msg_1"},
        ], "tools": [{"type": "web_search"}], "metadata": {"a": "1"}});
        assert_eq!(responses(items), Ok(()));
    }
}
