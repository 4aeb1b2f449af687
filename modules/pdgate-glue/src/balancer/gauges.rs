//! Every pdgate balancer's in-flight counters, read across modules (the
//! P/D module's metrics page shows them as gauges).

use ngx::ffi::{ngx_http_request_t, ngx_http_upstream_rr_peers_t, ngx_shm_zone_t};
use pdgate_core::balance::slots::peer_key;

use super::zone;
use crate::conf::str_bytes;

/// Calls `f(balancer, upstream, peer, requests, tokens)` for each primary
/// peer of each upstream that has a slot in a balancer zone of the running
/// cycle, whichever module (`.so`) owns the zone. Zones are recognised by
/// name (`pdgate_<balancer>`), by the header magic and by a layout that
/// fits the zone, so this works across modules built from this crate
/// without sharing any static.
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn for_each_peer_gauge(
    r: *mut ngx_http_request_t,
    mut f: impl FnMut(&str, &[u8], &[u8], u64, u64),
) {
    // SAFETY: ngx_cycle is the running cycle in a worker; its shared memory
    // list and the zones in it live as long as the cycle. A zone's data is
    // only read as a balancer's once `is_balancer_zone` checked it lies in
    // the zone; peer lists as in the status page.
    unsafe {
        let cycle = *std::ptr::addr_of!(ngx::ffi::ngx_cycle);
        let Some(cycle) = cycle.as_ref() else { return };
        let ups = super::status::upstreams(r);
        let mut part: *const ngx::ffi::ngx_list_part_t = &cycle.shared_memory.part;
        while let Some(p) = part.as_ref() {
            let zones = p.elts as *mut ngx_shm_zone_t;
            for i in 0..p.nelts {
                let z = zones.add(i);
                let name = str_bytes(&(*z).shm.name);
                let Some(balancer) = name.strip_prefix(b"pdgate_") else { continue };
                let Ok(balancer) = std::str::from_utf8(balancer) else { continue };
                if !zone::is_balancer_zone(z) {
                    continue;
                }
                let Some(table) = zone::table(z) else { continue };
                for &us in ups {
                    let up = str_bytes(&(*us).host);
                    let peers = (*us).peer.data as *mut ngx_http_upstream_rr_peers_t;
                    if peers.is_null() {
                        continue;
                    }
                    let _read = crate::upstream::PeersRead::lock(peers);
                    let mut peer = (*peers).peer;
                    while let Some(pe) = peer.as_ref() {
                        let pname = str_bytes(&pe.name);
                        if let Some(slot) = table.find(peer_key(up, pname)) {
                            let (requests, tokens, _) = table.load(slot);
                            f(balancer, up, pname, requests, tokens);
                        }
                        peer = pe.next;
                    }
                }
            }
            part = p.next;
        }
    }
}
