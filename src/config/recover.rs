//! Reading past an unknown key, so that `check` can print every error of a
//! file. serde stops at the first key it does not know; blanking that key
//! (and the block under it) and parsing again finds the next one. Blanked
//! lines stay as empty lines, so every later position is still exact.

/// `text` with the key at `line`:`col` (1-based) and its value blanked,
/// or `None` when the key is not one this can remove safely: the first key
/// of a sequence item (`- typo: 1`), or a flow entry that goes on past its
/// line, where blanking would change the shape of what remains and report
/// errors the user did not make.
pub fn without_key(text: &str, line: u64, col: u64) -> Option<String> {
    let line = usize::try_from(line.checked_sub(1)?).ok()?;
    let col = usize::try_from(col.checked_sub(1)?).ok()?;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let key_line = lines.get(line)?;
    // Columns count characters; the text is cut at bytes.
    let col = key_line.char_indices().nth(col)?.0;
    let (indent, rest) = key_line.split_at(col);
    if indent.trim_end().ends_with(['{', ',']) {
        return without_flow_entry(&lines, line, col);
    }
    if !indent.bytes().all(|b| b == b' ') || !is_block_key(rest) {
        return None;
    }
    let mut next = line + 1;
    // The value: every following line indented deeper than the key, blank
    // lines and comments among them, and a sequence or the closer of a
    // flow collection written at the key's own indentation.
    while let Some(l) = lines.get(next) {
        let body = l.trim_end_matches(['\n', '\r']);
        let depth = body.len() - body.trim_start_matches(' ').len();
        let blank = body.trim().is_empty() || body.trim_start().starts_with('#');
        let deeper = depth > col;
        let own_level = depth == col && body[depth..].starts_with(['-', ']', '}']);
        if !(blank || deeper || own_level) {
            break;
        }
        next += 1;
    }
    // The only key of its mapping leaves an empty mapping, not a null
    // that would read as an error the user did not make.
    let only_key = content_column(lines[..line].iter().rev()).is_none_or(|c| c < col)
        && content_column(lines[next..].iter()).is_none_or(|c| c < col);
    let mut out = String::with_capacity(text.len());
    for l in &lines[..line] {
        out.push_str(l);
    }
    if only_key {
        out.push_str(indent);
        out.push_str("{}");
    }
    out.push_str(line_end(key_line));
    for l in &lines[line + 1..next] {
        out.push_str(line_end(l));
    }
    for l in &lines[next..] {
        out.push_str(l);
    }
    Some(out)
}

/// What the parser wanted where a value of the wrong shape stood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    List,
    Mapping,
    /// A scalar, or a shape the message does not say.
    Other,
}

impl Wanted {
    /// Read from the parser's message.
    pub fn of(message: &str) -> Wanted {
        if message.starts_with("expected sequence start")
            || message.starts_with("expected a list here")
        {
            Wanted::List
        } else if message.starts_with("expected mapping start")
            || message.starts_with("expected a mapping here")
        {
            Wanted::Mapping
        } else {
            Wanted::Other
        }
    }
}

/// `text` with the value at `line`:`col` (1-based) taken out, every
/// column kept where it was, so that past a value of the wrong type the
/// rest of the file can still be read: a scalar where a list or mapping
/// is `wanted` (`methods: GET`) becomes an empty one (`[]`, padded), any
/// other scalar spaces, so that its key reads as null, and a one-line
/// flow collection where a scalar is wanted (`listen: [::]:8080`
/// unquoted) an empty string. Errors that the stand-in then gets, at
/// the same place, are the user's one error. `None` when nothing of
/// these starts there (a block collection, an anchor, a block scalar, a
/// collection that goes on past its line).
pub fn without_value(text: &str, line: u64, col: u64, wanted: Wanted) -> Option<String> {
    let line = usize::try_from(line.checked_sub(1)?).ok()?;
    let col = usize::try_from(col.checked_sub(1)?).ok()?;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let value_line = lines.get(line)?;
    let col = value_line.char_indices().nth(col)?.0;
    let (mut before, mut rest) = value_line.split_at(col);
    // A missing value is reported at its key's `:`.
    if rest.starts_with(':') && !before.trim_end().ends_with(':') {
        (before, rest) = value_line.split_at(col + 1);
    }
    let col = before.len();
    // A value comes after `key:` (block or flow); anything else (a list
    // item, a key) is not blanked.
    if !before.trim_end().ends_with(':') {
        return None;
    }
    let rest = rest.trim_end_matches(['\n', '\r']);
    // Inside a flow collection (opened on this line or an earlier one)
    // the value ends at `,`, `}` or `]`; in block style it runs to the
    // end of the line, commas included (`methods: GET,POST`).
    let in_flow = lines[..line]
        .iter()
        .copied()
        .chain([before])
        .fold(Flow::default(), Flow::read)
        .depth
        > 0;
    // Nothing where a list or mapping belongs (`nullup:` with nothing
    // under it): an empty one, at the end of the line, moves no column.
    let bare = rest.trim();
    if bare.is_empty() || bare.starts_with('#') {
        let empty = match wanted {
            Wanted::List => "[]",
            Wanted::Mapping => "{}",
            Wanted::Other => return None,
        };
        let space = if before.ends_with(' ') { "" } else { " " };
        let new_line = format!("{before}{space}{empty}{}", &value_line[col..]);
        return Some(with_line(&lines, line, &new_line));
    }
    let len = match rest.as_bytes().first()? {
        q @ (b'"' | b'\'') => {
            let mut i = 1;
            let bytes = rest.as_bytes();
            loop {
                match bytes.get(i)? {
                    b'\\' if *q == b'"' => i += 2,
                    // `''` is a quote inside a single-quoted scalar.
                    b'\'' if *q == b'\'' && bytes.get(i + 1) == Some(&b'\'') => i += 2,
                    b if b == q => break i + 1,
                    _ => i += 1,
                }
            }
        }
        // What follows the collection up to the value's end (`:8080` of
        // `[::]:8080`) goes with it.
        b'{' | b'[' if wanted == Wanted::Other => {
            let closed = one_line_collection(rest)?;
            closed + plain_len(&rest[closed..], in_flow)
        }
        b'{' | b'[' | b'-' | b'|' | b'>' | b'&' | b'*' | b'!' | b'#' | b',' | b'}' | b']' => {
            return None;
        }
        _ => plain_len(rest, in_flow),
    };
    let mut out = String::with_capacity(value_line.len() + 2);
    out.push_str(before);
    let width = rest[..len].chars().count();
    // A one-letter value (`members: a`) takes a space after it too, or
    // the end of its line, so that no later column moves.
    let after = &value_line[col + len..];
    let spaces = after.len() - after.trim_start_matches(' ').len();
    // What follows on the line is nothing, or a comment, whose column
    // no error can name.
    let only_comment = after.trim_start().starts_with('#');
    let room = if after.trim().is_empty() || only_comment {
        usize::MAX
    } else {
        width + spaces
    };
    let null = matches!(&rest[..len], "~" | "null" | "Null" | "NULL");
    let empty = match wanted {
        Wanted::List if room >= 2 => "[]",
        Wanted::Mapping if room >= 2 => "{}",
        // A collection where a scalar was wanted: an empty string, which
        // any text setting reads (a null would leave a required one
        // missing, an error the user did not make). So for a null where
        // text was wanted: blank, it would be null again.
        Wanted::Other if rest.starts_with(['[', '{']) || (null && room >= 2) => "\"\"",
        // One letter of stand-in text where `~` has no room for two.
        Wanted::Other if null => "_",
        _ => "",
    };
    out.push_str(empty);
    out.extend(std::iter::repeat_n(' ', width.saturating_sub(empty.len())));
    let taken = empty.len().saturating_sub(width).min(spaces);
    let after = &after[taken..];
    // A comment must stay apart from what comes before it.
    if only_comment && after.starts_with('#') {
        out.push(' ');
    }
    out.push_str(after);
    Some(with_line(&lines, line, &out))
}

/// `lines` joined, line `at` replaced by `new` (which keeps its end).
fn with_line(lines: &[&str], at: usize, new: &str) -> String {
    let mut out = String::with_capacity(lines.iter().map(|l| l.len()).sum::<usize>() + 2);
    for (i, l) in lines.iter().enumerate() {
        out.push_str(if i == at { new } else { l });
    }
    out
}

/// The length in bytes of the plain scalar `rest` starts with: in a flow
/// collection it ends at `,`, `}` or `]`; in block style it runs to the
/// end of the line, commas included (`methods: GET,POST`); a comment
/// ends it either way.
fn plain_len(rest: &str, in_flow: bool) -> usize {
    let end = rest
        .char_indices()
        .find(|&(i, c)| {
            (in_flow && matches!(c, ',' | '}' | ']')) || (c == '#' && rest[..i].ends_with(' '))
        })
        .map_or(rest.len(), |(i, _)| i);
    rest[..end].trim_end().len()
}

/// The length in bytes of the flow collection `rest` starts with, when
/// it closes on this line.
fn one_line_collection(rest: &str) -> Option<usize> {
    let mut end = None;
    Flow::default().scan(rest, |flow, met| match met {
        Met::Close {
            past,
            unopened: false,
        } if flow.depth == 0 => {
            end = Some(past);
            false
        }
        Met::Close {
            unopened: false, ..
        } => true,
        // A comment: the collection goes on past this line.
        Met::Close { .. } | Met::Comment => false,
    });
    end
}

/// The key whose value starts at `line`:`col` (1-based), and where the
/// key is: a value blanked by [`without_value`] leaves its key without
/// one, which a key the schema requires then reports as missing.
pub fn key_of_value(text: &str, line: u64, col: u64) -> Option<Blanked> {
    let index = usize::try_from(line.checked_sub(1)?).ok()?;
    let chars = usize::try_from(col.checked_sub(1)?).ok()?;
    let value_line = text.split_inclusive('\n').nth(index)?;
    let mut at = value_line.char_indices().nth(chars)?.0;
    // A missing value is reported at its key's `:`.
    if value_line[at..].starts_with(':') && !value_line[..at].trim_end().ends_with(':') {
        at += 1;
    }
    let before = value_line[..at].trim_end().strip_suffix(':')?.trim_end();
    let start = before.rfind([' ', '{', ',', '\t']).map_or(0, |i| i + 1);
    let name = before[start..].trim_matches(['"', '\'']);
    if name.is_empty() || name.starts_with('-') {
        return None;
    }
    Some(Blanked {
        name: name.to_owned(),
        line,
        col: u64::try_from(before[..start].chars().count() + 1).ok()?,
    })
}

/// A key that was blanked (an unknown one, or one whose value was), and
/// where it was.
#[derive(Clone)]
pub struct Blanked {
    pub name: String,
    pub line: u64,
    pub col: u64,
}

/// How deep in flow collections (`{…}`, `[…]`) the text read so far
/// ends, quotes and comments skipped.
#[derive(Default, Clone, Copy)]
struct Flow {
    depth: usize,
    /// Inside a quoted scalar, by its quote; `"` ones may span lines.
    quote: Option<char>,
}

/// What [`Flow::scan`] meets outside quoted scalars.
enum Met {
    /// A closing bracket; `past` is the byte index after it, `unopened`
    /// whether no collection was open.
    Close { past: usize, unopened: bool },
    /// A comment, which runs to the end of its line.
    Comment,
}

impl Flow {
    /// The state after `text` (whole lines, or the start of one).
    fn read(mut self, text: &str) -> Flow {
        self.scan(text, |_, _| true);
        self
    }

    /// Reads `text` from this state, telling `meet` of each closing
    /// bracket and comment outside quoted scalars; `meet` returning false
    /// stops the read there.
    fn scan(&mut self, text: &str, mut meet: impl FnMut(&Flow, Met) -> bool) {
        let mut chars = text.char_indices().peekable();
        let mut prev = ' ';
        // The last character of the line so far that is not blank: a
        // quote opens a quoted scalar only where a value starts, not
        // inside a plain one (`x-title: Bob's bot`).
        let mut last_sig: Option<char> = None;
        while let Some((i, c)) = chars.next() {
            match self.quote {
                Some('"') if c == '\\' => {
                    chars.next();
                }
                Some('\'') if c == '\'' && chars.peek().is_some_and(|&(_, n)| n == '\'') => {
                    chars.next();
                }
                Some(q) if c == q => self.quote = None,
                Some(_) => {}
                None => match c {
                    '"' | '\'' if opens_scalar(last_sig) => self.quote = Some(c),
                    '{' | '[' => self.depth += 1,
                    '}' | ']' => {
                        let unopened = self.depth == 0;
                        self.depth = self.depth.saturating_sub(1);
                        let past = i + c.len_utf8();
                        if !meet(self, Met::Close { past, unopened }) {
                            return;
                        }
                    }
                    '#' if prev.is_whitespace() => {
                        if !meet(self, Met::Comment) {
                            return;
                        }
                        for (_, c) in chars.by_ref() {
                            if c == '\n' {
                                break;
                            }
                        }
                        (prev, last_sig) = ('\n', None);
                        continue;
                    }
                    _ => {}
                },
            }
            prev = c;
            if c == '\n' {
                last_sig = None;
            } else if !c.is_whitespace() {
                last_sig = Some(c);
            }
        }
    }
}

/// Whether a quote after `last` (the line's last character that is not
/// blank, `None` at its start) opens a quoted scalar.
fn opens_scalar(last: Option<char>) -> bool {
    last.is_none_or(|c| matches!(c, ':' | ',' | '[' | '{' | '-' | '?'))
}

/// Whether a required key reported missing, in the mapping the parser
/// places at `line`:`col` (one of its keys), is likely one a blanked
/// unknown key of that mapping misspelt (`upstrem` for `upstream`): then
/// the user made one error, already reported.
pub fn misspelt(missing: &str, line: u64, col: u64, blanked: &[Blanked]) -> bool {
    // A block mapping's keys line up in one column; a flow mapping's share
    // its line. (A sibling mapping in that column may pass for the same.)
    let same_mapping = |b: &Blanked| b.col == col || b.line == line;
    blanked
        .iter()
        .any(|b| same_mapping(b) && is_near_miss(&b.name, missing))
}

/// Whether `word` is close enough to `name` to be a misspelling of it.
pub fn is_near_miss(word: &str, name: &str) -> bool {
    let near = match name.chars().count() {
        0..=4 => 1,
        5..=10 => 2,
        n => n / 5,
    };
    edit_distance(word, name) <= near
}

/// Levenshtein distance of two short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The column where the first line of `lines` with content starts its
/// key: past the indentation and any `- ` of sequence items.
fn content_column<'a>(mut lines: impl Iterator<Item = &'a &'a str>) -> Option<usize> {
    let line = lines.find(|l| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#')
    })?;
    let mut col = 0;
    let mut rest = *line;
    loop {
        let trimmed = rest.trim_start_matches(' ');
        col += rest.len() - trimmed.len();
        match trimmed.strip_prefix("- ") {
            Some(after) => {
                col += 2;
                rest = after;
            }
            None => return Some(col),
        }
    }
}

/// `lines` with the flow mapping entry at `line`:`col` (`typo: 2` in
/// `{ a: 1, typo: 2, b: 3 }`) and its comma turned into spaces, so that
/// every column stays where it was. `None` when the entry does not end on
/// its line.
fn without_flow_entry(lines: &[&str], line: usize, col: usize) -> Option<String> {
    let key_line = lines[line];
    let bytes = key_line.as_bytes();
    let mut depth = 0usize;
    let mut quote: Option<u8> = None;
    let mut end = None;
    let mut i = col;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(b'"') if b == b'\\' => i += 1,
            Some(_) => {}
            None => match b {
                b'"' | b'\'' => quote = Some(b),
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth == 0 => {
                    end = Some(i);
                    break;
                }
                b'}' | b']' => depth -= 1,
                b',' if depth == 0 => {
                    end = Some(i + 1);
                    break;
                }
                b'#' if i > col && bytes[i - 1] == b' ' => return None,
                _ => {}
            },
        }
        i += 1;
    }
    let end = end?;
    let mut out = String::new();
    for l in &lines[..line] {
        out.push_str(l);
    }
    out.push_str(&key_line[..col]);
    out.extend(key_line[col..end].chars().map(|_| ' '));
    out.push_str(&key_line[end..]);
    for l in &lines[line + 1..] {
        out.push_str(l);
    }
    Some(out)
}

/// Whether `rest` starts with a plain key followed by `:`, outside any
/// flow collection.
fn is_block_key(rest: &str) -> bool {
    let Some(colon) = rest.find(':') else {
        return false;
    };
    let key = &rest[..colon];
    // `set-headers:` is a key (a kebab-case typo of `set_headers`); a
    // sequence item's dash never starts one at the key's column.
    !key.is_empty() && !key.starts_with('-') && !key.contains(['{', '}', '[', ']', ',', '#', ' '])
}

/// The line ending of `l`, which a blanked line keeps.
fn line_end(l: &str) -> &'static str {
    if l.ends_with("\r\n") {
        "\r\n"
    } else if l.ends_with('\n') {
        "\n"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blanks_a_scalar_value_keeping_columns() {
        let text =
            "routes:\n  - match: { path_prefix: /, methods: GET }\n    auth: \"maybe\" # c\n";
        let out = without_value(text, 2, 39, Wanted::Other).unwrap();
        assert_eq!(
            out,
            "routes:\n  - match: { path_prefix: /, methods:     }\n    auth: \"maybe\" # c\n"
        );
        let out = without_value(text, 3, 11, Wanted::Other).unwrap();
        assert_eq!(
            out,
            "routes:\n  - match: { path_prefix: /, methods: GET }\n    auth:         # c\n"
        );
        // A flow mapping opened on an earlier line: cut at its end.
        assert_eq!(
            without_value("m: { a: 1, # {\n  b: GET }\n", 2, 6, Wanted::Other).unwrap(),
            "m: { a: 1, # {\n  b:     }\n"
        );
        // In block style a value runs to the end of its line, commas too.
        assert_eq!(
            without_value("x: '[' # [\nm: GET,POST # c\n", 2, 4, Wanted::Other).unwrap(),
            "x: '[' # [\nm:          # c\n"
        );
        // `''` inside single quotes.
        assert_eq!(
            without_value("a: 'it''s'\nb: 1\n", 1, 4, Wanted::Other).unwrap(),
            "a:        \nb: 1\n"
        );
        // Not after a key, or a collection where a collection was
        // wanted: left alone.
        assert!(without_value(text, 2, 5, Wanted::Other).is_none());
        assert!(without_value("a: [1, 2]\n", 1, 4, Wanted::Mapping).is_none());
        assert!(without_value("a: {b: 1}\n", 1, 4, Wanted::List).is_none());
        // A one-line collection where a scalar was wanted: see the table
        // below; one that goes on past its line is left alone.
        assert!(without_value("a: [1, # c\n  2]\n", 1, 4, Wanted::Other).is_none());
        // A scalar where a list or a mapping was wanted: an empty one.
        assert_eq!(
            without_value("m: { methods: GET }\n", 1, 15, Wanted::List).unwrap(),
            "m: { methods: []  }\n"
        );
        // A word where a mapping or list was wanted: an empty one, with
        // a space after it or the line's end to give a short word room;
        // nothing at all, the same at the line's end.
        for (text, line, col, wanted, out) in [
            (
                "listen: [::]:8080 # c\nb: 1\n",
                1,
                9,
                Wanted::Other,
                "listen: \"\"        # c\nb: 1\n",
            ),
            (
                "h: { k: [a, \"]\"] }\n",
                1,
                4,
                Wanted::Other,
                "h: \"\"             \n",
            ),
            ("p: x1\n", 1, 4, Wanted::Mapping, "p: {}\n"),
            ("p: x\n", 1, 4, Wanted::Mapping, "p: {}\n"),
            (
                "p: { a: x, b: 1 }\n",
                1,
                9,
                Wanted::Mapping,
                "p: { a:  , b: 1 }\n",
            ),
            (
                "p: { members: a }\n",
                1,
                15,
                Wanted::List,
                "p: { members: []}\n",
            ),
            (
                "p:\n  members: a\n",
                2,
                12,
                Wanted::List,
                "p:\n  members: []\n",
            ),
            (
                "p: { members: a}\n",
                1,
                15,
                Wanted::List,
                "p: { members:  }\n",
            ),
            (
                "u:\n  a:\n  b: {}\n",
                2,
                5,
                Wanted::Mapping,
                "u:\n  a: {}\n  b: {}\n",
            ),
            ("u:\n  a: # c\n", 2, 4, Wanted::List, "u:\n  a: [] # c\n"),
            // A comment after a short word keeps a space before it.
            ("p: x # c\n", 1, 4, Wanted::Mapping, "p: {} # c\n"),
            ("m: a # c\n", 1, 4, Wanted::List, "m: [] # c\n"),
            // An apostrophe inside a plain scalar opens no quote.
            (
                "h: { t: Bob's bot }\nm: { p: /, methods: GET }\n",
                2,
                21,
                Wanted::List,
                "h: { t: Bob's bot }\nm: { p: /, methods: []  }\n",
            ),
        ] {
            assert_eq!(
                without_value(text, line, col, wanted).as_deref(),
                Some(out),
                "{text:?}"
            );
        }
    }

    #[test]
    fn misspellings_of_a_blanked_key() {
        let at = |name: &str, line, col| Blanked {
            name: name.to_owned(),
            line,
            col,
        };
        let blanked = [at("upstrem", 6, 5), at("tir", 9, 7)];
        // A block mapping with keys in column 5, placed before or after
        // the typo.
        assert!(misspelt("upstream", 4, 5, &blanked));
        assert!(misspelt("upstream", 7, 5, &blanked));
        assert!(!misspelt("output", 4, 5, &blanked));
        // Another mapping's typo is not this one's.
        assert!(!misspelt("upstream", 4, 7, &blanked));
        // Short names must be nearly equal: `tir` is no misspelt `id`.
        assert!(!misspelt("id", 8, 7, &blanked));
        assert!(misspelt("tier", 8, 7, &blanked));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn blanks_the_key_and_its_block_keeping_lines() {
        let text = "limits:\n  request_timout: 30s\n  bogus:\n    a: 1\n\n    b: [1,\n      2]\n  max_request_body: 1mb\nroutes: []\n";
        let out = without_key(text, 3, 3).unwrap();
        assert_eq!(
            out,
            "limits:\n  request_timout: 30s\n\n\n\n\n\n  max_request_body: 1mb\nroutes: []\n"
        );
        assert_eq!(out.lines().count(), text.lines().count());
        let out = without_key(text, 2, 3).unwrap();
        assert!(out.starts_with("limits:\n\n  bogus:\n"), "{out}");
    }

    #[test]
    fn the_only_key_of_a_mapping_leaves_it_empty() {
        let text = "upstreams:\n  m:\n    mock:\n      latncy: 5ms\nroutes: []\n";
        assert_eq!(
            without_key(text, 4, 7).unwrap(),
            "upstreams:\n  m:\n    mock:\n      {}\nroutes: []\n"
        );
        // In a sequence item, a sibling after `- ` is a sibling.
        let text = "routes:\n  - name: r\n    typo: 1\n";
        assert_eq!(without_key(text, 3, 5).unwrap(), "routes:\n  - name: r\n\n");
        // A flow value closed at the key's own indentation goes with it.
        let text = "limits:\n  typo: [\n    1\n  ]\n  max_connections: 5\n";
        assert_eq!(
            without_key(text, 2, 3).unwrap(),
            "limits:\n\n\n\n  max_connections: 5\n"
        );
    }

    #[test]
    fn a_sequence_at_the_keys_indentation_is_its_value() {
        let text = "typo:\n- a\n- b\nroutes: []\n";
        assert_eq!(without_key(text, 1, 1).unwrap(), "\n\n\nroutes: []\n");
    }

    #[test]
    fn flow_entries_are_blanked_in_place() {
        assert_eq!(
            without_key("limits: { typo: 1 }\n", 1, 11).unwrap(),
            "limits: {         }\n"
        );
        assert_eq!(
            without_key("m: { a: 1, typo: { b: [1, \"}\"] }, c: 2 }\nx: 1\n", 1, 12).unwrap(),
            "m: { a: 1,                        c: 2 }\nx: 1\n"
        );
        assert_eq!(
            without_key("m: { a: 1, typo: 'x' }\n", 1, 12).unwrap(),
            "m: { a: 1,           }\n"
        );
        // An entry that goes on to the next line is left alone.
        assert_eq!(without_key("m: { typo: [1,\n 2] }\n", 1, 6), None);
    }

    #[test]
    fn sequence_item_keys_are_left_alone() {
        assert_eq!(without_key("routes:\n  - typo: 1\n", 2, 5), None);
        assert_eq!(without_key("a: 1\n", 9, 1), None);
        assert_eq!(without_key("a: 1\n", 0, 0), None);
        assert_eq!(without_key("é: 1\n", 1, 2), None);
        assert_eq!(
            without_key("é: { typo: 1 }\n", 1, 6).unwrap(),
            "é: {         }\n"
        );
    }
}
