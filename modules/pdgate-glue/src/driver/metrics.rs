//! The driver's metrics: the log-phase record into the shared
//! `pdgate_metrics` zone and the `$pd_*` variables.

use super::*;

// --- metrics and log variables ------------------------------------------------------

/// The metrics zone's name (declared by `pd_metrics_zone`, in the prefill
/// module; every P/D module records into it).
pub const METRICS_ZONE: &[u8] = b"pdgate_metrics";

/// The `$pd_*` variables, in their `data` order.
pub(super) const VARS: [&str; 14] = [
    "pd_prefill_status",
    "pd_prefill_addr",
    "pd_prefill_time",
    "pd_gap_time",
    "pd_ttft",
    "pd_tpot",
    "pd_e2e",
    "pd_prompt_tokens",
    "pd_completion_tokens",
    "pd_outcome",
    "pd_failed_stage",
    "pd_queue_time",
    "pd_input_tokens",
    "pd_tokenized",
];

/// The handlers the variables had before this module took them.
pub(super) static mut PREVIOUS: [variable::Previous; 14] = [(None, 0); 14];

pub(super) unsafe extern "C" fn log_handler<P: Protocol>(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard::catch("pd log handler", NGX_OK as ngx_int_t, || {
        // SAFETY: nginx runs log handlers with the live request; the zone
        // found by name holds a MetricsZone (zone::add placed it).
        unsafe {
            if r != (*r).main {
                return NGX_OK as ngx_int_t;
            }
            let Some(ctx) = ctx_of::<P>(r) else { return NGX_OK as ngx_int_t };
            if !ctx.flow.is_pd() {
                return NGX_OK as ngx_int_t;
            }
            let m = &mut ctx.m;
            if m.counted {
                return NGX_OK as ngx_int_t;
            }
            m.counted = true;
            let z = zone::find_in_cycle(METRICS_ZONE).unwrap_or(null_mut());
            if let Some(z) = zone::state::<MetricsZone>(z) {
                z.record(&m.sample(), observe::final_status(r), observe::connection_broken(r));
            }
            NGX_OK as ngx_int_t
        }
    })
}

/// `ms` milliseconds as seconds with three decimals (`$request_time`'s form).
pub(super) unsafe extern "C" fn pd_variable<P: Protocol>(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    data: usize,
) -> ngx_int_t {
    guard::catch("pd variable", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls variable getters with a live request and value.
        unsafe {
            let main = (*r).main;
            let Some(m) = record::<P>(main) else {
                // Not ours: the other P/D module's, if it declared it too.
                if let Some(&(Some(prev), pdata)) = (*addr_of!(PREVIOUS)).get(data) {
                    return prev(r, v, pdata);
                }
                variable::not_found(v);
                return NGX_OK as ngx_int_t;
            };
            let s = m.sample();
            let (status, closed) = (observe::final_status(main), observe::connection_broken(main));
            // Labels and the address need no copy: static, or in the pool.
            let fixed: Option<&[u8]> = match data {
                1 => Some(m.prefill_addr).filter(|a| !a.is_empty()),
                9 => Some(s.outcome(status, closed).label().as_bytes()),
                10 => s.failed_stage(status, closed).map(|st| st.label().as_bytes()),
                13 => Some(m.tokenized).filter(|t| !t.is_empty()),
                _ => None,
            };
            if let Some(b) = fixed {
                variable::set(v, b);
                return NGX_OK as ngx_int_t;
            }
            let mut t = pdgate_core::metrics::VarText::new();
            let found = match data {
                0 => s.prefill_status != 0 && t.num(u64::from(s.prefill_status)),
                2 => s.prefill_ms().is_some_and(|ms| t.secs(ms)),
                3 => s.gap_ms().is_some_and(|ms| t.secs(ms)),
                4 => s.ttft_ms().is_some_and(|ms| t.secs(ms)),
                5 => s.tpot_us().is_some_and(|us| t.secs(us / 1000)),
                6 => s.e2e_ms().is_some_and(|ms| t.secs(ms)),
                7 => s.prompt_tokens.is_some_and(|n| t.num(n)),
                8 => s.completion_tokens.is_some_and(|n| t.num(n)),
                11 => s.held_ms.is_some_and(|ms| t.secs(ms)),
                12 => m.input_tokens.is_some_and(|n| t.num(n)),
                _ => false,
            };
            match found.then(|| observe::pool_bytes(r, t.bytes())).flatten() {
                Some(b) => variable::set(v, b),
                None => variable::not_found(v),
            }
            NGX_OK as ngx_int_t
        }
    })
}
