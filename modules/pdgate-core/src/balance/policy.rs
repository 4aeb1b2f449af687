//! What a balancer is made of, without nginx: the request a policy sees
//! ([`Request`]), the shared structures of its zone ([`Shared`]), and the
//! state hooks of a policy that keeps more than the in-flight counters
//! ([`PolicyState`]).
//!
//! The glue runs every balancer the same way: build the peers' views,
//! [`PolicyState::observe`], choose, reserve the choice in the counters,
//! [`PolicyState::record`] then [`PolicyState::decay`]; when the try ends,
//! release the counters and [`PolicyState::release`]. A policy without
//! state of its own uses [`NoState`]; the three with state are
//! [`History`] (length_balance), [`PrefixAffinity`]
//! (prefix_cache_affinity) and [`PendingPrefills`] (pd_score_balance).

use super::params::{Params, Role};
use super::pending::PendingTable;
use super::prefix::PrefixIndex;
use super::slots::SlotTable;
use super::{weighted_tokens, PeerView, PD_SCORE_LOOKAHEAD};

/// What a policy knows of the request being placed.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Estimated tokens of the body this leg sends.
    pub tokens: u64,
    /// The request's cost (the balancer's cost function, or 0).
    pub cost: u64,
    /// The upstream's parameters.
    pub params: &'a Params,
    /// A random number for ties.
    pub tie: u64,
    /// Lengths of the oldest requests now in prefill (pd_score decode).
    pub pending: &'a [u64],
    /// Per peer: leading prompt blocks last placed there (prefix
    /// affinity), or held there as the engine's KV events say (then
    /// `block_tokens` is set).
    pub affinity: &'a [u32],
    /// Tokens per block of `affinity` when it counts blocks the engines
    /// hold (`pd_kv_events`); 0 when it counts placements.
    pub block_tokens: u64,
}

/// A policy: peers and the request → the chosen index.
pub type Choose = fn(&[PeerView], &Request) -> Option<usize>;

/// The shared structures of a balancer's zone.
#[derive(Debug)]
pub struct Shared<'a> {
    /// In-flight counters and history, one slot per (upstream, peer).
    pub slots: SlotTable<'a>,
    /// Requests in prefill (pd_score_balance).
    pub pending: PendingTable<'a>,
    /// Prompt prefixes → peer (prefix_cache_affinity).
    pub index: PrefixIndex<'a>,
}

/// Where a request is about to be placed: the upstream's peers.
#[derive(Debug, Clone, Copy)]
pub struct Upstream<'a> {
    pub params: &'a Params,
    /// Each primary peer's slot, in peer order (`usize::MAX`: none).
    pub peer_slots: &'a [usize],
    /// The upstream's clock slot ([`Needs::clock`]), or `usize::MAX`.
    pub clock: usize,
    /// The prompt's block keys ([`Needs::prompt_blocks`]), or empty.
    pub keys: &'a [u64],
}

/// What [`PolicyState::observe`] gathers besides the views.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// Lengths of requests in prefill; `npending` of them are set.
    pub pending: [u64; PD_SCORE_LOOKAHEAD],
    pub npending: usize,
    /// Per peer, as [`Request::affinity`].
    pub affinity: &'a mut [u32],
}

/// A placement just made.
#[derive(Debug, Clone, Copy)]
pub struct Placement<'a> {
    pub upstream: Upstream<'a>,
    /// The chosen peer's slot.
    pub slot: usize,
    /// The request's estimated tokens.
    pub tokens: u64,
    /// Milliseconds of nginx's clock.
    pub now_ms: u64,
    /// A random non-zero number naming the request.
    pub id: u64,
}

/// What a request holds in a policy's state between placement and
/// release (kept by the glue in the request's peer data).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Entry and id in the pending table.
    pub pending: Option<(usize, u64)>,
}

/// What the glue must prepare for a policy's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// A per-upstream clock slot (counts placements).
    pub clock: bool,
    /// The history columns in views and on the status page.
    pub history: bool,
    /// Prompt block keys of each request (and room in the prefix index).
    pub prompt_blocks: bool,
}

/// The hooks of a policy that keeps state in its zone beyond the in-flight
/// counters. Every hook has a no-op default.
pub trait PolicyState: Sync + std::fmt::Debug {
    /// What the glue prepares for it.
    fn needs(&self) -> Needs {
        Needs::default()
    }

    /// Before a choice: adds what the policy reads to the views and inputs.
    fn observe(&self, _s: &Shared, _u: &Upstream, _views: &mut [PeerView], _in: &mut Inputs) {}

    /// After a placement: records it.
    fn record(&self, _s: &Shared, _p: &Placement, _held: &mut Held) {}

    /// After [`record`](Self::record): ages what was recorded.
    fn decay(&self, _s: &Shared, _p: &Placement) {}

    /// When the try ends: gives back what the request held.
    fn release(&self, _s: &Shared, _held: &mut Held) {}

    /// Prefix-index entries an upstream of `peers` peers needs.
    fn index_entries(&self, _params: &Params, _peers: usize) -> usize {
        0
    }

    /// Bytes of prompt per block key ([`Needs::prompt_blocks`]).
    fn block_size(&self, _params: &Params) -> usize {
        1
    }
}

/// A policy with no state besides the in-flight counters.
#[derive(Debug)]
pub struct NoState;
impl PolicyState for NoState {}

/// length_balance's decayed history: each placement adds the request
/// (`req_len_weight` times its tokens) to its peer; every
/// `merge_threshold` placements on the upstream, every peer's history is
/// divided by `decay_factor`.
#[derive(Debug)]
pub struct History;

impl PolicyState for History {
    fn needs(&self) -> Needs {
        Needs { clock: true, history: true, prompt_blocks: false }
    }

    fn observe(&self, s: &Shared, u: &Upstream, views: &mut [PeerView], _in: &mut Inputs) {
        for (v, &slot) in views.iter_mut().zip(u.peer_slots) {
            (v.hist_requests, v.hist_tokens) = s.slots.history(slot);
        }
    }

    fn record(&self, s: &Shared, p: &Placement, _held: &mut Held) {
        let w = p.upstream.params.float("req_len_weight");
        s.slots.record(p.slot, weighted_tokens(p.tokens, w));
    }

    fn decay(&self, s: &Shared, p: &Placement) {
        let u = &p.upstream;
        if u.clock == usize::MAX {
            return;
        }
        let every = u.params.int("merge_threshold").max(1);
        if s.slots.tick(u.clock).is_multiple_of(every) {
            let by = u.params.int("decay_factor");
            for &slot in u.peer_slots {
                s.slots.decay(slot, by);
            }
        }
    }
}

/// prefix_cache_affinity's index: each placement records the prompt's
/// block keys on its peer; a choice reads the longest match.
#[derive(Debug)]
pub struct PrefixAffinity;

impl PolicyState for PrefixAffinity {
    fn needs(&self) -> Needs {
        Needs { clock: false, history: false, prompt_blocks: true }
    }

    fn observe(&self, s: &Shared, u: &Upstream, _views: &mut [PeerView], inputs: &mut Inputs) {
        if let Some((blocks, slot)) = s.index.longest(u.keys) {
            if let Some(i) = u.peer_slots.iter().position(|&x| x == slot) {
                if let Some(a) = inputs.affinity.get_mut(i) {
                    *a = blocks as u32;
                }
            }
        }
    }

    fn record(&self, s: &Shared, p: &Placement, _held: &mut Held) {
        if !p.upstream.keys.is_empty() && p.slot != usize::MAX {
            s.index.insert(p.upstream.keys, p.slot);
        }
    }

    fn index_entries(&self, params: &Params, peers: usize) -> usize {
        (params.int("dict_size") as usize).saturating_mul(peers)
    }

    fn block_size(&self, params: &Params) -> usize {
        (params.int("block_size") as usize).max(1)
    }
}

/// Most pending entries a decode placement reads (in table order).
pub const PENDING_SEEN: usize = 256;

/// pd_score_balance's table of requests in prefill: a prefill upstream
/// adds each placed request until its try ends; a decode upstream reads
/// the oldest ones.
#[derive(Debug)]
pub struct PendingPrefills;

impl PolicyState for PendingPrefills {
    fn observe(&self, s: &Shared, u: &Upstream, _views: &mut [PeerView], inputs: &mut Inputs) {
        if u.params.role == Role::Decode {
            let mut scratch = [(0u64, 0u64); PENDING_SEEN];
            inputs.npending = s.pending.oldest(&mut inputs.pending, &mut scratch);
        }
    }

    fn record(&self, s: &Shared, p: &Placement, held: &mut Held) {
        if p.upstream.params.role == Role::Prefill && held.pending.is_none() {
            if let Some(i) = s.pending.add(p.id, p.tokens, p.now_ms, p.id) {
                held.pending = Some((i, p.id));
            }
        }
    }

    fn release(&self, s: &Shared, held: &mut Held) {
        if let Some((i, id)) = held.pending.take() {
            s.pending.remove(i, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::params::ParamSpec;
    use super::super::pending::Pending;
    use super::super::prefix::Entry;
    use super::super::slots::Slot;
    use super::*;
    use std::sync::atomic::AtomicU64;

    struct Zone {
        slots: Vec<Slot>,
        pending: Vec<Pending>,
        index: Vec<Entry>,
        clock: AtomicU64,
    }

    impl Zone {
        fn new() -> Self {
            Zone {
                slots: (0..8).map(|_| Slot::default()).collect(),
                pending: (0..8).map(|_| Pending::default()).collect(),
                index: (0..64).map(|_| Entry::default()).collect(),
                clock: AtomicU64::new(0),
            }
        }
        fn shared(&self) -> Shared<'_> {
            Shared {
                slots: SlotTable::new(&self.slots),
                pending: PendingTable::new(&self.pending),
                index: PrefixIndex::new(&self.index, &self.clock),
            }
        }
    }

    fn placement<'a>(u: Upstream<'a>, slot: usize, tokens: u64) -> Placement<'a> {
        Placement { upstream: u, slot, tokens, now_ms: 1, id: 7 }
    }

    #[test]
    fn history_records_and_decays_on_its_clock() {
        static SPECS: [ParamSpec; 3] = [
            ParamSpec::int("merge_threshold", 2),
            ParamSpec::int("decay_factor", 2),
            ParamSpec::float("req_len_weight", 1.0),
        ];
        let z = Zone::new();
        let s = z.shared();
        let params = Params::new(&SPECS);
        let u = Upstream { params: &params, peer_slots: &[0, 1], clock: 2, keys: &[] };
        let mut held = Held::default();
        let p = placement(u, 0, 100);
        History.record(&s, &p, &mut held);
        History.decay(&s, &p);
        assert_eq!(s.slots.history(0), (1, 100));
        History.record(&s, &p, &mut held);
        History.decay(&s, &p); // second tick: halves
        assert_eq!(s.slots.history(0), (1, 100));
        let mut views = [PeerView::default(); 2];
        let mut aff = [0u32; 2];
        let mut inputs =
            Inputs { pending: [0; PD_SCORE_LOOKAHEAD], npending: 0, affinity: &mut aff };
        History.observe(&s, &u, &mut views, &mut inputs);
        assert_eq!((views[0].hist_requests, views[0].hist_tokens), (1, 100));
    }

    #[test]
    fn pending_prefills_are_held_until_released() {
        let z = Zone::new();
        let s = z.shared();
        let mut prefill = Params::new(&[]);
        prefill.role = Role::Prefill;
        let u = Upstream { params: &prefill, peer_slots: &[0], clock: usize::MAX, keys: &[] };
        let mut held = Held::default();
        PendingPrefills.record(&s, &placement(u, 0, 300), &mut held);
        assert!(held.pending.is_some());
        let mut decode = Params::new(&[]);
        decode.role = Role::Decode;
        let d = Upstream { params: &decode, ..u };
        let mut aff = [0u32; 1];
        let mut inputs =
            Inputs { pending: [0; PD_SCORE_LOOKAHEAD], npending: 0, affinity: &mut aff };
        PendingPrefills.observe(&s, &d, &mut [PeerView::default()], &mut inputs);
        assert_eq!(&inputs.pending[..inputs.npending], &[300]);
        PendingPrefills.release(&s, &mut held);
        assert_eq!((held, s.pending.len()), (Held::default(), 0));
    }

    #[test]
    fn prefix_affinity_finds_the_peer_of_a_recorded_prompt() {
        static SPECS: [ParamSpec; 2] =
            [ParamSpec::int("dict_size", 10), ParamSpec::int("block_size", 4)];
        let z = Zone::new();
        let s = z.shared();
        let params = Params::new(&SPECS);
        let keys = [11u64, 22, 33];
        let u = Upstream { params: &params, peer_slots: &[5, 6], clock: usize::MAX, keys: &keys };
        PrefixAffinity.record(&s, &placement(u, 6, 1), &mut Held::default());
        let mut aff = [0u32; 2];
        let mut inputs =
            Inputs { pending: [0; PD_SCORE_LOOKAHEAD], npending: 0, affinity: &mut aff };
        PrefixAffinity.observe(&s, &u, &mut [PeerView::default(); 2], &mut inputs);
        assert_eq!(aff, [0, 3]);
        assert_eq!(PrefixAffinity.index_entries(&params, 3), 30);
        assert_eq!(PrefixAffinity.block_size(&params), 4);
    }
}
