//! The text of the `pd_metrics` page: the P/D metrics zone, the
//! in-flight gauges of every pdgate balancer and each peer's health and
//! engine gauges (the health zone), rendered as Prometheus text
//! by pdgate-core (`metrics::render`). The P/D module's content handler
//! serves it.

use ngx::http::Request;
use pdgate_core::metrics::{render, MetricsZone, PeerGauge};

use crate::http::RequestExt;

/// A balancer gauge copied out of the walk over the zones.
type OwnedGauge = (String, Vec<u8>, Vec<u8>, u64, u64);

/// The page for `r`: `zone`'s counters (all zero without a zone) and the
/// gauges of the balancers of `r`'s configuration.
pub fn page(r: &mut Request, zone: Option<&MetricsZone>) -> String {
    let empty = MetricsZone::default();
    let z = zone.unwrap_or(&empty);
    let mut owned: Vec<OwnedGauge> = Vec::new();
    // SAFETY: a &mut Request is a live request.
    unsafe {
        crate::balancer::for_each_peer_gauge(r.raw(), |b, u, p, requests, tokens| {
            owned.push((b.to_owned(), u.to_vec(), p.to_vec(), requests, tokens));
        });
    }
    let gauges: Vec<PeerGauge<'_>> = owned
        .iter()
        .map(|(b, u, p, requests, tokens)| PeerGauge {
            balancer: b,
            upstream: u,
            peer: p,
            requests: *requests,
            tokens: *tokens,
        })
        .collect();
    let mut page = render(z, &gauges);
    pdgate_core::engine::render_peer_gauges(&mut page, &crate::health::peer_states());
    pdgate_core::hold::render(&mut page, &crate::hold::gate_stats());
    page
}
