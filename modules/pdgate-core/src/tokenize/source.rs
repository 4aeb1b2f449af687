//! Reading a chat template's source before it is compiled (once, at load).
//!
//! Two things are decided from the text alone, as vLLM and transformers do:
//!
//! - **Content format** ([`detect_content_format`]). vLLM parses the template
//!   (`_detect_content_format` in `vllm/renderers/hf.py`) and looks for a loop
//!   over a message's `content` (`{% for part in message['content'] %}`, where
//!   `message` is a loop variable over `messages` or over a variable set from
//!   it). Found: the template gets content as a list of `{"type": "text",
//!   "text": ...}` parts ("openai"); not found: as one string ("string").
//!   We follow the same rules over the template's block tags with a small
//!   expression lexer instead of Jinja2's parser.
//! - **`{% generation %}` blocks** ([`rewrite_generation_tags`]). transformers
//!   registers a `generation` tag that marks assistant text for training
//!   masks and otherwise renders its body unchanged. minijinja has no such
//!   tag, so it becomes `{% if true %}`...`{% endif %}`, which renders the
//!   same and keeps the tag's whitespace control.

use std::borrow::Cow;
use std::ops::Range;

/// How message `content` is handed to the chat template (vLLM's
/// `--chat-template-content-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentFormat {
    /// Text parts joined with `"\n"` into one string.
    String,
    /// A list of `{"type": "text", "text": ...}` parts (a string content
    /// becomes a one-part list).
    OpenAi,
}

/// One `{% ... %}` tag: where it sits and its text between the delimiters
/// (whitespace-control marks removed, trimmed).
struct Tag<'a> {
    range: Range<usize>,
    inner: &'a str,
}

/// The block tags of `src` in order, skipping comments, expressions and
/// `{% raw %}` sections.
fn block_tags(src: &str) -> Vec<Tag<'_>> {
    let b = src.as_bytes();
    let mut tags = Vec::new();
    let mut i = 0;
    let mut in_raw = false;
    while let Some(off) = memchr::memchr(b'{', &b[i..]) {
        let start = i + off;
        match b.get(start + 1) {
            Some(b'#') if !in_raw => {
                i = find(b, start + 2, b"#}").map_or(b.len(), |e| e + 2);
            }
            Some(b'{') if !in_raw => {
                i = close(b, start + 2, b"}}");
            }
            Some(b'%') => {
                let end = close(b, start + 2, b"%}");
                let inner = src.get(start + 2..end.saturating_sub(2).max(start + 2)).unwrap_or("");
                let inner =
                    inner.trim_start_matches(['-', '+']).trim_end_matches(['-', '+']).trim();
                if in_raw {
                    in_raw = inner != "endraw";
                } else if inner == "raw" {
                    in_raw = true;
                } else {
                    tags.push(Tag { range: start..end, inner });
                }
                i = end;
            }
            _ => i = start + 1,
        }
        if i >= b.len() {
            break;
        }
    }
    tags
}

fn find(b: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    b.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| from + p)
}

/// The index just past the `end` delimiter of a tag opened before `from`,
/// skipping string literals (a `'%}'` inside one does not close the tag).
fn close(b: &[u8], from: usize, end: &[u8]) -> usize {
    let mut i = from;
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            _ if b[i..].starts_with(end) => return i + end.len(),
            _ => i += 1,
        }
    }
    b.len()
}

/// Replaces transformers' `{% generation %}`/`{% endgeneration %}` tags with
/// `{% if true %}`/`{% endif %}`; borrows when there are none.
pub(crate) fn rewrite_generation_tags(src: &str) -> Cow<'_, str> {
    let mut out = String::new();
    let mut last = 0;
    for tag in block_tags(src) {
        let with = match tag.inner {
            "generation" => "if true",
            "endgeneration" => "endif",
            _ => continue,
        };
        let text = &src[tag.range.clone()];
        let Some(at) = text.find(tag.inner) else { continue };
        out.push_str(&src[last..tag.range.start + at]);
        out.push_str(with);
        last = tag.range.start + at + tag.inner.len();
    }
    if last == 0 {
        return Cow::Borrowed(src);
    }
    out.push_str(&src[last..]);
    Cow::Owned(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    Name(&'a str),
    /// A string literal's text between its quotes (escapes left as written).
    Str(&'a str),
    Num,
    Op(&'a str),
}

/// Splits a tag's text into Jinja expression tokens.
fn lex(s: &str) -> Vec<Tok<'_>> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Name(&s[start..i]));
        } else if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Num);
        } else if c == b'\'' || c == b'"' {
            let start = i + 1;
            i = start;
            while i < b.len() && b[i] != c {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            out.push(Tok::Str(s.get(start..i.min(b.len())).unwrap_or("")));
            i += 1;
        } else {
            let two = s.get(i..i + 2).unwrap_or("");
            let len = if matches!(two, "==" | "!=" | "<=" | ">=" | "//" | "**") { 2 } else { 1 };
            // Non-ASCII outside strings is invalid Jinja; step over the whole char.
            let len =
                if c.is_ascii() { len } else { s[i..].chars().next().map_or(1, char::len_utf8) };
            out.push(Tok::Op(&s[i..i + len]));
            i += len;
        }
    }
    out
}

/// Bracket depth after each token, to find operators at the top level.
fn top_level<'a>(toks: &'a [Tok<'a>]) -> impl Iterator<Item = (usize, &'a Tok<'a>)> + 'a {
    let mut depth = 0i32;
    toks.iter().enumerate().filter(move |(_, t)| {
        let at_top = depth == 0;
        match t {
            Tok::Op("(" | "[" | "{") => depth += 1,
            Tok::Op(")" | "]" | "}") => depth -= 1,
            _ => {}
        }
        at_top
    })
}

fn position(toks: &[Tok<'_>], want: Tok<'_>) -> Option<usize> {
    top_level(toks).find(|(_, t)| **t == want).map(|(i, _)| i)
}

/// vLLM's `_is_var_or_elems_access`: `expr` is `var` (or `var[key]`/
/// `var.key` when `key` is given), possibly under filters (`| list`), a test
/// (`is defined`) or slices (`[1:]`), in any nesting.
fn elems_access(mut toks: &[Tok<'_>], var: &str, key: Option<&str>) -> bool {
    loop {
        let before = toks.len();
        if let Some(i) = position(toks, Tok::Op("|")) {
            toks = &toks[..i];
        }
        if let Some(i) = position(toks, Tok::Name("is")) {
            toks = &toks[..i];
        }
        if let [Tok::Op("("), inner @ .., Tok::Op(")")] = toks {
            if balanced(inner) {
                toks = inner;
            }
        }
        if let Some(stripped) = strip_slice(toks) {
            toks = stripped;
        }
        if toks.len() == before {
            break;
        }
    }
    match (toks, key) {
        ([Tok::Name(n)], None) => *n == var,
        ([Tok::Name(n), Tok::Op("."), Tok::Name(k)], Some(key)) => *n == var && *k == key,
        ([Tok::Name(n), Tok::Op("["), Tok::Str(k), Tok::Op("]")], Some(key)) => {
            *n == var && *k == key
        }
        _ => false,
    }
}

fn balanced(toks: &[Tok<'_>]) -> bool {
    let mut depth = 0i32;
    for t in toks {
        match t {
            Tok::Op("(" | "[" | "{") => depth += 1,
            Tok::Op(")" | "]" | "}") => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    depth == 0
}

/// `x[a:b]` → `x` when the last bracket group is a slice.
fn strip_slice<'t, 'a>(toks: &'t [Tok<'a>]) -> Option<&'t [Tok<'a>]> {
    if toks.last() != Some(&Tok::Op("]")) {
        return None;
    }
    let open = top_level(toks).filter(|(_, t)| **t == Tok::Op("[")).map(|(i, _)| i).last()?;
    let inside = &toks[open + 1..toks.len() - 1];
    if open == 0 || !balanced(inside) || position(inside, Tok::Op(":")).is_none() {
        return None;
    }
    Some(&toks[..open])
}

/// A `for` tag: its loop variable (`None` for a tuple target) and iterable.
struct ForTag<'a> {
    target: Option<&'a str>,
    iter: Vec<Tok<'a>>,
}

/// A `set name = expr` tag (`None` name for `ns.attr` or tuple targets).
struct SetTag<'a> {
    target: Option<&'a str>,
    value: Vec<Tok<'a>>,
}

fn single_name<'a>(toks: &[Tok<'a>]) -> Option<&'a str> {
    match toks {
        [Tok::Name(n)] => Some(n),
        _ => None,
    }
}

/// vLLM's detection; a shape its parser would fail on (a tuple or attribute
/// target where it expects a name) gives its default, "string".
pub(crate) fn detect_content_format(src: &str) -> ContentFormat {
    if loops_over_content(src) == Some(true) {
        ContentFormat::OpenAi
    } else {
        ContentFormat::String
    }
}

fn loops_over_content(src: &str) -> Option<bool> {
    let mut fors = Vec::new();
    let mut sets = Vec::new();
    for tag in block_tags(src) {
        let toks = lex(tag.inner);
        match toks.first() {
            Some(Tok::Name("for")) => {
                let body = &toks[1..];
                let Some(k) = position(body, Tok::Name("in")) else { continue };
                let rest = &body[k + 1..];
                let end = top_level(rest)
                    .find(|(_, t)| matches!(t, Tok::Name("if" | "recursive")))
                    .map_or(rest.len(), |(i, _)| i);
                fors.push(ForTag { target: single_name(&body[..k]), iter: rest[..end].to_vec() });
            }
            Some(Tok::Name("set")) => {
                let body = &toks[1..];
                let Some(eq) = position(body, Tok::Op("=")) else { continue };
                sets.push(SetTag {
                    target: single_name(&body[..eq]),
                    value: body[eq + 1..].to_vec(),
                });
            }
            _ => {}
        }
    }
    // Variables holding the messages: `messages` and whatever is set from it.
    let mut lists = vec!["messages"];
    let mut next = 0;
    while let Some(&var) = lists.get(next) {
        next += 1;
        for set in &sets {
            if elems_access(&set.value, var, None) {
                let name = set.target?;
                if !lists.contains(&name) {
                    lists.push(name);
                }
            }
        }
    }
    // Loop variables over those lists: one message each.
    let mut items = Vec::new();
    for f in &fors {
        if lists.iter().any(|l| elems_access(&f.iter, l, None)) {
            items.push(f.target?);
        }
    }
    // A loop over a message's content.
    let first =
        fors.iter().find(|f| items.iter().any(|m| elems_access(&f.iter, m, Some("content"))));
    Some(first.is_some_and(|f| f.target.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_format_follows_vllm_detection() {
        use ContentFormat::{OpenAi, String as Str};
        let cases = [
            ("{% for message in messages %}{% for c in message['content'] %}{% endfor %}{% endfor %}", OpenAi),
            ("{% for message in messages %}{{ message['content'] }}{% endfor %}", Str),
            ("{%- set loop_messages = messages[1:] %}{% for m in loop_messages -%}{% for p in m.content %}{% endfor %}{% endfor %}", OpenAi),
            ("{% for m in messages %}{% for p in m.content | selectattr('type', 'equalto', 'text') %}{% endfor %}{% endfor %}", OpenAi),
            ("{% for m in messages if m.role != 'system' %}{% for p in m[\"content\"] %}{% endfor %}{% endfor %}", OpenAi),
            ("{% for m in (messages) %}{% for p in (m.content)[1:] %}{% endfor %}{% endfor %}", OpenAi),
            // A tuple target where vLLM expects a name: its default.
            ("{% for a, b in messages %}{% endfor %}{% for m in messages %}{% for p in m.content %}{% endfor %}{% endfor %}", Str),
            // Assignments that refer to each other do not loop forever.
            ("{% set a = messages %}{% set messages = a %}{% for m in a %}{% for p in m.content %}{% endfor %}{% endfor %}", OpenAi),
            // Comments, raw blocks, expressions and an indexed message do not count.
            ("{# {% for m in messages %}{% for p in m.content %} #}", Str),
            ("{% raw %}{% for m in messages %}{% for p in m.content %}{% endraw %}", Str),
            ("{{ '{% for m in messages %}{% for p in m.content %}' }}", Str),
            ("{% for p in messages[0]['content'] %}{% endfor %}", Str),
            ("{% for m in messages %}{% for p in m.contents %}{% endfor %}{% endfor %}", Str),
        ];
        for (src, want) in cases {
            assert_eq!(detect_content_format(src), want, "{src}");
        }
    }

    #[test]
    fn generation_tags_become_plain_blocks() {
        assert_eq!(
            rewrite_generation_tags("a{%- generation -%}b{{ x }}{%- endgeneration %}c"),
            "a{%- if true -%}b{{ x }}{%- endif %}c"
        );
        assert!(matches!(rewrite_generation_tags("{% if x %}{% endif %}"), Cow::Borrowed(_)));
        let raw = "{% raw %}{% generation %}{% endraw %}";
        assert_eq!(rewrite_generation_tags(raw), raw);
    }
}
