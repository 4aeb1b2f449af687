//! The KV event subscriber (`pd_kv_events`): in the worker holding the
//! health lease, one ZeroMQ SUB socket per engine (and a DEALER to its
//! replay socket), read on nginx's event loop.
//!
//! libzmq gives each socket a file descriptor that turns readable when the
//! socket may have messages (edge-triggered); it is registered with nginx's
//! epoll through a connection of its own, and every readiness drains the
//! socket. The health tick (100 ms) also drains every socket, so nothing
//! depends on an edge alone (and event methods other than epoll work,
//! tick-paced). What a batch means for the index is pdgate-core's
//! [`kv::apply`](pdgate_core::kv::apply); sequence numbers, gaps, replay
//! and restarts are handled here with [`KvIndex::check_seq`].
//!
//! Only the lease holder subscribes: a worker that loses the lease (or
//! exits) closes its sockets, and the next holder starts from the sequence
//! numbers kept in the zone, asking each engine to replay what it missed.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::ptr::{addr_of, null_mut};

use ngx::ffi::{
    ngx_connection_t, ngx_event_t, ngx_free_connection, ngx_get_connection, ngx_handle_read_event,
    ngx_uint_t, NGX_LOG_NOTICE, NGX_LOG_WARN, NGX_USE_EPOLL_EVENT,
};
use pdgate_core::balance::slots::peer_key;
use pdgate_core::kv::apply::{apply_batch, Applied};
use pdgate_core::kv::conf::{KvConf, PortOf};
use pdgate_core::kv::events::{is_replay_end, seq};
use pdgate_core::kv::hash::BlockHasher;
use pdgate_core::kv::index::{KvIndex, SeqCheck};

/// Messages read from one socket per readiness at most (the tick reads
/// the rest).
const DRAIN: usize = 4096;

/// A replay not finished within this long is given up.
const REPLAY_TIMEOUT_MS: u64 = 2_000;

/// Live batches kept while a replay runs at most.
const REPLAY_BUFFER: usize = 10_000;

/// An upstream whose engines publish KV events.
pub(super) struct KvUpstream {
    pub uscf: *mut ngx::ffi::ngx_http_upstream_srv_conf_t,
    pub name: Vec<u8>,
    pub conf: KvConf,
}

/// A replay in progress: from which sequence number, since when, and the
/// live batches that arrived meanwhile.
struct Replay {
    from: u64,
    since_ms: u64,
    buffered: VecDeque<(u64, Vec<u8>)>,
}

/// One engine's subscription.
struct Sub {
    id: usize,
    upstream: Vec<u8>,
    peer: u64,
    bit: usize,
    index: KvIndex<'static>,
    hasher: BlockHasher,
    endpoint: String,
    sock: zmq::Socket,
    conn: *mut ngx_connection_t,
    replay_sock: Option<(zmq::Socket, *mut ngx_connection_t)>,
    replay: Option<Replay>,
    /// Told once that the engine's block size differs.
    told: bool,
}

/// The subscriber's sockets and their context. Fields drop in order: the
/// sockets before the context (whose drop waits for every socket closed).
struct State {
    subs: Vec<Sub>,
    next_id: usize,
    ctx: zmq::Context,
}

thread_local! {
    static KV: RefCell<Option<State>> = const { RefCell::new(None) };
}

fn log() -> *mut ngx::ffi::ngx_log_t {
    // SAFETY: the running cycle of this worker.
    unsafe { (**addr_of!(ngx::ffi::ngx_cycle)).log }
}

/// The health tick: as the lease holder, keeps one subscription per peer
/// of each upstream in `ups` and drains them; otherwise closes them all.
pub(super) fn tick(holder: bool, ups: &[KvUpstream]) {
    if !holder || ups.is_empty() {
        close_all();
        return;
    }
    let now = crate::observe::now_ms();
    let mut want: Vec<(usize, u64, String, Vec<u8>)> = Vec::new();
    for (ui, u) in ups.iter().enumerate() {
        let Some(index) = crate::kv::index_of(&u.name) else { continue };
        let mut keep = Vec::new();
        // SAFETY: uscf is a block of the running cycle.
        unsafe {
            crate::upstream::each_peer_name(u.uscf, |name| {
                let key = peer_key(&u.name, name);
                keep.push(key);
                if let Some(ep) = endpoint(name, u.conf.port) {
                    want.push((ui, key, ep, name.to_vec()));
                }
            });
        }
        index.release_engines_except(&keep);
    }
    KV.with(|k| {
        let mut k = k.borrow_mut();
        let st = match k.as_mut() {
            Some(st) => st,
            None => k.insert(State { subs: Vec::new(), next_id: 1, ctx: zmq::Context::new() }),
        };
        // Gone peers.
        st.subs.retain_mut(|s| {
            let stays = want.iter().any(|(_, key, ep, _)| *key == s.peer && *ep == s.endpoint);
            if !stays {
                close(s);
            }
            stays
        });
        // New peers.
        for (ui, key, ep, peer) in &want {
            if st.subs.iter().any(|s| s.peer == *key) {
                continue;
            }
            let u = &ups[*ui];
            if let Some(s) = open(st, u, *key, ep, peer) {
                st.subs.push(s);
            }
        }
        for s in st.subs.iter_mut() {
            drain(s, now);
        }
    });
}

/// `tcp://<host of the peer's address>:<port>` (`None`: no such port).
fn endpoint(peer: &[u8], port: PortOf) -> Option<String> {
    let peer = String::from_utf8_lossy(peer);
    let (host, http) = peer.rsplit_once(':')?;
    Some(format!("tcp://{host}:{}", port.of(http.parse().ok()?)?))
}

fn open(st: &mut State, u: &KvUpstream, key: u64, ep: &str, peer: &[u8]) -> Option<Sub> {
    let index = crate::kv::index_of(&u.name)?;
    let Some(bit) = index.claim_engine(key) else {
        warn_once(&format!(
            "pd_kv_events: upstream \"{}\" has more than 64 engines, the others are not indexed",
            String::from_utf8_lossy(&u.name)
        ));
        return None;
    };
    let made = (|| -> Result<Sub, zmq::Error> {
        let sock = st.ctx.socket(zmq::SUB)?;
        sock.set_linger(0)?;
        sock.set_rcvhwm(100_000)?;
        sock.set_reconnect_ivl(200)?;
        sock.set_reconnect_ivl_max(5_000)?;
        sock.set_ipv6(true)?;
        sock.set_subscribe(&u.conf.topic)?;
        sock.connect(ep)?;
        let replay_sock = match u.conf.replay_port.and_then(|p| endpoint(peer, p)) {
            Some(rep) => {
                let r = st.ctx.socket(zmq::DEALER)?;
                r.set_linger(0)?;
                r.set_ipv6(true)?;
                r.connect(&rep)?;
                Some(r)
            }
            None => None,
        };
        let id = st.next_id;
        st.next_id += 1;
        let conn = watch(&sock, id);
        let replay_sock = replay_sock.map(|r| {
            let c = watch(&r, id);
            (r, c)
        });
        Ok(Sub {
            id,
            upstream: u.name.clone(),
            peer: key,
            bit,
            index,
            hasher: BlockHasher::new(
                u.conf.hashing.algo,
                u.conf.hashing.block_size,
                &u.conf.hashing.seed,
            ),
            endpoint: ep.to_owned(),
            sock,
            conn,
            replay_sock,
            replay: None,
            told: false,
        })
    })();
    match made {
        Ok(s) => {
            index.header.engines[bit].connected.store(1, std::sync::atomic::Ordering::Relaxed);
            ngx::ngx_log_error!(
                NGX_LOG_NOTICE,
                log(),
                "pd_kv_events: subscribed to {} (upstream \"{}\")",
                ep,
                String::from_utf8_lossy(&u.name)
            );
            Some(s)
        }
        Err(e) => {
            warn_once(&format!("pd_kv_events: cannot subscribe to {ep}: {e}"));
            None
        }
    }
}

fn warn_once(msg: &str) {
    thread_local! {
        static TOLD: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }
    let first = TOLD.with(|t| {
        let mut t = t.borrow_mut();
        if t.iter().any(|m| m == msg) {
            false
        } else {
            t.push(msg.to_owned());
            true
        }
    });
    if first {
        ngx::ngx_log_error!(NGX_LOG_WARN, log(), "{}", msg);
    }
}

/// Registers the socket's notification descriptor with nginx's epoll (a
/// connection of its own whose data is the subscription's id); NULL with
/// other event methods or when no connection is free (the tick drains).
fn watch(sock: &zmq::Socket, id: usize) -> *mut ngx_connection_t {
    let Ok(fd) = sock.get_fd() else { return null_mut() };
    // SAFETY: plain globals of the worker's event module; the connection is
    // nginx's, freed by unwatch() before the socket (and its descriptor) is
    // closed.
    unsafe {
        if (ngx::ffi::ngx_event_flags & NGX_USE_EPOLL_EVENT as ngx_uint_t) == 0 {
            return null_mut();
        }
        let c = ngx_get_connection(fd, log());
        let Some(conn) = c.as_mut() else { return null_mut() };
        conn.data = id as *mut c_void;
        let (rev, wev) = (conn.read, conn.write);
        (*rev).handler = Some(on_ready);
        (*rev).log = log();
        (*wev).log = log();
        (*rev).set_ready(0);
        if ngx_handle_read_event(rev, 0) != 0 {
            ngx_free_connection(c);
            return null_mut();
        }
        c
    }
}

/// Takes the descriptor out of epoll and gives the connection back.
fn unwatch(c: *mut ngx_connection_t) {
    // SAFETY: `c` is a connection watch() made, still registered; the
    // descriptor stays open (libzmq's) until the socket is dropped after
    // this.
    unsafe {
        let Some(conn) = c.as_mut() else { return };
        let rev = conn.read;
        if (*rev).active() != 0 {
            if let Some(del) = ngx::ffi::ngx_event_actions.del {
                // epoll's NGX_READ_EVENT (EPOLLIN|EPOLLRDHUP); no
                // NGX_CLOSE_EVENT: the descriptor stays open, so it must
                // leave the epoll set now.
                del(rev, (libc::EPOLLIN | libc::EPOLLRDHUP) as ngx::ffi::ngx_int_t, 0);
            }
        }
        if (*rev).posted() != 0 {
            ngx::ffi::ngx_delete_posted_event(rev);
        }
        conn.fd = -1;
        ngx_free_connection(c);
    }
}

unsafe extern "C" fn on_ready(ev: *mut ngx_event_t) {
    crate::guard::catch("pd_kv_events read", (), || {
        // SAFETY: the event of a connection watch() made; its data is the
        // subscription's id.
        let id = unsafe { (*((*ev).data as *mut ngx_connection_t)).data as usize };
        let now = crate::observe::now_ms();
        KV.with(|k| {
            if let Some(st) = k.borrow_mut().as_mut() {
                if let Some(s) = st.subs.iter_mut().find(|s| s.id == id) {
                    drain(s, now);
                }
            }
        });
    })
}

fn close(s: &mut Sub) {
    unwatch(std::mem::replace(&mut s.conn, null_mut()));
    if let Some((_, c)) = s.replay_sock.as_mut() {
        unwatch(std::mem::replace(c, null_mut()));
    }
    s.index.header.engines[s.bit].connected.store(0, std::sync::atomic::Ordering::Relaxed);
}

/// Closes every subscription (lease lost, worker exiting).
pub(super) fn close_all() {
    KV.with(|k| {
        if let Some(mut st) = k.borrow_mut().take() {
            for s in st.subs.iter_mut() {
                close(s);
            }
        }
    });
}

/// Reads what the engine sent: replayed batches, then live ones.
fn drain(s: &mut Sub, now: u64) {
    let mut replies = Vec::new();
    if let Some((r, _)) = &s.replay_sock {
        for _ in 0..DRAIN {
            match r.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => replies.push(frames),
                Err(_) => break,
            }
        }
        let _ = r.get_events();
    }
    for frames in replies {
        on_replay(s, &frames, now);
    }
    if let Some(rp) = &s.replay {
        if now.saturating_sub(rp.since_ms) > REPLAY_TIMEOUT_MS {
            finish_replay(s, now, false);
        }
    }
    for _ in 0..DRAIN {
        match s.sock.recv_multipart(zmq::DONTWAIT) {
            Ok(frames) => on_live(s, &frames, now),
            Err(_) => break,
        }
    }
    let _ = s.sock.get_events();
}

/// A live message: `[topic, seq, payload]`.
fn on_live(s: &mut Sub, frames: &[Vec<u8>], now: u64) {
    let (Some(sq), Some(payload)) = (frames.get(1).and_then(|f| seq(f)), frames.get(2)) else {
        s.index.header.engines[s.bit].bad.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return;
    };
    if let Some(rp) = s.replay.as_mut() {
        let e = &s.index.header.engines[s.bit];
        if rp.buffered.len() < REPLAY_BUFFER {
            rp.buffered.push_back((sq, payload.clone()));
        } else {
            // Kept nowhere: lost, as a gap the replay could not fill.
            e.lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        e.next_seq.store(sq + 1, std::sync::atomic::Ordering::Release);
        return;
    }
    match s.index.check_seq(s.bit, sq) {
        SeqCheck::InOrder => apply(s, payload, now),
        SeqCheck::First if sq == 0 || s.replay_sock.is_none() => apply(s, payload, now),
        SeqCheck::First => start_replay(s, 0, sq, payload, now),
        SeqCheck::Gap { from } if s.replay_sock.is_some() => {
            start_replay(s, from, sq, payload, now)
        }
        SeqCheck::Gap { from } => {
            s.index.header.engines[s.bit]
                .lost
                .fetch_add(sq - from, std::sync::atomic::Ordering::Relaxed);
            apply(s, payload, now);
        }
        SeqCheck::Restart => {
            s.index.header.engines[s.bit]
                .restarts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            s.index.clear_engine(s.bit);
            apply(s, payload, now);
        }
    }
}

/// Asks the engine to replay from `from`, keeping live batch `sq` (and
/// those that follow) until the replay ends.
fn start_replay(s: &mut Sub, from: u64, sq: u64, payload: &[u8], now: u64) {
    let Some((r, _)) = &s.replay_sock else { return };
    let sent = r.send_multipart([&b""[..], &from.to_be_bytes()[..]], zmq::DONTWAIT).is_ok();
    let _ = r.get_events();
    let mut buffered = VecDeque::new();
    buffered.push_back((sq, payload.to_vec()));
    s.replay = Some(Replay { from, since_ms: now, buffered });
    if !sent {
        finish_replay(s, now, false);
    }
}

/// A replay reply: `["", seq, payload]`, the end marked by seq −1 and an
/// empty payload.
fn on_replay(s: &mut Sub, frames: &[Vec<u8>], now: u64) {
    let f: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).skip_while(|f| f.is_empty()).collect();
    let (Some(sf), Some(payload)) = (f.first(), f.get(1).copied().or(Some(&[][..]))) else {
        return;
    };
    if is_replay_end(sf, payload) {
        finish_replay(s, now, true);
        return;
    }
    let Some(sq) = seq(sf) else { return };
    let Some(rp) = s.replay.as_mut() else { return };
    let first_live = rp.buffered.front().map_or(u64::MAX, |b| b.0);
    if sq >= rp.from && sq < first_live {
        rp.from = sq + 1;
        s.index.header.engines[s.bit].replayed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        apply(s, payload, now);
    }
}

/// Ends the replay: counts what it could not bring back, then applies the
/// live batches kept meanwhile.
fn finish_replay(s: &mut Sub, now: u64, _complete: bool) {
    let Some(rp) = s.replay.take() else { return };
    let first_live = rp.buffered.front().map_or(rp.from, |b| b.0);
    if first_live > rp.from {
        s.index.header.engines[s.bit]
            .lost
            .fetch_add(first_live - rp.from, std::sync::atomic::Ordering::Relaxed);
    }
    for (_, payload) in rp.buffered {
        apply(s, &payload, now);
    }
}

fn apply(s: &mut Sub, payload: &[u8], now: u64) {
    let e = &s.index.header.engines[s.bit];
    e.last_ms.store(now, std::sync::atomic::Ordering::Relaxed);
    match apply_batch(&s.index, s.bit, &s.hasher, payload) {
        Ok(Applied { foreign_block_size: Some(bs), .. }) if !s.told => {
            s.told = true;
            warn_once(&format!(
                "pd_kv_events: {} (upstream \"{}\") stores blocks of {} tokens, pdgate hashes blocks of {}: set block_size={} (its blocks are not indexed)",
                s.endpoint,
                String::from_utf8_lossy(&s.upstream),
                bs,
                s.hasher.block_size(),
                bs
            ));
        }
        Ok(_) => {}
        Err(msg) => {
            e.bad.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn_once(&format!("pd_kv_events: {}: a batch does not decode: {msg}", s.endpoint));
        }
    }
    e.batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}
