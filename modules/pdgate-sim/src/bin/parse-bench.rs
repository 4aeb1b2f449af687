//! parse-bench: the cost of `pdgate_core::json::Object::parse` (plus the key
//! lookups the P/D plans make) on one body shape and size, with the peak RSS
//! of the whole process (body included). One case per process, so each peak
//! is its own; `scripts/bench-parse.sh` runs every case in one go.
//!
//! Usage: parse-bench SHAPE MEGABYTES
//! Shapes: plain (one string prompt), tiny (`"a":1,` members), escaped
//! (`"\u0061":1,` members), bounded-escaped (MAX_MEMBERS escaped keys with
//! long string values), deep (arrays nested MAX_DEPTH - 2 levels, repeated).

use pdgate_core::json::{Object, MAX_DEPTH, MAX_MEMBERS};
use std::time::Instant;

fn body(shape: &str, size: usize) -> Option<Vec<u8>> {
    let mut b = Vec::with_capacity(size + 64);
    b.push(b'{');
    match shape {
        "plain" => {
            b.extend_from_slice(br#""model":"m","max_tokens":16,"prompt":""#);
            while b.len() < size {
                b.extend_from_slice(b"lorem ipsum dolor sit amet ");
            }
            b.extend_from_slice(b"\"");
        }
        "tiny" | "escaped" => {
            let m: &[u8] = if shape == "tiny" { br#""a":1,"# } else { br#""\u0061":1,"# };
            while b.len() < size {
                b.extend_from_slice(m);
            }
            b.extend_from_slice(br#""z":0"#);
        }
        "bounded-escaped" => {
            let per = size / MAX_MEMBERS;
            for i in 0..MAX_MEMBERS {
                if i > 0 {
                    b.push(b',');
                }
                b.extend_from_slice(format!(r#""\u0061{i}":""#).as_bytes());
                b.resize(b.len() + per.saturating_sub(16), b'x');
                b.push(b'"');
            }
        }
        "deep" => {
            let d = MAX_DEPTH - 2;
            b.extend_from_slice(br#""a":["#);
            let mut first = true;
            while b.len() < size {
                if !first {
                    b.push(b',');
                }
                first = false;
                b.resize(b.len() + d, b'[');
                b.resize(b.len() + d, b']');
            }
            b.push(b']');
        }
        _ => return None,
    }
    b.push(b'}');
    Some(b)
}

fn peak_rss_kb() -> i64 {
    // SAFETY: getrusage only writes the struct we hand it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(shape), Some(mb)) = (args.get(1), args.get(2).and_then(|s| s.parse::<usize>().ok()))
    else {
        eprintln!("usage: parse-bench plain|tiny|escaped|bounded-escaped|deep MEGABYTES");
        std::process::exit(2);
    };
    let Some(src) = body(shape, mb << 20) else {
        eprintln!("parse-bench: unknown shape \"{shape}\"");
        std::process::exit(2);
    };
    let start = Instant::now();
    let outcome = match Object::parse(&src) {
        Ok(o) => {
            let found = ["max_tokens", "stream", "stream_options", "kv_transfer_params", "model"]
                .iter()
                .filter(|k| o.has(k))
                .count();
            format!("ok, {} members, {found} known keys", o.members.len())
        }
        Err(e) => format!("{} {e}", e.status()),
    };
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let rss = peak_rss_kb() as f64 / 1024.0;
    let body_mb = src.len() as f64 / (1 << 20) as f64;
    println!(
        "{shape:<16} {body_mb:>7.1} MB  parse {ms:>9.2} ms  peak RSS {rss:>7.1} MB ({:.2}x body)  {outcome}",
        rss / body_mb
    );
}
