//! The engine-sim server: an OpenAI-compatible HTTP front, one engine thread
//! running the timing model, and a side channel through which decode engines
//! fetch KV from prefill engines (vLLM NIXL style: `FETCH`) or wait for a
//! bootstrap room (SGLang style: `WAIT`).
//!
//! Threads: one per client connection, one per side-channel connection, one
//! engine loop. Requests register a channel, queue a sequence and receive
//! its events as the engine produces them. With `kv_events`, the engine
//! loop also hands each step's KV cache events to the publisher
//! ([`crate::kvevents`]).

mod kv;
mod side;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use pdgate_core::request_id::Rng;
use serde_json::{json, Value};

use crate::api::{self, Api, ApiRequest, Usage};
use crate::http::{self, ReadError, Request};
use crate::kvevents::{self, Publisher};
use crate::metrics::{EngineSnapshot, Metrics};
use crate::model::{Engine, Event, SeqSpec};
use crate::profile::Profile;
use crate::prompt::{Hashing, Tokenizer};
use pdgate_core::kv::hash::HashAlgo;

/// What the engine plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
    Both,
    Encode,
}

/// Whose P/D protocol it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Vllm,
    Sglang,
}

/// Injected faults.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Probability of answering a completion with `error_status`.
    pub error_rate: f64,
    pub error_status: u16,
    /// Added before every completion, ms (model time is not affected).
    pub latency_ms: u64,
    /// Probability of never answering a completion.
    pub hang_rate: f64,
    /// Close a streamed answer after this many events.
    pub close_after: Option<u64>,
    /// Reset every connection as soon as it is accepted.
    pub refuse: bool,
    /// Added to every side-channel answer, ms.
    pub slow_kv_ms: u64,
}

/// Everything the command line sets.
#[derive(Debug, Clone)]
pub struct Config {
    pub role: Role,
    pub flavor: Flavor,
    pub host: String,
    pub port: u16,
    /// Side channel (KV fetch / bootstrap) port.
    pub kv_port: u16,
    /// Host advertised in `kv_transfer_params.remote_host`.
    pub advertise_host: String,
    pub model: String,
    pub engine_id: String,
    pub profile: Profile,
    /// Model time runs this many times faster than real time.
    pub time_scale: f64,
    pub seed: u64,
    pub faults: Faults,
    /// KV held for a decode that never fetches it is dropped after this.
    pub kv_hold_ms: u64,
    /// How long a decode waits for its bootstrap room.
    pub bootstrap_timeout_ms: u64,
    /// The model "loads" this long after start: a vLLM engine refuses
    /// connections (its HTTP server listens only once the engine is up),
    /// an SGLang one answers its health probes and completions 503.
    pub loading_ms: u64,
    pub quiet: bool,
    /// The model's tokenizer and chat template: prompts become its token
    /// ids (otherwise 4-byte chunks of the prompt text).
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// vLLM's `--prefix-caching-hash-algo`.
    pub hash_algo: HashAlgo,
    /// vLLM's `PYTHONHASHSEED`; `None`: a random seed per process, so
    /// nobody else can compute the engine's block hashes.
    pub hash_seed: Option<String>,
    /// Publish vLLM's KV cache events (ZMQ PUB, optional replay ROUTER).
    pub kv_events: Option<kvevents::Options>,
}

impl Config {
    /// The command line's defaults for `role`: vLLM protocol, 127.0.0.1:8000
    /// (side channel on any free port), the built-in profile in real time.
    pub fn new(role: Role) -> Config {
        Config {
            role,
            flavor: Flavor::Vllm,
            host: "127.0.0.1".into(),
            port: 8000,
            kv_port: 0,
            advertise_host: "127.0.0.1".into(),
            model: "sim-llama-3-8b".into(),
            engine_id: String::new(),
            profile: Profile::h100_llama3_8b(),
            time_scale: 1.0,
            seed: 1,
            faults: Faults { error_status: 500, ..Faults::default() },
            kv_hold_ms: 30_000,
            loading_ms: 0,
            bootstrap_timeout_ms: 30_000,
            quiet: false,
            tokenizer: None,
            hash_algo: HashAlgo::Sha256Cbor,
            hash_seed: None,
            kv_events: None,
        }
    }
}

/// A prefill's KV waiting to be fetched.
struct Held {
    seq: u64,
    tokens: u64,
    since: Instant,
}

type Waiter = mpsc::Sender<(Event, Instant)>;

/// One finished completion, as the log line reports it (kept for tests and
/// tools that inspect a running simulator in-process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub request_id: String,
    pub path: String,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// `local`, `held` (prefill keeping KV), `loaded` (decode got KV) or
    /// `recomputed` (decode without a usable handoff).
    pub kv: &'static str,
    pub status: u16,
}

/// How many records the journal keeps.
const JOURNAL_LEN: usize = 4096;

/// The running simulator.
pub struct Sim {
    pub cfg: Config,
    engine: Mutex<Engine>,
    work: Condvar,
    waiters: Mutex<HashMap<u64, Waiter>>,
    next_seq: AtomicU64,
    held: Mutex<HashMap<String, Held>>,
    rooms: Mutex<HashMap<u64, u64>>,
    rooms_cv: Condvar,
    rng: Mutex<Rng>,
    journal: Mutex<std::collections::VecDeque<Record>>,
    pub metrics: Metrics,
    started: std::time::Instant,
    hashing: Hashing,
    /// The KV event publisher (`Config::kv_events`).
    kv: Option<Publisher>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Sim {
    /// A simulator without its listeners (and without KV events).
    pub fn new(cfg: Config) -> Arc<Sim> {
        Sim::build(cfg, None)
    }

    fn build(cfg: Config, kv: Option<Publisher>) -> Arc<Sim> {
        let mut engine = Engine::new(cfg.profile.clone());
        if kv.is_some() {
            engine.record_kv_events();
        }
        let hashing = Hashing::new(cfg.hash_algo, cfg.profile.block_size, cfg.hash_seed.as_deref());
        let seed = cfg.seed;
        Arc::new(Sim {
            cfg,
            engine: Mutex::new(engine),
            work: Condvar::new(),
            waiters: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(1),
            held: Mutex::new(HashMap::new()),
            rooms: Mutex::new(HashMap::new()),
            rooms_cv: Condvar::new(),
            rng: Mutex::new(Rng::new(seed)),
            journal: Mutex::new(std::collections::VecDeque::new()),
            metrics: Metrics::default(),
            started: std::time::Instant::now(),
            hashing,
            kv,
        })
    }

    /// Whether the model is still "loading" (`Config::loading_ms`).
    pub fn loading(&self) -> bool {
        self.started.elapsed() < Duration::from_millis(self.cfg.loading_ms)
    }

    fn log(&self, msg: std::fmt::Arguments<'_>) {
        let role = format!("{:?}", self.cfg.role).to_lowercase();
        eprintln!("engine-sim {role}:{} {msg}", self.cfg.port);
    }

    fn chance(&self, p: f64) -> bool {
        p > 0.0 && (self.rng.lock().next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// Model time → wall time.
    fn wall(&self, model_us: f64) -> Duration {
        Duration::from_secs_f64((model_us / 1e6 / self.cfg.time_scale).max(0.0))
    }

    /// The engine loop: step, sleep the step's (scaled) duration, deliver.
    fn engine_loop(self: Arc<Self>) {
        let mut last_expiry = Instant::now();
        loop {
            let (step, kv_events) = {
                let mut e = self.engine.lock();
                while !e.has_work() && !e.has_kv_events() {
                    self.work.wait_for(&mut e, Duration::from_millis(500));
                    if last_expiry.elapsed() > Duration::from_millis(500) {
                        break;
                    }
                }
                let step = if e.has_work() { Some(e.step()) } else { None };
                (step, e.take_kv_events())
            };
            if last_expiry.elapsed() > Duration::from_millis(500) {
                last_expiry = Instant::now();
                self.expire_held();
            }
            let Some(step) = step else {
                self.publish_kv(kv_events);
                continue;
            };
            if step.duration_us > 0.0 {
                thread::sleep(self.wall(step.duration_us));
            }
            // The step's blocks are computed: published before its tokens.
            self.publish_kv(kv_events);
            let now = Instant::now();
            let waiters = self.waiters.lock();
            for ev in step.events {
                let id = match ev {
                    Event::FirstToken { id, .. }
                    | Event::Token { id }
                    | Event::Finished { id }
                    | Event::Rejected { id } => id,
                };
                if let Some(tx) = waiters.get(&id) {
                    let _ = tx.send((ev, now));
                }
            }
        }
    }

    /// Drops KV that no decode fetched in time.
    fn expire_held(&self) {
        let limit = Duration::from_millis(self.cfg.kv_hold_ms);
        let stale: Vec<(String, u64)> = self
            .held
            .lock()
            .iter()
            .filter(|(_, h)| h.since.elapsed() > limit)
            .map(|(k, h)| (k.clone(), h.seq))
            .collect();
        for (rid, seq) in stale {
            self.held.lock().remove(&rid);
            self.engine.lock().release(seq);
            self.log(format_args!(
                "request {rid}: held KV expired unfetched after {} ms",
                self.cfg.kv_hold_ms
            ));
        }
    }

    /// The most recent finished completions, oldest first.
    pub fn journal(&self) -> Vec<Record> {
        self.journal.lock().iter().cloned().collect()
    }

    fn record(&self, r: Record) {
        let mut j = self.journal.lock();
        if j.len() == JOURNAL_LEN {
            j.pop_front();
        }
        j.push_back(r);
    }

    /// The scheduler's running and waiting sequences and the tokens they hold.
    pub fn load(&self) -> (usize, usize, u64) {
        let e = self.engine.lock();
        (e.num_running(), e.num_waiting(), e.num_tokens())
    }

    /// `GET /get_load`. SGLang mode: SGLang's shape, one entry per DP rank
    /// (`dp_rank`, `num_reqs` = running + waiting, `num_waiting_reqs`,
    /// `num_tokens`); SGLang's router sums `num_tokens` over the array.
    /// vLLM mode: an object whose `load` (running + waiting) is what
    /// vllm-router's power_of_two monitor reads. Both carry every field.
    pub fn load_json(&self) -> Value {
        let (running, waiting, tokens) = self.load();
        let entry = json!({
            "dp_rank": 0,
            "load": running + waiting,
            "num_reqs": running + waiting,
            "num_running_reqs": running,
            "num_waiting_reqs": waiting,
            "num_tokens": tokens,
        });
        match self.cfg.flavor {
            Flavor::Sglang => Value::Array(vec![entry]),
            Flavor::Vllm => entry,
        }
    }

    /// `GET /get_server_info` (SGLang mode).
    fn server_info_json(&self) -> Value {
        let mode = match self.cfg.role {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Both | Role::Encode => "null",
        };
        json!({
            "model_path": self.cfg.model,
            "served_model_name": self.cfg.model,
            "tokenizer_path": self.cfg.model,
            "disaggregation_mode": mode,
            "disaggregation_bootstrap_port": self.cfg.kv_port,
            "context_length": self.cfg.profile.max_model_len,
            "max_total_num_tokens": self.cfg.profile.num_gpu_blocks as u64
                * self.cfg.profile.block_size as u64,
            "page_size": self.cfg.profile.block_size,
            "max_running_requests": self.cfg.profile.max_num_seqs,
            "tp_size": 1,
            "dp_size": 1,
            "version": concat!("engine-sim ", env!("CARGO_PKG_VERSION")),
        })
    }

    fn snapshot(&self) -> EngineSnapshot {
        let e = self.engine.lock();
        EngineSnapshot {
            running: e.num_running(),
            waiting: e.num_waiting(),
            kv_usage: e.kv_usage(),
            prefix_queries: e.stats.prefix_queries,
            prefix_hits: e.stats.prefix_hits,
            prompt_tokens: e.stats.prompt_tokens,
            generation_tokens: e.stats.generation_tokens,
            preemptions: e.stats.preemptions,
            kv_events: self.kv.as_ref().map(Publisher::counts),
        }
    }
}

/// Starts the listeners and the engine; returns once they are bound (the
/// serving threads keep running).
pub fn start(cfg: Config) -> std::io::Result<Arc<Sim>> {
    let http = TcpListener::bind((cfg.host.as_str(), cfg.port))?;
    let side = TcpListener::bind((cfg.host.as_str(), cfg.kv_port))?;
    let mut cfg = cfg;
    cfg.port = http.local_addr()?.port();
    cfg.kv_port = side.local_addr()?.port();
    let publisher = kv::start_publisher(&mut cfg)?;
    let sim = Sim::build(cfg, publisher);
    let s = Arc::clone(&sim);
    thread::Builder::new().name("engine".into()).spawn(move || s.engine_loop())?;
    let s = Arc::clone(&sim);
    thread::Builder::new().name("side".into()).spawn(move || {
        for conn in side.incoming().flatten() {
            let s = Arc::clone(&s);
            let _ =
                thread::Builder::new().name("side-conn".into()).spawn(move || s.side_conn(conn));
        }
    })?;
    let s = Arc::clone(&sim);
    thread::Builder::new().name("accept".into()).spawn(move || {
        for conn in http.incoming().flatten() {
            // A vLLM engine that is loading has no HTTP server yet.
            if s.cfg.faults.refuse || (s.cfg.flavor == Flavor::Vllm && s.loading()) {
                let _ = set_linger_zero(&conn);
                drop(conn);
                continue;
            }
            let s = Arc::clone(&s);
            let _ = thread::Builder::new().name("conn".into()).spawn(move || s.http_conn(conn));
        }
    })?;
    Ok(sim)
}

/// SO_LINGER 0: closing sends a reset, which clients see as a refusal.
fn set_linger_zero(conn: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt reads `size_of::<linger>()` bytes from a live local.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// How a handled request left the connection.
enum After {
    KeepAlive,
    Close,
}

impl Sim {
    fn http_conn(self: Arc<Self>, conn: TcpStream) {
        let _ = conn.set_nodelay(true);
        let Ok((mut r, mut w)) = http::split(conn) else { return };
        loop {
            let req = match http::read_request(&mut r) {
                Ok(req) => req,
                Err(ReadError::Closed) | Err(ReadError::Io(_)) => return,
                Err(ReadError::Bad(why)) => {
                    let body = api::error_json(400, why);
                    let _ =
                        http::write_response(&mut w, 400, "application/json", &body, false, &[]);
                    return;
                }
                Err(ReadError::TooLarge) => {
                    let body = api::error_json(413, "request too large");
                    let _ =
                        http::write_response(&mut w, 413, "application/json", &body, false, &[]);
                    return;
                }
            };
            let keep = req.keep_alive;
            match self.route(&req, &mut w, &mut r) {
                Ok(After::KeepAlive) if keep => continue,
                _ => {
                    let _ = w.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }

    fn route(
        &self,
        req: &Request,
        w: &mut TcpStream,
        r: &mut BufReader<TcpStream>,
    ) -> std::io::Result<After> {
        let ka = req.keep_alive;
        let json_ct = "application/json";
        if self.loading()
            && matches!(
                req.path.as_str(),
                "/health" | "/health_generate" | "/v1/chat/completions" | "/v1/completions"
            )
        {
            // SGLang answers 503 until its scheduler is up.
            let body = api::error_json(503, "the model is loading");
            return http::write_response(w, 503, json_ct, &body, ka, &[]).map(|_| After::KeepAlive);
        }
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/health") => {
                http::write_response(w, 200, json_ct, b"", ka, &[]).map(|_| After::KeepAlive)
            }
            ("GET", "/v1/models") => {
                let body = json!({"object": "list", "data": [{
                    "id": self.cfg.model, "object": "model", "created": now_secs(),
                    "owned_by": "pdgate-sim", "root": self.cfg.model,
                    "max_model_len": self.cfg.profile.max_model_len,
                }]});
                http::write_response(
                    w,
                    200,
                    json_ct,
                    &serde_json::to_vec(&body).unwrap_or_default(),
                    ka,
                    &[],
                )
                .map(|_| After::KeepAlive)
            }
            ("GET", "/get_load") => {
                let body = self.load_json();
                self.json_ok(w, &body, ka)
            }
            ("GET", "/load") if self.cfg.flavor == Flavor::Vllm => {
                let (running, waiting, _) = self.load();
                self.json_ok(w, &json!({"server_load": running + waiting}), ka)
            }
            ("GET", "/health_generate") if self.cfg.flavor == Flavor::Sglang => {
                http::write_response(w, 200, json_ct, b"", ka, &[]).map(|_| After::KeepAlive)
            }
            ("GET", "/get_model_info") if self.cfg.flavor == Flavor::Sglang => {
                let body = json!({
                    "model_path": self.cfg.model, "tokenizer_path": self.cfg.model,
                    "is_generation": true,
                });
                self.json_ok(w, &body, ka)
            }
            ("GET", "/get_server_info") if self.cfg.flavor == Flavor::Sglang => {
                let body = self.server_info_json();
                self.json_ok(w, &body, ka)
            }
            ("POST", "/reset_prefix_cache") => self.reset_prefix_cache(w, ka),
            ("GET", "/metrics") => {
                let page = self.metrics.render(&self.cfg.model, self.snapshot());
                http::write_response(w, 200, "text/plain; version=0.0.4", page.as_bytes(), ka, &[])
                    .map(|_| After::KeepAlive)
            }
            ("POST", "/v1/chat/completions") => self.completion(Api::Chat, req, w, r),
            ("POST", "/v1/completions") => self.completion(Api::Completions, req, w, r),
            (
                _,
                "/v1/chat/completions"
                | "/v1/completions"
                | "/health"
                | "/v1/models"
                | "/metrics"
                | "/get_load"
                | "/reset_prefix_cache",
            ) => {
                let body = api::error_json(405, "Method Not Allowed");
                http::write_response(w, 405, json_ct, &body, ka, &[]).map(|_| After::KeepAlive)
            }
            _ => {
                let body = api::error_json(404, "Not Found");
                http::write_response(w, 404, json_ct, &body, ka, &[]).map(|_| After::KeepAlive)
            }
        }
    }

    fn json_ok(&self, w: &mut TcpStream, body: &Value, ka: bool) -> std::io::Result<After> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        http::write_response(w, 200, "application/json", &bytes, ka, &[]).map(|_| After::KeepAlive)
    }

    fn fail(&self, w: &mut TcpStream, status: u16, msg: &str, ka: bool) -> std::io::Result<After> {
        self.metrics.requests_error.fetch_add(1, Relaxed);
        http::write_response(w, status, "application/json", &api::error_json(status, msg), ka, &[])
            .map(|_| After::KeepAlive)
    }

    fn completion(
        &self,
        kind: Api,
        req: &Request,
        w: &mut TcpStream,
        r: &mut BufReader<TcpStream>,
    ) -> std::io::Result<After> {
        let ka = req.keep_alive;
        let t0 = Instant::now();
        let f = &self.cfg.faults;
        if f.latency_ms > 0 {
            thread::sleep(Duration::from_millis(f.latency_ms));
        }
        if self.chance(f.hang_rate) {
            // Never answer: wait for the client to give up.
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(r, &mut sink);
            return Ok(After::Close);
        }
        if self.chance(f.error_rate) {
            let st = if f.error_status == 0 { 500 } else { f.error_status };
            return self.fail(w, st, "injected fault", ka);
        }
        let rid = req
            .header("x-request-id")
            .map(str::to_owned)
            .unwrap_or_else(|| format!("sim-{}", self.next_seq.load(Relaxed)));
        let mut areq = match api::parse_request(kind, &req.body) {
            Ok(a) => a,
            Err(msg) => return self.fail(w, 400, &msg, ka),
        };
        let (blocks, tokens) = match self.prompt(&req.body, &mut areq) {
            Ok(p) => p,
            Err(msg) => return self.fail(w, 400, &msg, ka),
        };

        // The P/D protocol, before the engine sees the request.
        let mut kv_loaded = false;
        let mut hold_kv = false;
        let mut kv_note = "local";
        match (self.cfg.role, self.cfg.flavor) {
            (Role::Decode, Flavor::Vllm) => match self.fetch_kv(&rid, &areq) {
                Ok(()) => {
                    kv_loaded = true;
                    kv_note = "loaded";
                }
                Err(why) => {
                    self.metrics.kv_recomputes.fetch_add(1, Relaxed);
                    self.log(format_args!("request {rid}: kv recompute ({why})"));
                    kv_note = "recomputed";
                }
            },
            (Role::Decode, Flavor::Sglang) => match &areq.bootstrap {
                Some(b) => match self.wait_room(b) {
                    Ok(tokens) => {
                        thread::sleep(self.wall(self.cfg.profile.kv_transfer_us(tokens)));
                        self.metrics.kv_transfers.fetch_add(1, Relaxed);
                        kv_loaded = true;
                        kv_note = "loaded";
                    }
                    Err(why) => {
                        self.log(format_args!(
                            "request {rid}: bootstrap room {} failed: {why}",
                            b.room
                        ));
                        return self.fail(w, 500, &format!("bootstrap room {}: {why}", b.room), ka);
                    }
                },
                None => {
                    self.metrics.kv_recomputes.fetch_add(1, Relaxed);
                    self.log(format_args!("request {rid}: kv recompute (no bootstrap_room)"));
                    kv_note = "recomputed";
                }
            },
            (Role::Prefill, Flavor::Vllm) => {
                hold_kv = areq
                    .kv_transfer_params
                    .as_ref()
                    .and_then(|p| p.get("do_remote_decode"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if hold_kv {
                    kv_note = "held";
                }
            }
            _ => {}
        }

        let (out_tokens, finish) = match (self.cfg.role, self.cfg.flavor) {
            (Role::Encode, _) => (1, "length"),
            // An SGLang prefill server computes the prompt and one token,
            // whatever max_tokens asks: the decode generates the answer.
            (Role::Prefill, Flavor::Sglang) => (1, "length"),
            _ => api::output_tokens(&areq, self.cfg.profile.max_model_len as u64),
        };
        let seq = self.next_seq.fetch_add(1, Relaxed);
        let spec = SeqSpec {
            id: seq,
            prompt_tokens: areq.prompt_tokens,
            blocks,
            tokens,
            max_new_tokens: out_tokens,
            kv_loaded,
            hold_kv,
        };
        let (tx, rx) = mpsc::channel();
        self.waiters.lock().insert(seq, tx);
        {
            let mut e = self.engine.lock();
            e.add(spec);
            self.work.notify_one();
        }
        let res = self.answer(&areq, &rid, seq, out_tokens, finish, hold_kv, t0, rx, w, ka);
        self.waiters.lock().remove(&seq);
        if let Ok((status, cached, ttft)) = &res {
            self.record(Record {
                request_id: rid.clone(),
                path: req.path.clone(),
                prompt_tokens: areq.prompt_tokens,
                output_tokens: out_tokens,
                kv: kv_note,
                status: *status,
            });
            if !self.cfg.quiet {
                self.log(format_args!(
                    "request {rid} {} prompt={} out={} cached={} kv={kv_note} ttft={:.1}ms e2e={:.1}ms status={status}",
                    req.path,
                    areq.prompt_tokens,
                    out_tokens,
                    cached,
                    ttft.as_secs_f64() * 1e3 * self.cfg.time_scale,
                    t0.elapsed().as_secs_f64() * 1e3 * self.cfg.time_scale,
                ));
            }
        }
        match res {
            Ok((_, _, _)) => Ok(After::KeepAlive),
            Err(e) => {
                // Client gone (or write failed): free the sequence.
                self.engine.lock().abort(seq);
                self.held.lock().retain(|_, h| h.seq != seq);
                if e.kind() == std::io::ErrorKind::Other {
                    return Ok(After::Close);
                }
                Err(e)
            }
        }
    }

    /// Produces the answer from the sequence's events. Returns the status,
    /// cached prompt tokens and wall TTFT.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        areq: &ApiRequest,
        rid: &str,
        seq: u64,
        out_tokens: u64,
        finish: &str,
        hold_kv: bool,
        t0: Instant,
        rx: mpsc::Receiver<(Event, Instant)>,
        w: &mut TcpStream,
        ka: bool,
    ) -> std::io::Result<(u16, u64, Duration)> {
        let created = now_secs();
        let seed = api::prompt_seed(&areq.prompt_text);
        let mut usage = Usage { prompt: areq.prompt_tokens, completion: 0, cached: 0 };
        let mut ttft = Duration::ZERO;
        let mut text = String::new();
        let mut stream = None;
        if areq.stream {
            let mut s = http::Stream::start(
                w,
                200,
                "text/event-stream; charset=utf-8",
                ka,
                &[("X-Request-Id", rid)],
            )?;
            s.send(&api::stream_chunk(areq, rid, created, None, None, None))?;
            stream = Some(s);
        }
        let mut sent_events = 0u64;
        loop {
            let Ok((ev, at)) = rx.recv_timeout(Duration::from_secs(3600)) else {
                return Err(std::io::Error::other("engine stopped"));
            };
            match ev {
                Event::Rejected { .. } => {
                    let msg = format!(
                        "This model's maximum context length is {} tokens, and the KV cache holds {} blocks; the prompt has {} tokens",
                        self.cfg.profile.max_model_len, self.cfg.profile.num_gpu_blocks, areq.prompt_tokens
                    );
                    if let Some(s) = stream {
                        // The head is out already: end the stream with an error event.
                        let mut s = s;
                        s.send(
                            format!(
                                "data: {}\n\n",
                                String::from_utf8_lossy(&api::error_json(400, &msg))
                            )
                            .as_bytes(),
                        )?;
                        s.finish()?;
                        self.metrics.requests_error.fetch_add(1, Relaxed);
                        return Ok((400, 0, ttft));
                    }
                    self.fail(w, 400, &msg, ka)?;
                    return Ok((400, 0, ttft));
                }
                Event::FirstToken { .. } | Event::Token { .. } => {
                    if let Event::FirstToken { cached, .. } = ev {
                        usage.cached = cached;
                        ttft = at.duration_since(t0);
                        self.metrics.ttft.observe(ttft.as_secs_f64() * self.cfg.time_scale);
                        // The prefill is done: its KV can go to the decode.
                        self.publish_room(areq);
                    }
                    let tok = api::token_text(seed, usage.completion);
                    usage.completion += 1;
                    if let Some(s) = stream.as_mut() {
                        let last = usage.completion >= out_tokens;
                        let u = if areq.continuous_usage { Some(usage) } else { None };
                        s.send(&api::stream_chunk(
                            areq,
                            rid,
                            created,
                            Some(tok),
                            last.then_some(finish),
                            u,
                        ))?;
                        sent_events += 1;
                        if let Some(n) = self.cfg.faults.close_after {
                            if sent_events >= n {
                                return Err(std::io::Error::other("close_after fault"));
                            }
                        }
                    } else {
                        text.push_str(tok);
                    }
                }
                Event::Finished { .. } => break,
            }
        }
        let kv_params = if hold_kv {
            self.held.lock().insert(
                rid.to_owned(),
                Held { seq, tokens: areq.prompt_tokens, since: Instant::now() },
            );
            let blocks: Vec<u64> =
                (0..areq.prompt_tokens.div_ceil(self.cfg.profile.block_size as u64)).collect();
            Some(json!({
                "do_remote_prefill": true,
                "do_remote_decode": false,
                "remote_engine_id": self.cfg.engine_id,
                "remote_block_ids": blocks,
                "remote_host": self.cfg.advertise_host,
                "remote_port": self.cfg.kv_port,
                "remote_request_id": rid,
                "tp_size": 1,
            }))
        } else if self.cfg.role == Role::Encode {
            Some(json!({"encoder_engine_id": self.cfg.engine_id, "media_items": areq.media_items}))
        } else {
            None
        };
        self.metrics.requests_ok.fetch_add(1, Relaxed);
        match stream {
            Some(mut s) => {
                if areq.include_usage {
                    s.send(&api::usage_chunk(areq, rid, created, usage))?;
                }
                s.send(b"data: [DONE]\n\n")?;
                s.finish()?;
            }
            None => {
                let body = if self.cfg.role == Role::Encode {
                    let mut v: Value = serde_json::from_slice(&api::completion_json(
                        areq, rid, created, &text, finish, usage, None,
                    ))
                    .unwrap_or(Value::Null);
                    if let (Value::Object(o), Some(p)) = (&mut v, kv_params) {
                        o.insert("ec_transfer_params".into(), p);
                    }
                    serde_json::to_vec(&v).unwrap_or_default()
                } else {
                    api::completion_json(areq, rid, created, &text, finish, usage, kv_params)
                };
                http::write_response(
                    w,
                    200,
                    "application/json",
                    &body,
                    ka,
                    &[("X-Request-Id", rid)],
                )?;
            }
        }
        Ok((200, usage.cached, ttft))
    }
}
