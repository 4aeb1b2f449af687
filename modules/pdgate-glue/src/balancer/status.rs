//! The `<balancer>_status` page: the balancer's counters as text.

use std::ptr::null_mut;

use ngx::ffi::{
    ngx_http_request_t, ngx_http_upstream_main_conf_t, ngx_http_upstream_module,
    ngx_http_upstream_rr_peers_t, ngx_http_upstream_srv_conf_t,
};
use pdgate_core::balance::params::Role;
use pdgate_core::balance::slots::peer_key;

use super::{zone, Balancer, UpstreamConf};
use crate::conf::str_bytes;

/// The upstream module's main conf of the request's configuration.
///
/// # Safety
/// `r` must be a live request.
pub(crate) unsafe fn upstreams<'a>(
    r: *mut ngx_http_request_t,
) -> &'a [*mut ngx_http_upstream_srv_conf_t] {
    // SAFETY: every http request has a main_conf slot per http module; the
    // upstream main conf lives as long as the cycle.
    unsafe {
        let idx = (*std::ptr::addr_of!(ngx_http_upstream_module)).ctx_index;
        let umcf = *(*r).main_conf.add(idx) as *mut ngx_http_upstream_main_conf_t;
        match umcf.as_ref() {
            Some(umcf) => umcf.upstreams.as_slice(),
            None => &[],
        }
    }
}

/// The balancer's counters as text, one line per peer of every upstream
/// that uses it: `upstream peer requests tokens cost total` (and the
/// history when the policy keeps one).
///
/// # Safety
/// `r` must be a live request; `conf_of` as for
/// [`install`](super::hooks::install).
pub unsafe fn status_text(
    r: *mut ngx_http_request_t,
    balancer: &Balancer,
    conf_of: impl Fn(*mut ngx_http_upstream_srv_conf_t) -> *mut UpstreamConf,
) -> String {
    let needs = balancer.state.needs();
    let mut out = format!(
        "# {} upstream peer requests tokens cost total{}\n",
        balancer.name,
        if needs.history { " hist_requests hist_tokens" } else { "" }
    );
    let mut roles = false;
    let mut zone_seen = null_mut();
    // SAFETY: peer lists are round robin's (read without its lock: a
    // status snapshot), alive with the cycle.
    unsafe {
        for &us in upstreams(r) {
            let Some(conf) = conf_of(us).as_ref() else { continue };
            if conf.enabled != 1 {
                continue;
            }
            let Some(table) = zone::table(conf.zone) else { continue };
            roles |= conf.params.role != Role::Any;
            zone_seen = conf.zone;
            let peers = (*us).peer.data as *mut ngx_http_upstream_rr_peers_t;
            if peers.is_null() {
                continue;
            }
            let _read = crate::upstream::PeersRead::lock(peers);
            let mut p = (*peers).peer;
            while let Some(peer) = p.as_ref() {
                let key = peer_key(&conf.upstream_name, str_bytes(&peer.name));
                let (requests, tokens, cost, total) = match table.find(key) {
                    Some(i) => {
                        let (a, b, c) = table.load(i);
                        (a, b, c, table.total(i))
                    }
                    None => (0, 0, 0, 0),
                };
                out.push_str(&format!(
                    "{} {} {requests} {tokens} {cost} {total}",
                    String::from_utf8_lossy(&conf.upstream_name),
                    String::from_utf8_lossy(str_bytes(&peer.name)),
                ));
                if needs.history {
                    let (r, t) = table.find(key).map_or((0, 0), |i| table.history(i));
                    out.push_str(&format!(" {r} {t}"));
                }
                out.push('\n');
                p = peer.next;
            }
        }
    }
    if let Some(z) = zone::shared(zone_seen) {
        if roles {
            out.push_str(&format!("# in prefill {}\n", z.pending.len()));
        }
        if needs.prompt_blocks {
            out.push_str(&format!("# prefix index entries {}\n", z.index.used()));
        }
    }
    out
}
