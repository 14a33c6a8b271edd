//! What metering reads from one JSON object (a whole answer or one stream
//! event), parsed in one pass straight from the bytes: no `Value` tree,
//! strings borrowed unless they hold escapes, every other member skipped.
//!
//! Parsing is lenient on purpose. A member of an unexpected type (a float
//! token count, a numeric finish reason) is read as absent rather than
//! failing the whole object: one odd field must not cost the rest of the
//! metering. Only JSON that does not parse at all yields nothing, and
//! an object with a member written twice, which the member readers
//! refuse: upstream encoders build answers from maps and never write
//! one. (Client requests, which could, fall back to a `Value` where it
//! matters: `sse::ask_for_usage`, `limit::estimate_tokens`.)

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::LazyLock;

use memchr::memmem::Finder;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The members of an answer or event that metering uses. It repeats
/// [`Answer`]'s members rather than nesting one: an answer's members sit
/// at the top level of a JSON answer.
#[derive(Default)]
pub struct Facts<'a> {
    /// OpenAI's `{"error": {...}}`: present and not null.
    pub error: Option<IgnoredAny>,
    /// Anthropic's event `type` (`{"type": "error"}` among them).
    pub kind: Loose<Cow<'a, str>>,
    /// Anthropic's `message_start` wraps the message here.
    pub message: Loose<Answer<'a>>,
    /// The responses API's `response.completed` wraps its answer here.
    pub response: Loose<Answer<'a>>,
    pub model: Loose<Cow<'a, str>>,
    pub usage: Loose<Counts>,
    pub choices: Loose<Choices<'a>>,
    pub stop_reason: Loose<Cow<'a, str>>,
    /// Anthropic's `message_delta` carries `delta.stop_reason`.
    pub delta: Loose<Delta<'a>>,
}

/// An answer's own members: a whole JSON answer, or the message or
/// answer an event wraps (which has no `choices`).
#[derive(Default)]
pub struct Answer<'a> {
    pub model: Loose<Cow<'a, str>>,
    pub usage: Loose<Counts>,
    pub choices: Loose<Choices<'a>>,
    pub stop_reason: Loose<Cow<'a, str>>,
    /// The responses API says how an answer ended by its `status`, the
    /// `incomplete_details` of an incomplete one, and its `output` items.
    pub status: Loose<Cow<'a, str>>,
    pub incomplete_details: Loose<Incomplete<'a>>,
    pub output: Loose<Output>,
    /// An error object (not null), which some servers answer with a
    /// 200, and the responses API puts in a failed answer.
    pub error: Option<IgnoredAny>,
}

impl<'a> Answer<'a> {
    /// Why the answer ended, as its API says it, by choice index: each
    /// chat choice's `finish_reason` (`None` when it gives none), else
    /// Anthropic's `stop_reason`, or the responses API's status in chat's
    /// words (a dashboard watching `length` sees both), as choice 0.
    pub fn finish_reasons(self) -> Ends<'a> {
        let responses = self.status_reason();
        match self.choices.0 {
            Some(choices) if !choices.ends.is_empty() => choices.ends,
            _ => self
                .stop_reason
                .0
                .or(responses.map(Cow::Borrowed))
                .map(|reason| smallvec::smallvec![(0, Some(reason))])
                .unwrap_or_default(),
        }
    }

    /// The responses API's `status` as a chat `finish_reason`.
    pub fn status_reason(&self) -> Option<&'static str> {
        match self.status.0.as_deref()? {
            "completed" if self.output.0.as_ref().is_some_and(|o| o.function_call) => {
                Some("tool_calls")
            }
            "completed" => Some("stop"),
            "incomplete" => match self.incomplete_details.0.as_ref()?.reason.0.as_deref()? {
                "max_output_tokens" => Some("length"),
                "content_filter" => Some("content_filter"),
                _ => None,
            },
            "failed" => Some("error"),
            "cancelled" => Some("cancelled"),
            _ => None,
        }
    }
}

#[derive(Default)]
pub struct Incomplete<'a> {
    pub reason: Loose<Cow<'a, str>>,
}

/// A responses API `output` array, walked for a function call.
#[derive(Default)]
pub struct Output {
    pub function_call: bool,
}

#[derive(Default)]
struct OutputItem<'a> {
    kind: Loose<Cow<'a, str>>,
}

#[derive(Default)]
pub struct Delta<'a> {
    pub stop_reason: Loose<Cow<'a, str>>,
}

/// Token counts, in OpenAI chat (`prompt_`/`completion_tokens`) or
/// responses-API and Anthropic (`input_`/`output_tokens`) names.
#[derive(Default)]
pub struct Counts {
    prompt_tokens: Loose<u64>,
    completion_tokens: Loose<u64>,
    input_tokens: Loose<u64>,
    output_tokens: Loose<u64>,
    cache_read_input_tokens: Loose<u64>,
    cache_creation_input_tokens: Loose<u64>,
    /// OpenAI chat's `prompt_tokens_details` (`cached_tokens`).
    prompt_tokens_details: Loose<TokenDetails>,
    /// The responses API's `input_tokens_details` (`cached_tokens`).
    input_tokens_details: Loose<TokenDetails>,
}

/// The part of an answer's prompt read from the provider's prompt cache.
#[derive(Default)]
pub struct TokenDetails {
    cached_tokens: Loose<u64>,
}

impl Counts {
    /// The prompt's tokens read from the provider's prompt cache, billed
    /// at a lower price: OpenAI's `cached_tokens` (within its prompt
    /// count), Anthropic's `cache_read_input_tokens`.
    pub fn cache_read(&self) -> Option<u64> {
        plausible(self.cache_read_input_tokens.0)
            .or_else(|| plausible(self.prompt_tokens_details.0.as_ref()?.cached_tokens.0))
            .or_else(|| plausible(self.input_tokens_details.0.as_ref()?.cached_tokens.0))
    }

    /// The prompt's tokens written to the provider's prompt cache
    /// (Anthropic's `cache_creation_input_tokens`), billed higher.
    pub fn cache_write(&self) -> Option<u64> {
        plausible(self.cache_creation_input_tokens.0)
    }

    /// The prompt's tokens. OpenAI's counts include those read from its
    /// prompt cache; Anthropic's `input_tokens` leave out those read from
    /// or written to the cache, which it counts apart: added here, as
    /// OpenAI counts them (they are billed, if at other prices).
    pub fn input(&self) -> Option<u64> {
        plausible(self.prompt_tokens.0).or_else(|| {
            let cached = plausible(self.cache_read_input_tokens.0)
                .unwrap_or(0)
                .saturating_add(plausible(self.cache_creation_input_tokens.0).unwrap_or(0));
            match plausible(self.input_tokens.0) {
                Some(input) => Some(input.saturating_add(cached)),
                None => (cached > 0).then_some(cached),
            }
        })
    }
    pub fn output(&self) -> Option<u64> {
        plausible(self.completion_tokens.0).or(plausible(self.output_tokens.0))
    }
}

/// The most tokens one answer is taken to report in one count: past any
/// context window (10 million tokens) or embeddings batch (2,048 inputs
/// of 8,192), and far below where adding counts up would wrap a counter
/// (which Prometheus would read as a reset) or cost a fortune.
pub const MOST_TOKENS: u64 = 100_000_000;

/// A reported count, or none when it is past [`MOST_TOKENS`]: a broken
/// upstream's, read as absent as a count of the wrong type is.
fn plausible(count: Option<u64>) -> Option<u64> {
    count.filter(|&n| n <= MOST_TOKENS)
}

/// The most choices whose ends are read from one answer or event (the
/// most `n` OpenAI accepts): an upstream sending more cannot make
/// metering hold or count without bound.
pub const MAX_CHOICES: usize = 128;

/// Each choice's index and finish reason.
pub type Ends<'a> = smallvec::SmallVec<[(u64, Option<Cow<'a, str>>); 1]>;

/// A `choices` array, walked rather than collected.
#[derive(Default)]
pub struct Choices<'a> {
    /// How each choice that is an object ended: its `index` (else its
    /// place in the array) and its `finish_reason` when that is a string.
    /// An answer asked for with `n > 1` has one per choice.
    /// (Inline for one choice: no allocation for the usual answer.)
    pub ends: Ends<'a>,
    pub len: usize,
}

#[derive(Default)]
struct Choice<'a> {
    index: Loose<u64>,
    finish_reason: Loose<Cow<'a, str>>,
}

/// `Deserialize` for a struct of metering members, each read by its JSON
/// name; other members are skipped, a missing one stays default, and a
/// member written twice fails the object (as serde's derive would).
///
/// Names are compared as bytes (escapes resolved): serde's derive reads
/// every name as a `str`, checking it is UTF-8, at ~90 instructions a
/// name, for names that are mostly skipped (`id`, `object`, `created`…).
macro_rules! members {
    ([$($generics:tt)*] $ty:ty { $($bit:literal $name:literal => $field:ident),* $(,)? }) => {
        impl<$($generics)*> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_map(MembersVisitor::<Self>(PhantomData))
            }
        }
        impl<$($generics)*> Members<'de> for $ty {
            fn read<A: MapAccess<'de>>(
                &mut self,
                name: &[u8],
                seen: &mut u32,
                map: &mut A,
            ) -> Result<(), A::Error> {
                match name {
                    $($name => {
                        if *seen & (1 << $bit) != 0 {
                            return Err(de::Error::duplicate_field(stringify!($field)));
                        }
                        *seen |= 1 << $bit;
                        self.$field = map.next_value()?;
                    })*
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(())
            }
        }
    };
}

members!(['de: 'a, 'a] Facts<'a> {
    0 b"error" => error,
    1 b"type" => kind,
    2 b"message" => message,
    3 b"response" => response,
    4 b"model" => model,
    5 b"usage" => usage,
    6 b"choices" => choices,
    7 b"stop_reason" => stop_reason,
    8 b"delta" => delta,
});
members!(['de: 'a, 'a] Answer<'a> {
    0 b"model" => model,
    1 b"usage" => usage,
    2 b"choices" => choices,
    3 b"stop_reason" => stop_reason,
    4 b"status" => status,
    5 b"incomplete_details" => incomplete_details,
    6 b"output" => output,
    7 b"error" => error,
});
members!(['de: 'a, 'a] Incomplete<'a> { 0 b"reason" => reason });
members!(['de: 'a, 'a] OutputItem<'a> { 0 b"type" => kind });
members!(['de: 'a, 'a] Delta<'a> { 0 b"stop_reason" => stop_reason });
members!(['de: 'a, 'a] Choice<'a> {
    0 b"index" => index,
    1 b"finish_reason" => finish_reason,
});
members!(['de] Counts {
    0 b"prompt_tokens" => prompt_tokens,
    1 b"completion_tokens" => completion_tokens,
    2 b"input_tokens" => input_tokens,
    3 b"output_tokens" => output_tokens,
    4 b"cache_read_input_tokens" => cache_read_input_tokens,
    5 b"cache_creation_input_tokens" => cache_creation_input_tokens,
    6 b"prompt_tokens_details" => prompt_tokens_details,
    7 b"input_tokens_details" => input_tokens_details,
});
members!(['de] TokenDetails { 0 b"cached_tokens" => cached_tokens });

/// A struct read member by member ([`members!`]).
trait Members<'de>: Default {
    /// Reads the value of the member called `name` (or skips it).
    fn read<A: MapAccess<'de>>(
        &mut self,
        name: &[u8],
        seen: &mut u32,
        map: &mut A,
    ) -> Result<(), A::Error>;
}

struct MembersVisitor<T>(PhantomData<T>);

impl<'de, T: Members<'de>> Visitor<'de> for MembersVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let mut out = T::default();
        let mut seen = 0;
        while let Some(Name(name)) = map.next_key()? {
            out.read(&name, &mut seen, &mut map)?;
        }
        Ok(out)
    }
}

/// A member's name as bytes, escapes resolved: it is only compared with
/// the names [`members!`] knows.
struct Name<'de>(Cow<'de, [u8]>);

impl Name<'_> {
    /// What serde_json refuses in a name read as a `str` (and so in the
    /// objects serde's derive read): a raw control byte, or bytes that are
    /// not UTF-8 (a lone surrogate escape among them). Checked here so
    /// that such JSON still yields nothing.
    fn check<E: de::Error>(name: &[u8]) -> Result<(), E> {
        let plain = name.iter().all(|&b| (0x20..0x80).contains(&b));
        if plain || (!name.iter().any(|&b| b < 0x20) && std::str::from_utf8(name).is_ok()) {
            Ok(())
        } else {
            Err(E::custom("a member name that is not a JSON string"))
        }
    }
}

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(NameVisitor)
    }
}

struct NameVisitor;

impl<'de> Visitor<'de> for NameVisitor {
    type Value = Name<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member name")
    }
    fn visit_borrowed_bytes<E: de::Error>(self, name: &'de [u8]) -> Result<Self::Value, E> {
        Name::check(name)?;
        Ok(Name(Cow::Borrowed(name)))
    }
    fn visit_bytes<E: de::Error>(self, name: &[u8]) -> Result<Self::Value, E> {
        Name::check(name)?;
        Ok(Name(Cow::Owned(name.to_vec())))
    }
    fn visit_borrowed_str<E: de::Error>(self, name: &'de str) -> Result<Self::Value, E> {
        Ok(Name(Cow::Borrowed(name.as_bytes())))
    }
    fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
        Ok(Name(Cow::Owned(name.as_bytes().to_vec())))
    }
}

impl<'a> Facts<'a> {
    /// `None` when `json` is not one JSON object.
    pub fn parse(json: &'a [u8]) -> Option<Self> {
        parse(json)
    }

    /// The usage-only chunk an OpenAI stream ends with when
    /// `stream_options.include_usage` is set: `choices: []` and `usage`.
    pub fn is_usage_only(&self) -> bool {
        self.usage.0.is_some() && self.choices.0.as_ref().is_some_and(|c| c.len == 0)
    }
}

/// Whether `json` (one stream event) certainly holds nothing metering
/// would read beyond the model it already knows: no error, no usage or
/// stop reason other than `null`, no other model. Most chunks of a stream
/// are such (text deltas), and this byte scan costs a fraction of a
/// parse. It only ever answers false when in doubt; the event is then
/// parsed. Member names are matched with their quotes, so text inside a
/// string (where quotes are escaped) cannot match them.
pub fn holds_nothing_new(json: &[u8], known_model: Option<&str>) -> bool {
    static ERROR: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"error\""));
    static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
    // finish_reason, stop_reason.
    static REASON: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"reason\""));
    static MODEL: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"model\""));
    static ESCAPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\\u00"));
    let Some(model) = known_model.filter(|m| !m.bytes().any(|b| b == b'"' || b == b'\\')) else {
        return false;
    };
    let is_null = |value: &[u8]| value.starts_with(b"null");
    let is_model = |value: &[u8]| {
        value
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_prefix(model.as_bytes()))
            .is_some_and(|v| v.starts_with(b"\""))
    };
    // A name could be spelled with escaped letters (`"us\u0061ge"`),
    // which serde reads as the name: `\u0040`–`\u007f` sends the event
    // to the parser. Other escapes (quotes, non-ASCII text) do not.
    let escaped_letter = ESCAPE
        .find_iter(json)
        .any(|at| matches!(json.get(at + 4), Some(b'4'..=b'7')));
    !escaped_letter
        && ERROR.find(json).is_none()
        && every_value(json, &USAGE, is_null)
        && every_value(json, &REASON, is_null)
        && every_value(json, &MODEL, is_model)
}

/// Whether the value after each occurrence of `name` passes `test`; an
/// occurrence not followed by `:` and a value fails.
fn every_value(json: &[u8], name: &Finder<'_>, test: impl Fn(&[u8]) -> bool) -> bool {
    name.find_iter(json).all(|at| {
        let rest = json[at + name.needle().len()..].trim_ascii_start();
        rest.strip_prefix(b":")
            .is_some_and(|value| test(value.trim_ascii_start()))
    })
}

/// `json` read as `T`; `None` when it is not one JSON object.
pub fn parse<'a, T: Deserialize<'a>>(json: &'a [u8]) -> Option<T> {
    // A derived struct would also read an array, by position.
    if json.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// Whether a JSON object has a top-level `error` member that is not
/// null, read member by member whatever else it holds (members written
/// twice among them, which [`parse`]'s readers refuse).
pub fn names_an_error(json: &[u8]) -> bool {
    struct AnyError;
    impl<'de> Visitor<'de> for AnyError {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut found = false;
            while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                if name == "error" {
                    found |= map.next_value::<Option<IgnoredAny>>()?.is_some();
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    serde_json::Deserializer::from_slice(json)
        .deserialize_map(AnyError)
        .unwrap_or(false)
}

/// `n` as a count, when it is a whole number within `u64`.
pub fn whole(n: f64) -> Option<u64> {
    // 2^64 is the first float past u64::MAX; the cast is then exact.
    (n.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&n)).then_some(n as u64)
}

/// A member of the expected JSON type, or `None` for any other (null
/// included), which is skipped rather than an error.
#[derive(Default)]
pub struct Loose<T>(pub Option<T>);

/// How a [`Loose`] member is read from each JSON type it accepts; every
/// type not accepted is skipped.
pub trait LooseKind<'de>: Sized {
    fn from_str(_: Cow<'de, str>) -> Option<Self> {
        None
    }
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

impl<'de: 'a, 'a> LooseKind<'de> for Cow<'a, str> {
    fn from_str(s: Cow<'de, str>) -> Option<Self> {
        Some(s)
    }
}

impl LooseKind<'_> for u64 {
    fn from_u64(n: u64) -> Option<Self> {
        Some(n)
    }
}

/// Objects read as a struct; the struct's own members are `Loose`.
macro_rules! loose_object {
    ($($ty:ty),*) => {$(
        impl<'de: 'a, 'a> LooseKind<'de> for $ty {
            fn from_map<A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
                Self::deserialize(MapAccessDeserializer::new(map)).map(Some)
            }
        }
    )*};
}
loose_object!(
    Answer<'a>,
    Delta<'a>,
    Choice<'a>,
    Counts,
    TokenDetails,
    Incomplete<'a>,
    OutputItem<'a>
);

impl<'de> LooseKind<'de> for Output {
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        let mut output = Output::default();
        while let Some(item) = seq.next_element::<Loose<OutputItem<'de>>>()? {
            output.function_call |= item
                .0
                .is_some_and(|i| i.kind.0.as_deref() == Some("function_call"));
        }
        Ok(Some(output))
    }
}

impl<'de: 'a, 'a> LooseKind<'de> for Choices<'a> {
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        let mut choices = Choices::default();
        while let Some(choice) = seq.next_element::<Loose<Choice<'a>>>()? {
            if let Some(choice) = choice.0.filter(|_| choices.ends.len() < MAX_CHOICES) {
                let index = choice.index.0.unwrap_or(choices.len as u64);
                choices.ends.push((index, choice.finish_reason.0));
            }
            choices.len += 1;
        }
        Ok(Some(choices))
    }
}

impl<'de, T: LooseKind<'de>> Deserialize<'de> for Loose<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LooseVisitor(PhantomData)).map(Loose)
    }
}

struct LooseVisitor<T>(PhantomData<T>);

impl<'de, T: LooseKind<'de>> Visitor<'de> for LooseVisitor<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(T::from_str(Cow::Borrowed(s)))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(T::from_str(Cow::Owned(s.to_owned())))
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
        Ok(T::from_str(Cow::Owned(s)))
    }
    // serde_json hands numbers over as u64/i64/f64 unless its
    // `arbitrary_precision` feature is on, which would make every count
    // absent (the tests here would fail first).
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
        Ok(T::from_u64(n))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
        Ok(u64::try_from(n).ok().and_then(T::from_u64))
    }
    /// A whole number written as a float (`100.0`, `1e2`: Python code
    /// that computes a count sends one) counts as that number.
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Self::Value, E> {
        Ok(whole(n).and_then(T::from_u64))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::from_map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        T::from_seq(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_of_other_types_are_absent_not_errors() {
        let facts = Facts::parse(
            br#"{"model":7,"usage":{"prompt_tokens":1.5,"completion_tokens":-2,"input_tokens":4.0,"output_tokens":"5"},
                "choices":[3,{"finish_reason":1},{"finish_reason":"stop","extra":[{}]}],"stop_reason":{},"delta":[],
                "message":"text","error":null}"#,
        )
        .unwrap();
        assert!(facts.model.0.is_none());
        let usage = facts.usage.0.unwrap();
        assert_eq!((usage.input(), usage.output()), (Some(4), None));
        let choices = facts.choices.0.unwrap();
        // The number is no choice at all; the others are read by place.
        let ends: Vec<_> = choices
            .ends
            .iter()
            .map(|(i, r)| (*i, r.as_deref()))
            .collect();
        assert_eq!((ends, choices.len), (vec![(1, None), (2, Some("stop"))], 3));
        assert!(facts.stop_reason.0.is_none() && facts.delta.0.is_none());
        assert!(facts.message.0.is_none() && facts.error.is_none());
    }

    /// Each API says how much of its prompt came from its cache in its
    /// own words.
    #[test]
    fn cached_prompt_tokens_in_each_apis_words() {
        let read = |json: &[u8]| {
            let usage = Facts::parse(json).and_then(|f| f.usage.0).unwrap();
            (usage.cache_read(), usage.cache_write())
        };
        assert_eq!(
            read(br#"{"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":6}}}"#),
            (Some(6), None)
        );
        assert_eq!(
            read(br#"{"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":4}}}"#),
            (Some(4), None)
        );
        assert_eq!(
            read(br#"{"usage":{"input_tokens":1,"cache_read_input_tokens":7,"cache_creation_input_tokens":2}}"#),
            (Some(7), Some(2))
        );
        assert_eq!(
            read(br#"{"usage":{"prompt_tokens":9,"prompt_tokens_details":null}}"#),
            (None, None)
        );
    }

    #[test]
    fn names_are_read_with_escapes_resolved_and_only_once() {
        let facts = Facts::parse(
            br#"{"id":"x","us\u0061ge":{"prompt_tokens":3,"output_tokens":4},"\u006dodel":"m","choices":[{"finish_reason":"stop"}]}"#,
        )
        .unwrap();
        let usage = facts.usage.0.unwrap();
        assert_eq!((usage.input(), usage.output()), (Some(3), Some(4)));
        assert_eq!(facts.model.0.as_deref(), Some("m"));
        assert_eq!(facts.choices.0.unwrap().ends[0].1.as_deref(), Some("stop"));
        // A member written twice fails the object, at any depth; other
        // names may repeat.
        for twice in [
            r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":1,"prompt_tokens":2}}"#,
            r#"{"model":"a","mod\u0065l":"b"}"#,
        ] {
            assert!(Facts::parse(twice.as_bytes()).is_none(), "{twice}");
        }
        assert!(Facts::parse(br#"{"id":1,"id":2,"model":"m"}"#).is_some());
        // Names serde_json refuses as strings fail the object, as before.
        for bad in [
            &b"{\"a\nb\":0,\"model\":\"m\"}"[..],
            b"{\"a\xffb\":0,\"model\":\"m\"}",
            br#"{"\ud800":0,"model":"m"}"#,
        ] {
            assert!(
                Facts::parse(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(Facts::parse("{\"é\\u00e9\":0,\"model\":\"m\"}".as_bytes()).is_some());
        // Names that only start like ours are others.
        let facts = Facts::parse(br#"{"models":"x","usage_":{"prompt_tokens":1}}"#).unwrap();
        assert!(facts.model.0.is_none() && facts.usage.0.is_none());
    }

    #[test]
    fn strings_are_borrowed_unless_escaped() {
        let facts = Facts::parse(br#"{"model":"gpt-4o","type":"a\"b"}"#).unwrap();
        assert!(matches!(facts.model.0, Some(Cow::Borrowed("gpt-4o"))));
        assert!(matches!(facts.kind.0.as_deref(), Some("a\"b")));
    }

    #[test]
    fn usage_only_chunk() {
        let only = Facts::parse(br#"{"choices":[],"usage":{"prompt_tokens":1}}"#).unwrap();
        assert!(only.is_usage_only());
        for other in [
            r#"{"choices":[{"delta":{}}],"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":[],"usage":null}"#,
            r#"{"usage":{"prompt_tokens":1}}"#,
        ] {
            assert!(
                !Facts::parse(other.as_bytes()).unwrap().is_usage_only(),
                "{other}"
            );
        }
        assert!(Facts::parse(b"[DONE]").is_none());
        assert!(Facts::parse(b"[1]").is_none());
    }
}
