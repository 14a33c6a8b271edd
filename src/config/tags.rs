//! YAML tags the file writes: refused, since sluice reads every value as
//! written and the YAML reader would otherwise drop a tag it does not
//! know without a word (`key: !ENV TEAM_KEY` would make the literal text
//! `TEAM_KEY` an API key).

use serde_saphyr::granit_parser::{Event, Parser, Tag};

/// A tag and where its node starts (1-based line and column).
pub struct Tagged {
    pub line: u64,
    pub col: u64,
    pub message: String,
}

const YAML_NAMESPACE: &str = "tag:yaml.org,2002:";

/// The tagged nodes of `text` that change what a value means: all but
/// `!!str`, `!!map`, `!!seq`, `!!merge` and `!`, which say what the
/// node is anyway; and, when there are any, `text` with those tags
/// blanked, so that the rest of the file is read past them. A file that
/// does not parse yields what came before the fault (the config's own
/// reading reports it).
pub fn refused(text: &str) -> (Vec<Tagged>, Option<String>) {
    let mut out = Vec::new();
    let mut blanked: Option<String> = None;
    for event in Parser::new_from_str(text) {
        let Ok((event, span)) = event else {
            break;
        };
        let tag = match &event {
            Event::Scalar(_, _, _, tag)
            | Event::SequenceStart(_, _, tag)
            | Event::MappingStart(_, _, tag) => tag.as_deref(),
            _ => None,
        };
        let Some(tag) = tag else {
            continue;
        };
        if is_harmless(tag) {
            continue;
        }
        let written = format!("{}{}", tag.original_handle(), tag.suffix());
        // The node's span starts at its value; the tag is written before.
        if let Some(at) = span
            .start
            .byte_offset()
            .and_then(|end| text.get(..end))
            .and_then(|head| head.rfind(&written))
        {
            // A verbatim tag (`!<!ENV>`) goes with its brackets.
            let (at, end) = match (
                text[..at].strip_suffix("!<"),
                text[at + written.len()..].strip_prefix('>'),
            ) {
                (Some(before), Some(_)) => (before.len(), at + written.len() + 1),
                _ => (at, at + written.len()),
            };
            let copy = blanked.get_or_insert_with(|| text.to_owned());
            copy.replace_range(at..end, &" ".repeat(end - at));
        }
        let message = if tag.is_yaml_core_schema() {
            format!(
                "the `{written}` tag is not read: sluice takes each value as written, so leave the tag out"
            )
        } else if is_well_known(tag) {
            format!(
                "the `{written}` tag is not supported: sluice takes each value as written (for an environment variable, write \"${{NAME}}\")"
            )
        } else {
            // Most likely a value that begins with `!` (a generated
            // password): not repeated, since it could be a secret.
            "a value that starts with `!` is read as a YAML tag, which sluice does not support (the text is not repeated here: it could be a secret); if the `!` is part of the value, quote it (\"!...\"); for an environment variable, write \"${NAME}\"".to_owned()
        };
        out.push(Tagged {
            line: u64::try_from(span.start.line()).unwrap_or(u64::MAX),
            col: u64::try_from(span.start.col() + 1).unwrap_or(u64::MAX),
            message,
        });
    }
    (out, blanked)
}

/// Tags other YAML tools read (Home Assistant, CloudFormation, GitLab,
/// Ansible…), safe to quote back: they name a feature, not a value.
const WELL_KNOWN: [&str; 14] = [
    "env",
    "env_var",
    "vault",
    "secret",
    "include",
    "ref",
    "sub",
    "getatt",
    "reference",
    "file",
    "import",
    "join",
    "base64",
    "unsafe",
];

fn is_well_known(tag: &Tag) -> bool {
    tag.original_handle() == "!"
        && WELL_KNOWN
            .iter()
            .any(|name| tag.suffix().eq_ignore_ascii_case(name))
}

fn is_harmless(tag: &Tag) -> bool {
    // The non-specific `!`: a plain string.
    if tag.original_handle().is_empty() && tag.suffix() == "!" {
        return true;
    }
    tag.suffix_in_namespace(YAML_NAMESPACE)
        .is_some_and(|name| matches!(&*name, "str" | "map" | "seq" | "merge"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Vec<(u64, u64, String)> {
        refused(text)
            .0
            .into_iter()
            .map(|t| (t.line, t.col, t.message))
            .collect()
    }

    #[test]
    fn tags_that_change_a_value_are_refused_where_written() {
        let tags =
            found("a: !ENV TEAM_KEY\nb: !!int 5\nc: !!str 1.10\nd: ! x\ne: !vault \"s/k\"\n");
        assert_eq!(tags.len(), 3, "{tags:?}");
        // At the value the tag is on.
        assert_eq!((tags[0].0, tags[0].1), (1, 9));
        assert!(tags[0].2.contains("`!ENV`"), "{}", tags[0].2);
        assert!(tags[0].2.contains("${NAME}"), "{}", tags[0].2);
        assert_eq!((tags[1].0, tags[1].1), (2, 10));
        assert!(tags[1].2.contains("`!!int`"), "{}", tags[1].2);
        assert_eq!(tags[2].0, 5);
    }

    #[test]
    fn a_value_that_starts_with_a_bang_is_not_repeated() {
        for text in [
            "key: !Zq9bang-1401abcdef\n",
            "key: !!Zq9dbl-1411abcdef\n",
            "key: !<Zq9verbatim-1407abc>\n",
        ] {
            let tags = found(text);
            assert_eq!(tags.len(), 1, "{text}: {tags:?}");
            assert!(!tags[0].2.contains("Zq9"), "{}", tags[0].2);
            assert!(tags[0].2.contains("quote it"), "{}", tags[0].2);
        }
    }

    #[test]
    fn the_file_is_read_on_without_the_tags() {
        let (_, blanked) = refused("a: !ENV X\nb: !!int 5\nc: !!str 1.10\n");
        assert_eq!(
            blanked.as_deref(),
            Some("a:      X\nb:       5\nc: !!str 1.10\n")
        );
        assert!(refused("a: 1\n").1.is_none());
        let (tags, blanked) = refused("a: !<!ENV> X\n");
        assert_eq!(tags.len(), 1);
        assert_eq!(blanked.as_deref(), Some("a:         X\n"));
    }

    #[test]
    fn merges_and_plain_files_have_none() {
        assert!(found("d: &d { x: 1 }\ne:\n  <<: *d\n  y: [1, 2]\n").is_empty());
        assert!(found("a: !!map { b: !!seq [c] }\n").is_empty());
        assert!(found("a: [unclosed\n").is_empty());
    }
}
