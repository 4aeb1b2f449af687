//! vLLM's KV cache event publisher (`vllm/distributed/kv_events.py`,
//! `ZmqEventPublisher`, restated, not copied): the engine loop hands each step's events to [`Publisher::publish`], which
//! never blocks; a thread encodes them ([`pdgate_core::kv::events`]) and
//! sends them on a ZMQ PUB socket, and another serves the replay ROUTER.
//!
//! - A message is three frames: the topic (`--kv-events-topic`), the
//!   sequence number (8 bytes big-endian, from 0, +1 per batch) and one
//!   msgpack batch (`--kv-events-shape`, `--kv-events-int-hashes`).
//! - Replay (`--kv-replay-port`): a REQ or DEALER sends one frame, the
//!   first sequence number wanted (big-endian); the ROUTER, receiving
//!   `[identity, "", start]`, answers `[identity, "", seq, payload]` for each
//!   kept batch from `start` on, then the end marker `[identity, "", -1
//!   (8 × 0xFF), ""]`. The last [`BUFFER_STEPS`] batches are kept; anything
//!   else is ignored, as vLLM does.
//! - When the queue ahead of the publisher thread is full the batch is
//!   dropped and counted, and its sequence number is skipped: subscribers
//!   see the gap (vLLM's queue would block the engine instead).

use std::collections::VecDeque;
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use pdgate_core::kv::events::{self, Batch, Event, HashForm, Shape, MAX_EVENTS, REPLAY_END};

/// Batches kept for replay (vLLM's `buffer_steps`).
pub const BUFFER_STEPS: usize = 10_000;
/// Batches waiting for the publisher thread (vLLM's `max_queue_size` is
/// 100,000 and blocks when full; this one drops).
pub const QUEUE: usize = 10_000;
/// PUB high-water mark (vLLM's `hwm`).
pub const HWM: i32 = 100_000;

/// `--kv-events-*`: where and how the events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// PUB port (0: any free one).
    pub port: u16,
    /// ROUTER port for replays (0: any free one), if any.
    pub replay_port: Option<u16>,
    /// First frame of every message.
    pub topic: String,
    pub shape: Shape,
    /// Block hashes as ints (their low 64 bits) rather than digest bytes.
    pub int_hashes: bool,
}

impl Options {
    pub fn new(port: u16) -> Options {
        Options {
            port,
            replay_port: None,
            topic: String::new(),
            shape: Shape::Array,
            int_hashes: false,
        }
    }
}

/// What the publisher did, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Batches sent on the PUB socket.
    pub batches: u64,
    /// Events in them.
    pub events: u64,
    /// Batches dropped because the queue was full.
    pub dropped: u64,
    /// Replay requests answered.
    pub replays: u64,
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    events: AtomicU64,
    dropped: AtomicU64,
    replays: AtomicU64,
}

/// Kept batches: sequence number and payload.
type Buffer = Mutex<VecDeque<(u64, Arc<[u8]>)>>;

/// A running publisher; dropping it stops its threads.
pub struct Publisher {
    /// A batch and the batches dropped before it.
    tx: Option<SyncSender<(u64, Batch)>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The bound PUB and ROUTER ports.
    pub port: u16,
    pub replay_port: Option<u16>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("port", &self.port)
            .field("replay_port", &self.replay_port)
            .finish_non_exhaustive()
    }
}

/// `tcp://ADDR:PORT` for a host name or address (`*` for port 0).
fn endpoint(host: &str, port: u16) -> std::io::Result<(String, bool)> {
    let ip: IpAddr = match host.parse() {
        Ok(ip) => ip,
        Err(_) => (host, 0)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{host}: no address")))?
            .ip(),
    };
    let p = if port == 0 { "*".to_owned() } else { port.to_string() };
    Ok(match ip {
        IpAddr::V4(a) => (format!("tcp://{a}:{p}"), false),
        IpAddr::V6(a) => (format!("tcp://[{a}]:{p}"), true),
    })
}

fn zerr(what: &str, e: zmq::Error) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

/// Binds a socket of `kind` on `host:port`; returns it and the bound port.
fn bind(
    ctx: &zmq::Context,
    kind: zmq::SocketType,
    host: &str,
    port: u16,
) -> std::io::Result<(zmq::Socket, u16)> {
    let (ep, v6) = endpoint(host, port)?;
    let s = ctx.socket(kind).map_err(|e| zerr("zmq socket", e))?;
    s.set_linger(0).map_err(|e| zerr("zmq linger", e))?;
    s.set_ipv6(v6).map_err(|e| zerr("zmq ipv6", e))?;
    s.bind(&ep).map_err(|e| zerr(&ep, e))?;
    let last = s.get_last_endpoint().map_err(|e| zerr(&ep, e))?.unwrap_or_default();
    let bound = last.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(port);
    Ok((s, bound))
}

impl Publisher {
    /// Binds the PUB (and ROUTER) sockets on `host` and starts the threads.
    pub fn start(host: &str, opts: &Options) -> std::io::Result<Publisher> {
        let ctx = zmq::Context::new();
        let (publ, port) = bind(&ctx, zmq::PUB, host, opts.port)?;
        publ.set_sndhwm(HWM).map_err(|e| zerr("zmq sndhwm", e))?;
        let replay = match opts.replay_port {
            Some(p) => {
                let (s, port) = bind(&ctx, zmq::ROUTER, host, p)?;
                // Room for whole replays to a client that reads slowly.
                let hwm = i32::try_from(2 * (BUFFER_STEPS + 1)).unwrap_or(i32::MAX);
                s.set_sndhwm(hwm).map_err(|e| zerr("zmq sndhwm", e))?;
                Some((s, port))
            }
            None => None,
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let buffer: Arc<Buffer> = Arc::new(Mutex::new(VecDeque::new()));
        let mut threads = Vec::new();
        let replay_port = replay.as_ref().map(|r| r.1);
        {
            let (c, b, o) = (Arc::clone(&counters), Arc::clone(&buffer), opts.clone());
            let keep = replay.is_some();
            threads.push(
                thread::Builder::new()
                    .name("kv-events".into())
                    .spawn(move || publish_loop(&publ, &rx, &o, &c, keep.then_some(&*b)))?,
            );
        }
        if let Some((router, _)) = replay {
            let (c, s) = (Arc::clone(&counters), Arc::clone(&stop));
            threads.push(
                thread::Builder::new()
                    .name("kv-replay".into())
                    .spawn(move || replay_loop(&router, &buffer, &c, &s))?,
            );
        }
        Ok(Publisher { tx: Some(tx), counters, stop, threads, port, replay_port })
    }

    /// Queues one step's events as one batch (split at
    /// [`events::MAX_EVENTS`]); never blocks. Nothing for no events.
    pub fn publish(&self, events: Vec<Event>) {
        let Some(tx) = &self.tx else { return };
        let ts =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let mut rest = events;
        while !rest.is_empty() {
            let tail =
                if rest.len() > MAX_EVENTS { rest.split_off(MAX_EVENTS) } else { Vec::new() };
            let batch = Batch { ts, events: rest, dp_rank: Some(0), unknown: 0 };
            let dropped = self.counters.dropped.load(Relaxed);
            if tx.try_send((dropped, batch)).is_err() {
                self.counters.dropped.fetch_add(1, Relaxed);
            }
            rest = tail;
        }
    }

    pub fn counts(&self) -> Counts {
        let c = &self.counters;
        Counts {
            batches: c.batches.load(Relaxed),
            events: c.events.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            replays: c.replays.load(Relaxed),
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends each queued batch; a batch's sequence number is its place in the
/// stream the engine produced, dropped batches included.
fn publish_loop(
    sock: &zmq::Socket,
    rx: &Receiver<(u64, Batch)>,
    o: &Options,
    c: &Counters,
    buffer: Option<&Buffer>,
) {
    let form = if o.int_hashes { HashForm::Int } else { HashForm::Bytes };
    let mut sent = 0u64;
    while let Ok((dropped_before, batch)) = rx.recv() {
        let seq = sent + dropped_before;
        let payload: Arc<[u8]> = events::encode_batch_with(&batch, o.shape, form).into();
        let ok = sock
            .send(o.topic.as_bytes(), zmq::SNDMORE)
            .and_then(|()| sock.send(&seq.to_be_bytes()[..], zmq::SNDMORE))
            .and_then(|()| sock.send(&payload[..], 0));
        sent += 1;
        if ok.is_ok() {
            c.batches.fetch_add(1, Relaxed);
            c.events.fetch_add(batch.events.len() as u64, Relaxed);
        }
        if let Some(b) = buffer {
            let mut b = b.lock();
            if b.len() == BUFFER_STEPS {
                b.pop_front();
            }
            b.push_back((seq, payload));
        }
    }
}

/// Answers replay requests until `stop`.
fn replay_loop(sock: &zmq::Socket, buffer: &Buffer, c: &Counters, stop: &AtomicBool) {
    while !stop.load(Relaxed) {
        match sock.poll(zmq::POLLIN, 200) {
            Ok(n) if n > 0 => {}
            _ => continue,
        }
        let Ok(frames) = sock.recv_multipart(zmq::DONTWAIT) else { continue };
        let [id, _, start] = frames.as_slice() else { continue };
        if start.is_empty() || start.len() > 8 {
            continue;
        }
        let start = start.iter().fold(0u64, |s, &b| (s << 8) | u64::from(b));
        let kept: Vec<(u64, Arc<[u8]>)> =
            buffer.lock().iter().filter(|(s, _)| *s >= start).cloned().collect();
        let reply = |seq: u64, payload: &[u8]| {
            sock.send(&id[..], zmq::SNDMORE)
                .and_then(|()| sock.send(&b""[..], zmq::SNDMORE))
                .and_then(|()| sock.send(&seq.to_be_bytes()[..], zmq::SNDMORE))
                .and_then(|()| sock.send(payload, 0))
        };
        for (seq, payload) in &kept {
            if reply(*seq, payload).is_err() {
                break;
            }
        }
        let _ = reply(REPLAY_END, b"");
        c.replays.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
#[path = "kvevents_tests.rs"]
mod tests;
