//! Reading an engine's Prometheus `/metrics` answer (text exposition format
//! 0.0.4): [`samples`] walks its lines without copying, [`EngineLoad::read`]
//! takes out what routing uses — the running and waiting requests, the KV
//! cache pressure and the prefix-cache counters — under vLLM's names
//! (`vllm:`) or SGLang's (`sglang:`).
//!
//! The answer comes from an engine, not from us: any bytes are read without
//! a panic, in one pass, with nothing allocated per line. A line that is not
//! a sample (a comment, `# HELP`/`# TYPE`, garbage) is skipped; a sample line
//! that does not parse is counted in [`EngineLoad::bad_lines`].

use std::ops::Range;

/// One sample line: `name{labels} value [timestamp]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromSample<'a> {
    pub name: &'a str,
    /// The raw text between the braces (empty without labels).
    pub labels: &'a [u8],
    pub value: f64,
}

impl<'a> PromSample<'a> {
    /// The value of label `key`, unescaped (`\\`, `\"`, `\n`).
    pub fn label(&self, key: &str) -> Option<String> {
        labels(self.labels).flatten().find(|(k, _)| *k == key.as_bytes()).map(|(_, v)| unescape(v))
    }
}

/// Every line of `text` that is a sample, or `Err(line range)` for a line
/// that looks like one (starts with a metric name) but does not parse.
pub fn samples(text: &[u8]) -> impl Iterator<Item = Result<PromSample<'_>, Range<usize>>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        while at < text.len() {
            let end = memchr::memchr(b'\n', &text[at..]).map_or(text.len(), |p| at + p);
            let (start, line) = (at, &text[at..end]);
            at = end + 1;
            let line = trim(line);
            // Comments, HELP/TYPE, and lines that are no sample at all.
            if line.is_empty() || !is_name_start(line[0]) {
                continue;
            }
            return Some(parse_line(line).ok_or(start..end));
        }
        None
    })
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t' | b'\r', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t' | b'\r'] = s {
        s = rest;
    }
    s
}

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':'
}

fn is_name_byte(b: u8) -> bool {
    is_name_start(b) || b.is_ascii_digit()
}

fn parse_line(line: &[u8]) -> Option<PromSample<'_>> {
    if !is_name_start(*line.first()?) {
        return None;
    }
    let n = line.iter().take_while(|&&b| is_name_byte(b)).count();
    // ASCII by construction.
    let name = std::str::from_utf8(&line[..n]).ok()?;
    let mut rest = &line[n..];
    let mut set: &[u8] = &[];
    if rest.first() == Some(&b'{') {
        let close = labels_end(rest)?;
        set = &rest[1..close];
        if labels(set).any(|l| l.is_err()) {
            return None;
        }
        rest = &rest[close + 1..];
    }
    // The value, then an optional integer timestamp.
    let rest = trim(rest);
    let mut parts = rest.split(|&b| b == b' ' || b == b'\t').filter(|p| !p.is_empty());
    let value = parse_value(parts.next()?)?;
    if let Some(ts) = parts.next() {
        let digits = ts.strip_prefix(b"-").unwrap_or(ts);
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
    }
    if parts.next().is_some() {
        return None;
    }
    Some(PromSample { name, labels: set, value })
}

/// The index of the `}` closing the label set that starts at `s[0] == '{'`
/// (braces inside quoted values do not count).
fn labels_end(s: &[u8]) -> Option<usize> {
    let mut quoted = false;
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'}' if !quoted => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// One label's `(name, raw value)`, or `Err(())` where a set stops being one.
type Label<'a> = Result<(&'a [u8], &'a [u8]), ()>;

/// The `(name, raw value)` pairs of a label set: `name="value"` separated
/// by commas (blanks around the commas and a trailing comma allowed, none
/// around `=`; escapes `\\`, `\"`, `\n` only). An item is `Err(())` where
/// the set stops being one, and nothing follows it.
fn labels(s: &[u8]) -> impl Iterator<Item = Label<'_>> {
    let mut i = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let item = next_label(s, &mut i);
        done = !matches!(item, Some(Ok(_)));
        item
    })
}

/// The label at `*i` (after blanks and at most one comma), moving `*i`
/// past it; `None` at the end of the set.
fn next_label<'a>(s: &'a [u8], i: &mut usize) -> Option<Label<'a>> {
    let blanks = |i: &mut usize| {
        while s.get(*i).is_some_and(|b| *b == b' ' || *b == b'\t') {
            *i += 1;
        }
    };
    blanks(i);
    if *i > 0 && s.get(*i) == Some(&b',') {
        *i += 1;
        blanks(i);
    }
    if *i >= s.len() {
        return None;
    }
    let k0 = *i;
    if !is_name_start(s[k0]) || s[k0] == b':' {
        return Some(Err(()));
    }
    while s.get(*i).is_some_and(|&b| is_name_byte(b) && b != b':') {
        *i += 1;
    }
    let key = &s[k0..*i];
    if s.get(*i..*i + 2) != Some(&b"=\""[..]) {
        return Some(Err(()));
    }
    *i += 2;
    let v0 = *i;
    loop {
        match s.get(*i) {
            None | Some(b'\n') => return Some(Err(())),
            Some(b'\\') if matches!(s.get(*i + 1), Some(b'\\' | b'"' | b'n')) => *i += 2,
            Some(b'\\') => return Some(Err(())),
            Some(b'"') => break,
            Some(_) => *i += 1,
        }
    }
    let value = &s[v0..*i];
    *i += 1;
    // What follows a value: the end, or blanks then a comma or the end.
    blanks(i);
    if *i < s.len() && s[*i] != b',' {
        return Some(Err(()));
    }
    Some(Ok((key, value)))
}

fn unescape(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        match (v[i], v.get(i + 1)) {
            (b'\\', Some(b'n')) => {
                out.push(b'\n');
                i += 2;
            }
            (b'\\', Some(&c)) => {
                out.push(c);
                i += 2;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A sample value: a float as Go's `strconv.ParseFloat` writes them, or
/// `+Inf`, `-Inf`, `NaN`.
fn parse_value(v: &[u8]) -> Option<f64> {
    match v {
        b"+Inf" | b"Inf" => return Some(f64::INFINITY),
        b"-Inf" => return Some(f64::NEG_INFINITY),
        b"NaN" => return Some(f64::NAN),
        _ => {}
    }
    // Rust's parser also takes "inf", "infinity", "nan" in any case: not
    // the format's.
    if !v.iter().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-')) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// What routing reads from one engine's `/metrics`. Several samples of one
/// metric (several models, or data-parallel ranks) add up; the KV cache
/// pressure is the highest of them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineLoad {
    /// Requests in the running batch.
    pub running: Option<f64>,
    /// Requests waiting to be scheduled.
    pub waiting: Option<f64>,
    /// KV cache usage, 0–1.
    pub kv_usage: Option<f64>,
    /// Prefix-cache lookups and hits, in tokens (vLLM's counters).
    pub prefix_queries: Option<f64>,
    pub prefix_hits: Option<f64>,
    /// SGLang's radix cache hit rate, 0–1.
    pub cache_hit_rate: Option<f64>,
    /// Prompt tokens processed, ever (a counter).
    pub prompt_tokens: Option<f64>,
    /// Requests finished, ever (a counter).
    pub finished: Option<f64>,
    /// Lines that looked like samples and did not parse.
    pub bad_lines: u32,
}

/// How a sample's value joins the others of its metric.
#[derive(Clone, Copy)]
enum Join {
    Sum,
    Max,
}

/// The field of [`EngineLoad`] a metric fills.
type Field = fn(&mut EngineLoad) -> &mut Option<f64>;

/// The metric names read, and how their samples join.
const FIELDS: &[(&str, Join, Field)] = &[
    ("vllm:num_requests_running", Join::Sum, |l| &mut l.running),
    ("vllm:num_requests_waiting", Join::Sum, |l| &mut l.waiting),
    ("vllm:kv_cache_usage_perc", Join::Max, |l| &mut l.kv_usage),
    ("vllm:prefix_cache_queries_total", Join::Sum, |l| &mut l.prefix_queries),
    ("vllm:prefix_cache_hits_total", Join::Sum, |l| &mut l.prefix_hits),
    ("vllm:prompt_tokens_total", Join::Sum, |l| &mut l.prompt_tokens),
    ("vllm:request_success_total", Join::Sum, |l| &mut l.finished),
    ("sglang:num_running_reqs", Join::Sum, |l| &mut l.running),
    ("sglang:num_queue_reqs", Join::Sum, |l| &mut l.waiting),
    ("sglang:token_usage", Join::Max, |l| &mut l.kv_usage),
    ("sglang:cache_hit_rate", Join::Max, |l| &mut l.cache_hit_rate),
    ("sglang:prompt_tokens_total", Join::Sum, |l| &mut l.prompt_tokens),
    ("sglang:num_requests_total", Join::Sum, |l| &mut l.finished),
];

/// Names vLLM used before PR #18354, read when the new one is absent.
const OLD_NAMES: &[(&str, &str)] = &[
    ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    ("vllm:gpu_prefix_cache_queries_total", "vllm:prefix_cache_queries_total"),
    ("vllm:gpu_prefix_cache_hits_total", "vllm:prefix_cache_hits_total"),
];

impl EngineLoad {
    /// Reads an engine's `/metrics` answer; with `model`, only samples whose
    /// `model_name` label is that model (or that have none) count.
    pub fn read(text: &[u8], model: Option<&str>) -> EngineLoad {
        let mut new = EngineLoad::default();
        let mut old = EngineLoad::default();
        for s in samples(text) {
            let Ok(s) = s else {
                new.bad_lines = new.bad_lines.saturating_add(1);
                continue;
            };
            if !s.value.is_finite() || s.value < 0.0 {
                continue;
            }
            if let Some(m) = model {
                if s.label("model_name").is_some_and(|n| n != m) {
                    continue;
                }
            }
            let (target, name) = match OLD_NAMES.iter().find(|(o, _)| *o == s.name) {
                Some((_, renamed)) => (&mut old, *renamed),
                None => (&mut new, s.name),
            };
            if let Some((_, join, field)) = FIELDS.iter().find(|(n, _, _)| *n == name) {
                let slot = field(target);
                *slot = Some(match (*slot, join) {
                    (None, _) => s.value,
                    (Some(a), Join::Sum) => a + s.value,
                    (Some(a), Join::Max) => a.max(s.value),
                });
            }
        }
        for (_, _, field) in FIELDS {
            let o = *field(&mut old);
            let slot = field(&mut new);
            if slot.is_none() {
                *slot = o;
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B"} 3.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B"} 7.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B"} 0.5
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 1.2e+06
vllm:prefix_cache_hits_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 300000.0
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 52000.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="meta-llama/Llama-3.1-8B"} 40.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="meta-llama/Llama-3.1-8B"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B"} 12.0
"#;

    #[test]
    fn reads_vllm() {
        let l = EngineLoad::read(VLLM.as_bytes(), None);
        assert_eq!(l.running, Some(5.0), "ranks add up");
        assert_eq!(l.waiting, Some(7.0));
        assert_eq!(l.kv_usage, Some(0.5), "the highest pressure");
        assert_eq!(l.prefix_queries, Some(1.2e6));
        assert_eq!(l.prefix_hits, Some(3e5));
        assert_eq!(l.cache_hit_rate, None);
        assert_eq!((l.prompt_tokens, l.finished), (Some(52_000.0), Some(42.0)), "reasons add up");
        assert_eq!(l.bad_lines, 0);
    }

    #[test]
    fn reads_sglang() {
        let text = "# TYPE sglang:num_running_reqs gauge\n\
            sglang:num_running_reqs{model_name=\"qwen\",tp_rank=\"0\"} 4\n\
            sglang:num_queue_reqs{model_name=\"qwen\",tp_rank=\"0\"} 11\n\
            sglang:token_usage{model_name=\"qwen\",tp_rank=\"0\"} 0.82\n\
            sglang:cache_hit_rate{model_name=\"qwen\",tp_rank=\"0\"} 0.4\n";
        let l = EngineLoad::read(text.as_bytes(), Some("qwen"));
        assert_eq!((l.running, l.waiting, l.kv_usage), (Some(4.0), Some(11.0), Some(0.82)));
        assert_eq!(l.cache_hit_rate, Some(0.4));
    }

    #[test]
    fn old_vllm_names_only_when_the_new_are_absent() {
        let old =
            "vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.9\nvllm:gpu_prefix_cache_hits_total 5\n";
        let l = EngineLoad::read(old.as_bytes(), None);
        assert_eq!((l.kv_usage, l.prefix_hits), (Some(0.9), Some(5.0)));
        let both = format!("{old}vllm:kv_cache_usage_perc{{model_name=\"m\"}} 0.1\n");
        assert_eq!(EngineLoad::read(both.as_bytes(), None).kv_usage, Some(0.1));
    }

    #[test]
    fn model_filter() {
        let text = "vllm:num_requests_waiting{model_name=\"a\"} 1\n\
                    vllm:num_requests_waiting{model_name=\"b\"} 10\n\
                    vllm:num_requests_waiting 100\n";
        assert_eq!(EngineLoad::read(text.as_bytes(), Some("a")).waiting, Some(101.0));
        assert_eq!(EngineLoad::read(text.as_bytes(), None).waiting, Some(111.0));
    }

    #[test]
    fn sample_lines() {
        fn ok(line: &str) -> Option<(&str, &[u8], f64)> {
            parse_line(line.as_bytes()).map(|s| (s.name, s.labels, s.value))
        }
        assert_eq!(ok("a 1"), Some(("a", &b""[..], 1.0)));
        assert_eq!(ok("a{} 1 1712000000000"), Some(("a", &b""[..], 1.0)));
        assert_eq!(
            ok("a{x=\"}\",y=\"\\\"\"} -2.5e-3"),
            Some(("a", &b"x=\"}\",y=\"\\\"\""[..], -2.5e-3))
        );
        assert_eq!(ok("a{x=\"1\",} +Inf"), Some(("a", &b"x=\"1\","[..], f64::INFINITY)));
        assert!(parse_line(b"a NaN").is_some_and(|s| s.value.is_nan()));
        for bad in [
            "a",
            "a 1 2 3",
            "a{ 1",
            "a{x=1} 1",
            "a{x=\"1\"y=\"2\"} 1",
            "a inf",
            "a 0x10",
            "a 1 1.5",
            "1a 1",
            "a{x=\"\\q\"} 1",
            "a{:x=\"1\"} 1",
        ] {
            assert_eq!(ok(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn labels_unescaped() {
        let s = parse_line(br#"m{a="x\"y",b="line\nnext",c="back\\slash"} 1"#).unwrap();
        assert_eq!(s.label("a").as_deref(), Some("x\"y"));
        assert_eq!(s.label("b").as_deref(), Some("line\nnext"));
        assert_eq!(s.label("c").as_deref(), Some("back\\slash"));
        assert_eq!(s.label("d"), None);
    }

    #[test]
    fn garbage_is_skipped_or_counted() {
        let text = b"\xff\xfe\n# comment\n\nvllm:num_requests_waiting{model_name=\"m\"\nvllm:num_requests_waiting 2\n}}}\n";
        let l = EngineLoad::read(text, None);
        assert_eq!(l.waiting, Some(2.0));
        assert_eq!(l.bad_lines, 1, "only the line that starts like a sample");
        // Negative and infinite gauges are not loads.
        let l = EngineLoad::read(
            b"vllm:num_requests_waiting -1\nvllm:num_requests_running +Inf\n",
            None,
        );
        assert_eq!((l.waiting, l.running), (None, None));
    }
}
