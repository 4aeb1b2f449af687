//! The SGLang parallel ("bootstrap") P/D protocol, without nginx.
//!
//! Both legs get the client's request with three top-level members added:
//! `"bootstrap_host":"<prefill host>","bootstrap_port":<port>,"bootstrap_room":<room>`
//! (numbers, as SGLang's `GenerateReqInput` expects), and the prefill leg
//! additionally `"stream":false` (its answer is only checked, never relayed).
//! Whatever the client sent under the names the proxy owns
//! ([`PROXY_OWNED`]) is dropped from both legs: a client must not be able to
//! point a decode at another room, or hand an engine KV-transfer parameters.
//!
//! Also here: the directive parsers of `ngx_http_prefill_refactor_module`
//! (server lists, `bootstrap_ports_list`, `pd_distribution`, `pd_backend`),
//! the checks that refuse requests the protocol cannot carry (`n > 1`,
//! batch prompts), room generation and the least-active choice.

use std::fmt;

use crate::json::Object;
use crate::rewrite::{Piece, Plan};

/// SGLang's default bootstrap port (the prefill's side channel), used when
/// `bootstrap_ports_list` is empty.
pub const DEFAULT_BOOTSTRAP_PORT: u16 = 8998;

/// Top-level keys only the proxy may set on a leg: the bootstrap triple and
/// the KV-transfer parameters of the other P/D protocols (vLLM,
/// TRT-LLM, LMDeploy).
pub const PROXY_OWNED: &[&str] = &[
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
    "kv_transfer_params",
    "disaggregated_params",
    "migration_request",
];

/// `pd_distribution`: how the two legs are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    /// The prefill first; the decode only after a 2xx prefill answer.
    PBeforeD,
    /// Both legs at once; the decode's answer is streamed to the client.
    PdTogether,
}

impl Distribution {
    pub fn name(self) -> &'static str {
        match self {
            Distribution::PBeforeD => "p_before_d",
            Distribution::PdTogether => "pd_together",
        }
    }
}

/// A directive value of this module that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootstrapConfError {
    /// Not one of the keywords.
    NotOneOf { value: String, allowed: &'static str },
    /// A mode of the original we refuse, with why.
    Unsupported { value: String, why: &'static str },
    /// A server list entry that is not `host:port`.
    BadServer { value: String },
    /// An empty server list.
    NoServers,
    /// A port that is not 1–65535.
    BadPort { value: String },
    /// A ports list whose length is neither 0, 1 nor the number of prefill
    /// servers.
    PortCount { ports: usize, servers: usize },
}

impl fmt::Display for BootstrapConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootstrapConfError::NotOneOf { value, allowed } => {
                write!(f, "invalid value \"{value}\", it must be one of: {allowed}")
            }
            BootstrapConfError::Unsupported { value, why } => {
                write!(f, "value \"{value}\" is not supported: {why}")
            }
            BootstrapConfError::BadServer { value } => {
                write!(f, "invalid server \"{value}\", it must be \"host:port\"")
            }
            BootstrapConfError::NoServers => f.write_str("needs at least one \"host:port\""),
            BootstrapConfError::BadPort { value } => {
                write!(f, "invalid port \"{value}\", it must be 1-65535")
            }
            BootstrapConfError::PortCount { ports, servers } => write!(
                f,
                "has {ports} ports for {servers} prefill servers, it must have none, one, \
                 or one per server of \"prefill_servers_list\""
            ),
        }
    }
}

impl std::error::Error for BootstrapConfError {}

/// `p_before_d | pd_together`; `p_after_d` is refused (the original never
/// resumed the request in that mode, so every request hung).
pub fn parse_distribution(v: &[u8]) -> Result<Distribution, BootstrapConfError> {
    match v {
        b"p_before_d" => Ok(Distribution::PBeforeD),
        b"pd_together" => Ok(Distribution::PdTogether),
        b"p_after_d" => Err(BootstrapConfError::Unsupported {
            value: "p_after_d".into(),
            why: "the decode cannot run before its prefill, use \"p_before_d\" or \"pd_together\"",
        }),
        _ => Err(BootstrapConfError::NotOneOf {
            value: String::from_utf8_lossy(v).into_owned(),
            allowed: "p_before_d, pd_together",
        }),
    }
}

/// `pd_backend sglang`. `vllm` is refused: vLLM's P/D protocol is served by
/// the `prefill` directive (ngx_http_prefill_module), and the original took
/// the value without acting on it.
pub fn parse_backend(v: &[u8]) -> Result<(), BootstrapConfError> {
    match v {
        b"sglang" => Ok(()),
        b"vllm" => Err(BootstrapConfError::Unsupported {
            value: "vllm".into(),
            why: "this module speaks SGLang's bootstrap protocol, \
                  use the \"prefill\" directive for vLLM",
        }),
        _ => Err(BootstrapConfError::NotOneOf {
            value: String::from_utf8_lossy(v).into_owned(),
            allowed: "sglang",
        }),
    }
}

/// One entry of a server list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// As written (`host:port`): the value of `$prefill_server` /
    /// `$decode_server`.
    pub addr: String,
    /// The host part, without IPv6 brackets: the `bootstrap_host`.
    pub host: String,
    pub port: u16,
}

fn parse_port(v: &str) -> Result<u16, BootstrapConfError> {
    match v.parse::<u16>() {
        Ok(p) if p > 0 && v.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(BootstrapConfError::BadPort { value: v.to_owned() }),
    }
}

fn parse_server(item: &str) -> Result<Server, BootstrapConfError> {
    let bad = || BootstrapConfError::BadServer { value: item.to_owned() };
    let (host, port) = if let Some(rest) = item.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
        (h, p)
    } else {
        item.rsplit_once(':').ok_or_else(bad)?
    };
    let host_ok = !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
        && (item.starts_with('[') || !host.contains(':'));
    if !host_ok {
        return Err(bad());
    }
    let port = parse_port(port).map_err(|_| bad())?;
    Ok(Server { addr: item.to_owned(), host: host.to_owned(), port })
}

/// `prefill_servers_list` / `decode_servers_list`: comma-separated
/// `host:port` (IPv6 as `[addr]:port`), whitespace around items ignored.
pub fn parse_servers(v: &[u8]) -> Result<Vec<Server>, BootstrapConfError> {
    let s = std::str::from_utf8(v)
        .map_err(|_| BootstrapConfError::BadServer { value: String::from_utf8_lossy(v).into() })?;
    let items: Vec<&str> = s.split(',').map(str::trim).collect();
    if items.iter().all(|i| i.is_empty()) {
        return Err(BootstrapConfError::NoServers);
    }
    items.into_iter().map(parse_server).collect()
}

/// `bootstrap_ports_list`: empty, one port for every prefill server, or one
/// port per server. Returns the ports as written; see [`bootstrap_port`].
pub fn parse_ports(v: &[u8]) -> Result<Vec<u16>, BootstrapConfError> {
    let s = std::str::from_utf8(v)
        .map_err(|_| BootstrapConfError::BadPort { value: String::from_utf8_lossy(v).into() })?;
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',').map(|p| parse_port(p.trim())).collect()
}

/// Checks the ports list against the prefill servers (at configuration).
pub fn check_ports(ports: &[u16], servers: usize) -> Result<(), BootstrapConfError> {
    if ports.len() <= 1 || ports.len() == servers {
        Ok(())
    } else {
        Err(BootstrapConfError::PortCount { ports: ports.len(), servers })
    }
}

/// A prefill server of an upstream (`prefill_servers_upstream`): its peer
/// name, `address:port` (IPv6 in brackets), as a [`Server`]; `None` for a
/// name that is not one.
pub fn server_of_peer(name: &str) -> Option<Server> {
    parse_server(name).ok()
}

/// The bootstrap port of prefill server `host` of an upstream: the port of
/// the peer with the same address in the bootstrap upstream (`bootstrap=`,
/// e.g. from the `_bootstrap._tcp` SRV records of the same pods), else the
/// one `bootstrap_ports_list` port, else SGLang's default.
pub fn bootstrap_port_of(host: &str, bootstrap: &[Server], ports: &[u16]) -> u16 {
    match bootstrap.iter().find(|b| b.host == host) {
        Some(b) => b.port,
        None => bootstrap_port(ports.get(..1).unwrap_or(&[]), 0),
    }
}

/// The bootstrap port of prefill server `i`.
pub fn bootstrap_port(ports: &[u16], i: usize) -> u16 {
    match ports {
        [] => DEFAULT_BOOTSTRAP_PORT,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(DEFAULT_BOOTSTRAP_PORT),
    }
}

/// A bootstrap room: a random non-negative 63-bit integer (SGLang keeps it
/// in a signed 64-bit field).
pub fn room(random: u64) -> u64 {
    random >> 1
}

/// The index with the fewest requests in flight; among equals the first at
/// or after `start` (a random or rotating number), so that ties do not all
/// land on the first server as they did in the original. `None` if empty.
pub fn least_active(active: &[u64], start: u64) -> Option<usize> {
    let n = active.len();
    if n == 0 {
        return None;
    }
    let s = (start % n as u64) as usize;
    (0..n).map(|k| (s + k) % n).min_by_key(|&i| active[i])
}

pub use crate::rewrite::Refusal;

/// Refuses what one bootstrap room cannot carry: the same check, with the
/// same words, as the vLLM mode's ([`crate::rewrite::refusal`]).
pub fn check_request(obj: &Object<'_>) -> Result<(), Refusal> {
    crate::rewrite::refusal(obj).map_or(Ok(()), Err)
}

/// The members appended to both legs:
/// `"bootstrap_host":"<host>","bootstrap_port":<port>,"bootstrap_room":<room>`.
pub fn bootstrap_members(host: &str, port: u16, room: u64) -> String {
    // The host is JSON-escaped; serde_json cannot fail on a &str.
    let host = serde_json::to_string(host).unwrap_or_else(|_| "\"\"".into());
    format!("\"bootstrap_host\":{host},\"bootstrap_port\":{port},\"bootstrap_room\":{room}")
}

/// Which leg a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    Prefill,
    Decode,
}

/// The body of one leg: the client's members minus [`PROXY_OWNED`] (and, on
/// the prefill, minus `stream`/`stream_options`, replaced by
/// `"stream":false`), then `members` (from [`bootstrap_members`]). Untouched
/// runs of the client body stay single source ranges (no prompt copy).
pub fn leg_plan<'a>(obj: &Object<'_>, members: &'a [u8], leg: Leg) -> Plan<'a> {
    let drop: Vec<bool> = obj
        .members
        .iter()
        .map(|m| {
            PROXY_OWNED.iter().any(|k| obj.key_is(m, k))
                || (leg == Leg::Prefill
                    && (obj.key_is(m, "stream") || obj.key_is(m, "stream_options")))
        })
        .collect();
    let mut plan = Plan::default();
    // Appends a piece, merging adjacent source ranges.
    fn push<'a>(plan: &mut Plan<'a>, p: Piece<'a>) {
        if let (Some(Piece::Src(last)), Piece::Src(r)) = (plan.pieces.last_mut(), &p) {
            if last.end == r.start {
                last.end = r.end;
                return;
            }
        }
        plan.pieces.push(p);
    }
    push(&mut plan, Piece::Src(obj.open..obj.open + 1));
    let mut any = false;
    let mut prev_end: Option<usize> = None;
    for (i, m) in obj.members.iter().enumerate() {
        if drop[i] {
            prev_end = None;
            continue;
        }
        match prev_end {
            Some(end) => push(&mut plan, Piece::Src(end..m.value.end)),
            None if !any && i == 0 => push(&mut plan, Piece::Src(obj.open + 1..m.value.end)),
            None if !any => push(&mut plan, Piece::Src(m.key.start..m.value.end)),
            None => {
                push(&mut plan, Piece::Lit(","));
                push(&mut plan, Piece::Src(m.key.start..m.value.end));
            }
        }
        any = true;
        prev_end = Some(m.value.end);
    }
    if leg == Leg::Prefill {
        push(&mut plan, Piece::Lit(if any { ",\"stream\":false," } else { "\"stream\":false," }));
    } else if any {
        push(&mut plan, Piece::Lit(","));
    }
    push(&mut plan, Piece::Ext(members));
    push(&mut plan, Piece::Lit("}"));
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn leg(src: &str, leg: Leg) -> (Value, Plan<'static>) {
        let obj = Object::parse(src.as_bytes()).unwrap();
        let m: &'static [u8] =
            Box::leak(bootstrap_members("10.0.0.1", 8998, 42).into_bytes().into_boxed_slice());
        let plan = leg_plan(&obj, m, leg);
        let out = plan.to_vec(src.as_bytes());
        assert_eq!(out.len(), plan.len());
        let v = serde_json::from_slice(&out)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)));
        (v, plan)
    }

    #[test]
    fn legs_table() {
        let cases: Vec<(&str, Value, Value)> = vec![
            (
                r#"{"model":"m","prompt":"p","stream":true,"max_tokens":5}"#,
                json!({"model":"m","prompt":"p","max_tokens":5,"stream":false,
                       "bootstrap_host":"10.0.0.1","bootstrap_port":8998,"bootstrap_room":42}),
                json!({"model":"m","prompt":"p","stream":true,"max_tokens":5,
                       "bootstrap_host":"10.0.0.1","bootstrap_port":8998,"bootstrap_room":42}),
            ),
            (
                r#"{}"#,
                json!({"stream":false,"bootstrap_host":"10.0.0.1","bootstrap_port":8998,"bootstrap_room":42}),
                json!({"bootstrap_host":"10.0.0.1","bootstrap_port":8998,"bootstrap_room":42}),
            ),
            // Everything the proxy owns is the proxy's, wherever it sits.
            (
                r#"{"bootstrap_room":"1","messages":[],"bootstrap_host":"evil","kv_transfer_params":{},"disaggregated_params":{},"migration_request":{},"bootstrap_port":1,"stream_options":{"include_usage":true}}"#,
                json!({"messages":[],"stream":false,
                       "bootstrap_host":"10.0.0.1","bootstrap_port":8998,"bootstrap_room":42}),
                json!({"messages":[],"stream_options":{"include_usage":true},
                       "bootstrap_host":"10.0.0.1","bootstrap_port":8998,"bootstrap_room":42}),
            ),
        ];
        for (src, want_p, want_d) in cases {
            assert_eq!(leg(src, Leg::Prefill).0, want_p, "{src}");
            assert_eq!(leg(src, Leg::Decode).0, want_d, "{src}");
        }
    }

    #[test]
    fn nested_and_escaped_keys() {
        let src = "\n{ \"messages\":[{\"role\":\"user\",\"content\":\"x\",\"bootstrap_room\":5}],\n \"bootstr\\u0061p_room\": 7 }\n";
        let (v, _) = leg(src, Leg::Decode);
        assert_eq!(v["messages"][0]["bootstrap_room"], json!(5));
        assert_eq!(v["bootstrap_room"], json!(42));
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(text.matches("bootstrap_room").count(), 2);
    }

    #[test]
    fn big_prompt_stays_one_range() {
        let prompt = "x".repeat(1 << 20);
        let src = format!(r#"{{"prompt":"{prompt}","stream":true}}"#);
        let (_, plan) = leg(&src, Leg::Decode);
        let big = plan.pieces.iter().filter(|p| matches!(p, Piece::Src(r) if r.len() > 1000));
        assert_eq!(big.count(), 1);
    }

    #[test]
    fn members_escape_and_numbers() {
        assert_eq!(
            bootstrap_members("h\"x", 1, 9_223_372_036_854_775_807),
            r#""bootstrap_host":"h\"x","bootstrap_port":1,"bootstrap_room":9223372036854775807"#
        );
        assert_eq!(room(u64::MAX), (1 << 63) - 1);
        assert_eq!(room(3), 1);
    }

    #[test]
    fn distribution_and_backend() {
        assert_eq!(parse_distribution(b"pd_together"), Ok(Distribution::PdTogether));
        assert_eq!(parse_distribution(b"p_before_d"), Ok(Distribution::PBeforeD));
        let e = parse_distribution(b"p_after_d").unwrap_err().to_string();
        assert!(e.starts_with("value \"p_after_d\" is not supported"), "{e}");
        let e = parse_distribution(b"x").unwrap_err().to_string();
        assert_eq!(e, "invalid value \"x\", it must be one of: p_before_d, pd_together");
        assert!(parse_backend(b"sglang").is_ok());
        assert!(parse_backend(b"vllm").unwrap_err().to_string().contains("\"prefill\""));
        assert!(parse_backend(b"trt").is_err());
    }

    #[test]
    fn servers() {
        let s = parse_servers(b" 10.0.0.1:8000 , host-b.local:9000,[::1]:80").unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(
            (s[0].addr.as_str(), s[0].host.as_str(), s[0].port),
            ("10.0.0.1:8000", "10.0.0.1", 8000)
        );
        assert_eq!((s[1].host.as_str(), s[1].port), ("host-b.local", 9000));
        assert_eq!((s[2].addr.as_str(), s[2].host.as_str(), s[2].port), ("[::1]:80", "::1", 80));
        for bad in [
            &b"10.0.0.1"[..],
            b"h:0",
            b"h:70000",
            b"h:x",
            b"a b:1",
            b"10.0.0.1:1,,h:2",
            b"::1:80",
            b"h\":1",
        ] {
            assert!(parse_servers(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse_servers(b" , "), Err(BootstrapConfError::NoServers));
        assert_eq!(
            parse_servers(b"h").unwrap_err().to_string(),
            "invalid server \"h\", it must be \"host:port\""
        );
    }

    #[test]
    fn ports() {
        assert_eq!(parse_ports(b""), Ok(vec![]));
        assert_eq!(parse_ports(b"8998"), Ok(vec![8998]));
        assert_eq!(parse_ports(b"1, 2,3"), Ok(vec![1, 2, 3]));
        assert!(parse_ports(b"0").is_err());
        assert!(parse_ports(b"65536").is_err());
        assert!(parse_ports(b"1,,2").is_err());
        assert!(check_ports(&[1, 2], 3).is_err());
        assert!(check_ports(&[1, 2, 3], 3).is_ok());
        assert!(check_ports(&[1], 3).is_ok());
        assert_eq!(bootstrap_port(&[], 2), DEFAULT_BOOTSTRAP_PORT);
        assert_eq!(bootstrap_port(&[7], 2), 7);
        assert_eq!(bootstrap_port(&[7, 8, 9], 2), 9);
        assert_eq!(
            check_ports(&[1, 2], 3).unwrap_err().to_string(),
            "has 2 ports for 3 prefill servers, it must have none, one, or one per server of \"prefill_servers_list\""
        );
    }

    #[test]
    fn least_active_rotates_ties() {
        assert_eq!(least_active(&[], 0), None);
        assert_eq!(least_active(&[3, 1, 2], 0), Some(1));
        assert_eq!(least_active(&[3, 1, 2], 7), Some(1));
        let mut seen = [0; 3];
        for start in 0..30 {
            seen[least_active(&[0, 0, 0], start).unwrap()] += 1;
        }
        assert_eq!(seen, [10, 10, 10]);
        assert_eq!(least_active(&[1, 0, 0], 0), Some(1));
        assert_eq!(least_active(&[1, 0, 0], 2), Some(2));
    }

    #[test]
    fn refusals_are_the_vllm_modes() {
        // The check itself is tested in rewrite.rs; here only that the
        // bootstrap mode answers exactly as the vLLM mode does.
        for src in [
            r#"{"n":1,"prompt":"p"}"#,
            r#"{"prompt":[1,2,3]}"#,
            r#"{"messages":[{"content":"n"}],"n":"2"}"#,
            r#"{"n":2.0}"#,
            r#"{"best_of":"abc"}"#,
            r#"{"prompt":[ [1],[2]]}"#,
        ] {
            let obj = Object::parse(src.as_bytes()).unwrap();
            assert_eq!(check_request(&obj).err(), crate::rewrite::refusal(&obj), "{src}");
        }
        let obj = Object::parse(br#"{"n":4}"#).unwrap();
        assert!(check_request(&obj)
            .unwrap_err()
            .to_string()
            .starts_with("\"n\": 4 is not supported"));
    }

    #[test]
    fn bootstrap_ports_of_upstream_peers() {
        let s = server_of_peer("10.0.0.1:30000").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("10.0.0.1", 30000));
        let v6 = server_of_peer("[fd00::1]:30000").unwrap();
        assert_eq!(v6.host, "fd00::1");
        assert!(server_of_peer("no-port").is_none());
        let boot =
            [server_of_peer("10.0.0.2:9001").unwrap(), server_of_peer("10.0.0.1:9000").unwrap()];
        assert_eq!(bootstrap_port_of("10.0.0.1", &boot, &[]), 9000, "the same address's record");
        assert_eq!(bootstrap_port_of("10.0.0.3", &boot, &[7000]), 7000, "else the one port set");
        assert_eq!(bootstrap_port_of("10.0.0.3", &[], &[]), DEFAULT_BOOTSTRAP_PORT);
    }
}
