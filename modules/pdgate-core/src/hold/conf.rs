//! `pd_hold`'s settings: parsing, the caps they give, and whether an
//! engine's own report leaves it room.

use super::{Caps, Order, QUEUE_MAX};

/// `pd_hold`'s settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldConf {
    /// The prefill pool: its upstream and the requests each of its servers
    /// takes at once.
    pub prefill_upstream: Vec<u8>,
    pub prefill_max_num_seqs: u64,
    /// The decode pool, the same way.
    pub decode_upstream: Vec<u8>,
    pub decode_max_num_seqs: u64,
    /// Requests waiting at most.
    pub queue: u64,
    /// A request waiting this long is answered `status`, ms.
    pub timeout_ms: u64,
    /// The answer of a full queue or a timed-out wait: 429 or 503.
    pub status: u16,
    /// `Retry-After` of those answers, seconds.
    pub retry_after_s: u64,
    /// `order=fifo|spf` and `aging=` (tokens per second).
    pub order: Order,
    /// `max_waiting=N`: an engine whose `/metrics` (`pd_engine_metrics`)
    /// report N or more waiting requests has no room.
    pub max_waiting: Option<u64>,
    /// `kv_full=on`: an engine at its `kv_high` has no room.
    pub kv_full: bool,
}

/// A `pd_hold` argument that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldConfError(pub String);

impl std::fmt::Display for HoldConfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HoldConfError {}

impl HoldConf {
    /// Parses `prefill=<upstream>[:N] decode=<upstream>[:N] [queue=N]
    /// [timeout=time] [status=429|503] [retry_after=N]` (N: requests per
    /// server, default 16 on prefill and 32 on decode, the joint
    /// balancer's caps).
    pub fn parse(args: &[&[u8]]) -> Result<HoldConf, HoldConfError> {
        let mut c = HoldConf {
            prefill_upstream: Vec::new(),
            prefill_max_num_seqs: crate::balance::PD_SCORE_MAX_SEQS_PREFILL,
            decode_upstream: Vec::new(),
            decode_max_num_seqs: crate::balance::PD_SCORE_MAX_SEQS_DECODE,
            queue: 1024,
            timeout_ms: 30_000,
            status: 503,
            retry_after_s: 1,
            order: Order::Fifo,
            max_waiting: None,
            kv_full: false,
        };
        let mut spf = false;
        let mut aging = DEFAULT_AGING_TPS;
        let mut aging_set = false;
        crate::conf::parameters(args, |name, value| {
            use crate::conf::{invalid_value, number, positive_ms, POSITIVE_TIME};
            let bad = |why: &str| invalid_value(name, value, why);
            match name {
                b"prefill" | b"decode" => {
                    let (up, n) = match value.iter().rposition(|&b| b == b':') {
                        Some(i) => (&value[..i], Some(&value[i + 1..])),
                        None => (value, None),
                    };
                    let n = match n {
                        None => None,
                        Some(n) => Some(number(n, 1, 1_000_000).ok_or_else(|| {
                            bad(", the requests per server after \":\" must be a positive number")
                        })?),
                    };
                    if up.is_empty() || !up.iter().all(|b| b.is_ascii_graphic()) {
                        return Err(bad(", it must be an upstream name"));
                    }
                    if name == b"prefill" {
                        c.prefill_upstream = up.to_vec();
                        c.prefill_max_num_seqs = n.unwrap_or(c.prefill_max_num_seqs);
                    } else {
                        c.decode_upstream = up.to_vec();
                        c.decode_max_num_seqs = n.unwrap_or(c.decode_max_num_seqs);
                    }
                }
                b"queue" => {
                    c.queue = number(value, 1, QUEUE_MAX as u64).ok_or_else(|| {
                        bad(&format!(", it must be a number from 1 to {QUEUE_MAX}"))
                    })?;
                }
                b"timeout" => {
                    c.timeout_ms = positive_ms(value).ok_or_else(|| bad(POSITIVE_TIME))?
                }
                b"status" => {
                    c.status = match value {
                        b"429" => 429,
                        b"503" => 503,
                        _ => return Err(bad(", it must be 429 or 503")),
                    };
                }
                b"order" => {
                    spf = match value {
                        b"fifo" => false,
                        b"spf" => true,
                        _ => return Err(bad(", it must be fifo or spf")),
                    };
                }
                b"aging" => {
                    aging = number(value, 1, 100_000_000).ok_or_else(|| {
                        bad(", it must be a positive number of tokens per second")
                    })?;
                    aging_set = true;
                }
                b"max_waiting" => {
                    c.max_waiting = Some(
                        number(value, 1, 1_000_000)
                            .ok_or_else(|| bad(", it must be a positive number of requests"))?,
                    );
                }
                b"kv_full" => {
                    c.kv_full = crate::conf::parse_flag(value)
                        .map_err(|_| bad(", it must be \"on\" or \"off\""))?;
                }
                b"retry_after" => {
                    c.retry_after_s = number(value, 1, 86_400)
                        .ok_or_else(|| bad(", it must be a number of seconds from 1 to 86400"))?;
                }
                _ => return Ok(false),
            }
            Ok(true)
        })
        .map_err(HoldConfError)?;
        if aging_set && !spf {
            return Err(HoldConfError("\"aging\" is for order=spf".into()));
        }
        if spf {
            c.order = Order::Spf { aging_tps: aging };
        }
        if c.prefill_upstream.is_empty() || c.decode_upstream.is_empty() {
            return Err(HoldConfError(
                "needs prefill=<upstream> and decode=<upstream> (the pools whose room it counts)"
                    .into(),
            ));
        }
        Ok(c)
    }

    /// Whether an engine with this view (its `/metrics`) has room for
    /// `max_waiting` and `kv_full`: without a fresh scrape it has.
    pub fn engine_has_room(&self, e: &crate::engine::EngineView) -> bool {
        !e.fresh
            || (!(self.kv_full && e.pressured) && self.max_waiting.is_none_or(|m| e.waiting < m))
    }

    /// Whether the engines' own reports count ([`engine_has_room`](Self::engine_has_room)).
    pub fn reads_engines(&self) -> bool {
        self.kv_full || self.max_waiting.is_some()
    }

    /// The caps with `prefill_up` and `decode_up` servers up.
    pub fn caps(&self, prefill_up: u64, decode_up: u64) -> Caps {
        Caps {
            prefill: prefill_up.saturating_mul(self.prefill_max_num_seqs),
            decode: decode_up.saturating_mul(self.decode_max_num_seqs),
            queue: self.queue,
            order: self.order,
        }
    }
}

/// `aging`'s default: a prompt waiting one second counts 1000 tokens
/// shorter (a 16k-token prompt goes before fresh short ones within ~16 s).
pub const DEFAULT_AGING_TPS: u64 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_parses_and_refuses() {
        let c = HoldConf::parse(&[
            b"prefill=p:8",
            b"decode=d",
            b"queue=100",
            b"timeout=5s",
            b"status=429",
            b"retry_after=3",
        ])
        .unwrap();
        assert_eq!((c.prefill_upstream.as_slice(), c.prefill_max_num_seqs), (&b"p"[..], 8));
        assert_eq!((c.decode_upstream.as_slice(), c.decode_max_num_seqs), (&b"d"[..], 32));
        assert_eq!((c.queue, c.timeout_ms, c.status, c.retry_after_s), (100, 5000, 429, 3));
        assert_eq!(c.caps(2, 3), Caps { prefill: 16, decode: 96, queue: 100, order: Order::Fifo });
        let o = HoldConf::parse(&[b"prefill=p", b"decode=d", b"order=spf", b"aging=50"]).unwrap();
        assert_eq!(o.order, Order::Spf { aging_tps: 50 });
        let o = HoldConf::parse(&[b"prefill=p", b"decode=d", b"order=spf"]).unwrap();
        assert_eq!(o.order, Order::Spf { aging_tps: DEFAULT_AGING_TPS });
        assert!(!o.reads_engines());
        let e =
            HoldConf::parse(&[b"prefill=p", b"decode=d", b"max_waiting=4", b"kv_full=on"]).unwrap();
        assert!(e.reads_engines());
        use crate::engine::EngineView;
        let fresh = EngineView { fresh: true, ..EngineView::default() };
        assert!(e.engine_has_room(&fresh));
        assert!(!e.engine_has_room(&EngineView { waiting: 4, ..fresh }), "4 waiting: full");
        assert!(!e.engine_has_room(&EngineView { pressured: true, ..fresh }), "KV full");
        assert!(
            e.engine_has_room(&EngineView { waiting: 9, fresh: false, ..fresh }),
            "stale: room"
        );
        assert!(
            o.engine_has_room(&EngineView { waiting: 9, pressured: true, ..fresh }),
            "not asked"
        );
        let d = HoldConf::parse(&[b"prefill=p", b"decode=d"]).unwrap();
        assert_eq!(
            (d.prefill_max_num_seqs, d.queue, d.timeout_ms, d.status),
            (16, 1024, 30_000, 503)
        );
        for (args, msg) in [
            (&[&b"prefill=p"[..]][..], "needs prefill=<upstream> and decode=<upstream> (the pools whose room it counts)"),
            (&[b"prefill=p:0", b"decode=d"], "invalid parameter \"prefill=p:0\", the requests per server after \":\" must be a positive number"),
            (&[b"prefill=p", b"decode=d", b"status=500"], "invalid parameter \"status=500\", it must be 429 or 503"),
            (&[b"prefill=p", b"decode=d", b"queue=0"], "invalid parameter \"queue=0\", it must be a number from 1 to 4096"),
            (&[b"prefill=p", b"decode=d", b"wait=1s"], "invalid parameter \"wait=1s\""),
            (&[b"prefill=p", b"prefill=q"], "duplicate parameter \"prefill\""),
            (&[b"prefill=p", b"decode=d", b"order=lifo"], "invalid parameter \"order=lifo\", it must be fifo or spf"),
            (&[b"prefill=p", b"decode=d", b"aging=5"], "\"aging\" is for order=spf"),
        ] {
            assert_eq!(HoldConf::parse(args).unwrap_err().0, msg);
        }
    }
}
