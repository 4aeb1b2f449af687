//! Learning what a request holds on its engine from its answer: the
//! `usage.total_tokens` of vLLM's answers (in every SSE chunk with
//! `continuous_usage_stats`), read with pdgate-core's streaming
//! [`UsageScanner`](pdgate_core::metrics::UsageScanner), so a key or number
//! split across buffers is still seen.

use ngx::ffi::{ngx_chain_t, ngx_http_request_t};

use super::hooks::{PeerData, PEER_DATA_MAGIC};
use super::{zone, Balancer};

/// When a piece of the answer of a request this balancer placed reports
/// `usage.total_tokens` larger than what is counted, the difference is
/// added to the peer's tokens in flight (and released with the rest when
/// the request ends). Call from a body filter; `in_` is the chain passing.
///
/// # Safety
/// `r` must be a live request and `in_` a valid chain (or NULL).
pub unsafe fn learn_usage(r: *mut ngx_http_request_t, in_: *mut ngx_chain_t, balancer: &Balancer) {
    // SAFETY: every peer data nginx's balancers allocate is at least a
    // word long, so reading the first word is in bounds; ours starts with
    // a magic word and names its balancer (a static, compared by address).
    // Buffers are read, not changed.
    unsafe {
        let Some(u) = (*r).upstream.as_ref() else { return };
        if u.peer.data.is_null() || *(u.peer.data as *const u64) != PEER_DATA_MAGIC {
            return;
        }
        let pd = &mut *(u.peer.data as *mut PeerData);
        if !std::ptr::eq(pd.balancer, balancer) || pd.slot == usize::MAX {
            return;
        }
        let Some(table) = pd.conf.as_ref().and_then(|c| zone::table(c.zone)) else { return };
        let mut cl = in_;
        while let Some(link) = cl.as_ref() {
            if let Some(b) = link.buf.as_ref() {
                if b.in_file() == 0 && !b.pos.is_null() && b.last > b.pos {
                    let len = b.last.offset_from(b.pos) as usize;
                    pd.usage.feed(std::slice::from_raw_parts(b.pos, len));
                    if let Some(total) = pd.usage.total {
                        if total > pd.tokens {
                            table.add_tokens(pd.slot, total - pd.tokens);
                            pd.tokens = total;
                        }
                    }
                }
            }
            cl = link.next;
        }
    }
}
