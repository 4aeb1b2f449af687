//! Runs a phase of the workload on worker threads, each with one keep-alive
//! connection.
//!
//! Closed loop: `concurrency` workers each take the next request as soon as
//! their last one is answered. Open loop (Poisson, bursts): a free worker
//! takes the next arrival, sleeps until its time and sends it. A worker that
//! wakes to send and finds no other one holding a later arrival, or that
//! takes an arrival already due (bursts), starts another, up to the cap, so
//! the arrivals never wait for a slow server. Past the cap they do, and
//! their late start shows in `Record::start_ms` against `scheduled_ms`. A
//! later turn of a conversation waits for the earlier one to be answered.
//! Connections outlive a phase: the warmup's are reused by the measured run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, Scope};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::client::Client;
use super::http::Conn;
use super::stats::Record;
use super::workload::{ArrivalClock, Arrivals, Generator, RequestSpec};

/// Stack of a worker thread: a request needs little (the read buffer is on
/// the heap), and thousands of workers must fit.
const WORKER_STACK: usize = 256 * 1024;
/// Read buffer per worker.
const READ_BUF: usize = 64 * 1024;

/// What a phase sends.
#[derive(Debug)]
pub struct Plan {
    pub generator: Generator,
    pub arrivals: Arrivals,
    /// Most workers (= connections, threads, requests in flight).
    pub workers: usize,
    pub limit: Option<u64>,
    pub duration: Option<Duration>,
    /// Progress lines on stderr every this often.
    pub progress: Option<Duration>,
    /// For the arrival clock.
    pub seed: u64,
}

/// A finished phase.
#[derive(Debug)]
pub struct Outcome {
    /// In sequence order.
    pub records: Vec<Record>,
    /// From the start to the end of the last answer, s.
    pub duration_s: f64,
}

/// Idle keep-alive connections between phases.
pub type Pool = Mutex<Vec<Conn>>;

struct Job {
    spec: RequestSpec,
    /// The arrival time (open loop); a closed loop's request arrives when
    /// it is sent.
    scheduled: Option<Instant>,
}

/// The request sequence with its arrival times.
struct Source {
    generator: Generator,
    /// `None` for a closed loop.
    clock: Option<ArrivalClock>,
    next: u64,
    limit: Option<u64>,
    deadline: Option<Instant>,
    t0: Instant,
    exhausted: bool,
}

impl Source {
    fn take(&mut self) -> Option<Job> {
        if self.exhausted || self.limit.is_some_and(|l| self.next >= l) {
            self.exhausted = true;
            return None;
        }
        let scheduled = match &mut self.clock {
            None => None,
            Some(c) => c.next_s().map(|s| self.t0 + Duration::from_secs_f64(s)),
        };
        let at = scheduled.unwrap_or_else(Instant::now);
        if self.deadline.is_some_and(|d| at >= d) {
            self.exhausted = true;
            return None;
        }
        let spec = self.generator.spec(self.next);
        self.next += 1;
        Some(Job { spec, scheduled })
    }
}

struct State {
    source: Source,
    /// Workers running.
    live: usize,
    /// Workers started (open loop: grows up to `cap`).
    started: usize,
    cap: usize,
}

impl State {
    fn reserve(&mut self) -> bool {
        let ok = self.started < self.cap && !self.source.exhausted;
        if ok {
            self.started += 1;
            self.live += 1;
        }
        ok
    }
}

struct Shared<'c> {
    client: &'c Client,
    pool: &'c Pool,
    t0: Instant,
    state: Mutex<State>,
    /// Signalled when the last worker ends.
    ended: Condvar,
    /// Workers holding an arrival whose time has not come.
    waiting: AtomicUsize,
    /// Conversation → turns answered.
    turns: Mutex<HashMap<u64, u32>>,
    turn_cv: Condvar,
    records: Mutex<Vec<Record>>,
    done: AtomicU64,
    failed: AtomicU64,
}

impl<'c> Shared<'c> {
    /// Takes the next request; in an open loop, also says whether to start
    /// another worker: when this arrival is due already (a burst, or the
    /// workers fell behind).
    fn next_job(&self) -> Option<(Job, bool)> {
        let mut st = self.state.lock();
        let job = st.source.take()?;
        let more = match job.scheduled {
            Some(at) => {
                self.waiting.fetch_add(1, Ordering::Relaxed);
                at <= Instant::now() && st.reserve()
            }
            None => false,
        };
        Some((job, more))
    }

    /// Counts in a new worker if the cap allows.
    fn reserve(&self) -> bool {
        self.state.lock().reserve()
    }

    fn wait_turn(&self, conv: u64, turn: u32) {
        let mut t = self.turns.lock();
        while t.get(&conv).copied().unwrap_or(0) < turn {
            self.turn_cv.wait(&mut t);
        }
    }

    fn turn_done(&self, conv: u64, turn: u32) {
        let mut t = self.turns.lock();
        let e = t.entry(conv).or_default();
        *e = (*e).max(turn + 1);
        drop(t);
        self.turn_cv.notify_all();
    }

    fn worker<'s>(&'s self, scope: &'s Scope<'s, '_>) {
        let mut slot = {
            let mut pool = self.pool.lock();
            let addr = self.client.target.addr;
            pool.iter().position(|c| c.addr == addr).map(|i| pool.swap_remove(i))
        };
        let mut buf = vec![0u8; READ_BUF];
        let mut mine = Vec::new();
        while let Some((job, more)) = self.next_job() {
            if more {
                spawn(scope, self);
            }
            if let Some(at) = job.scheduled {
                let now = Instant::now();
                if at > now {
                    thread::sleep(at - now);
                }
                // Nobody else holds a later arrival: start a worker for it
                // while this one is busy.
                if self.waiting.fetch_sub(1, Ordering::Relaxed) == 1 && self.reserve() {
                    spawn(scope, self);
                }
            }
            if let Some((conv, turn)) = job.spec.conv {
                if turn > 0 {
                    self.wait_turn(conv, turn);
                }
            }
            let rec = self.client.run(&mut slot, &mut buf, &job.spec, self.t0, job.scheduled);
            if let Some((conv, turn)) = job.spec.conv {
                self.turn_done(conv, turn);
            }
            if !rec.ok() {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Relaxed);
            mine.push(rec);
        }
        if let Some(c) = slot {
            self.pool.lock().push(c);
        }
        self.records.lock().append(&mut mine);
        self.end_worker();
    }

    fn end_worker(&self) {
        let mut st = self.state.lock();
        st.live -= 1;
        if st.live == 0 {
            self.ended.notify_all();
        }
    }
}

/// Starts a worker already counted in `live`.
fn spawn<'s>(scope: &'s Scope<'s, '_>, shared: &'s Shared<'_>) {
    let started = thread::Builder::new()
        .name("pd-bench-worker".into())
        .stack_size(WORKER_STACK)
        .spawn_scoped(scope, move || shared.worker(scope));
    if let Err(e) = started {
        eprintln!("pd-bench: cannot start a worker thread: {e}");
        shared.end_worker();
    }
}

/// Sends the plan's requests and waits for every answer.
pub fn run(client: &Client, pool: &Pool, plan: Plan) -> Outcome {
    let t0 = Instant::now();
    let Plan { generator, arrivals, workers: cap, limit, duration, progress, seed } = plan;
    let closed = arrivals == Arrivals::Closed;
    let source = Source {
        generator,
        clock: (!closed).then(|| ArrivalClock::new(arrivals, seed)),
        next: 0,
        limit,
        deadline: duration.map(|d| t0 + d),
        t0,
        exhausted: false,
    };
    // A closed loop starts all its workers; bursts one per request of a
    // burst; Poisson one, which starts more as the arrivals need them.
    let first = match arrivals {
        Arrivals::Closed => cap,
        Arrivals::Burst { size, .. } => cap.min(usize::try_from(size).unwrap_or(usize::MAX)),
        Arrivals::Poisson { .. } | Arrivals::OnOff { .. } => 1,
    };
    let shared = Shared {
        client,
        pool,
        t0,
        state: Mutex::new(State { source, live: first, started: first, cap }),
        ended: Condvar::new(),
        waiting: AtomicUsize::new(0),
        turns: Mutex::new(HashMap::new()),
        turn_cv: Condvar::new(),
        records: Mutex::new(Vec::new()),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    };
    let stop = AtomicBool::new(false);
    let duration_s = thread::scope(|scope| {
        if let Some(every) = progress {
            let (shared, stop) = (&shared, &stop);
            scope.spawn(move || {
                let mut next = t0 + every;
                while !stop.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(100));
                    if Instant::now() >= next {
                        next += every;
                        eprintln!(
                            "pd-bench: {:.0} s, {} answered, {} failed",
                            t0.elapsed().as_secs_f64(),
                            shared.done.load(Ordering::Relaxed),
                            shared.failed.load(Ordering::Relaxed)
                        );
                    }
                }
            });
        }
        for _ in 0..first {
            spawn(scope, &shared);
        }
        let mut st = shared.state.lock();
        while st.live > 0 {
            shared.ended.wait(&mut st);
        }
        drop(st);
        stop.store(true, Ordering::Relaxed);
        t0.elapsed().as_secs_f64()
    });
    let mut records = shared.records.into_inner();
    records.sort_by_key(|r| r.n);
    Outcome { records, duration_s }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    use super::*;
    use crate::bench::workload::{BodyOptions, Endpoint, Lengths, Prefix, Workload};
    use crate::profile::Profile;

    /// A keep-alive server on a free port: SSE answers of two content
    /// events (or `status` with a JSON body), `delay_ms` before answering.
    fn server(status: u16, delay_ms: u64) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { return };
                thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut w = conn;
                    loop {
                        let mut len = 0;
                        loop {
                            let mut line = String::new();
                            if r.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            let l = line.to_ascii_lowercase();
                            if let Some(v) = l.strip_prefix("content-length:") {
                                len = v.trim().parse().unwrap();
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; len];
                        r.read_exact(&mut body).unwrap();
                        thread::sleep(Duration::from_millis(delay_ms));
                        let answer = if status == 200 {
                            let ev = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n";
                            let b = format!("{ev}{ev}data: [DONE]\n\n");
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                                 Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                                b.len()
                            )
                        } else {
                            format!("HTTP/1.1 {status} No\r\nContent-Length: 2\r\n\r\n{{}}")
                        };
                        if w.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn client(addr: std::net::SocketAddr) -> Client {
        Client {
            target: crate::bench::http::parse_url(&format!("http://{addr}")).unwrap(),
            body: BodyOptions {
                endpoint: Endpoint::Chat,
                model: "m".into(),
                stream: true,
                extra: Default::default(),
            },
            headers: String::new(),
            timeout: Duration::from_secs(10),
            id_prefix: "t-".into(),
            profile: Profile::h100_llama3_8b(),
        }
    }

    fn plan(arrivals: Arrivals, workers: usize, limit: u64, prefix: Option<Prefix>) -> Plan {
        let lengths = Lengths::Fixed { input: 8, output: 2 };
        Plan {
            generator: Generator::new(Workload { seed: 3, lengths, prefix }),
            arrivals,
            workers,
            limit: Some(limit),
            duration: None,
            progress: None,
            seed: 3,
        }
    }

    #[test]
    fn closed_loop_reuses_connections() {
        let c = client(server(200, 0));
        let pool = Pool::new(Vec::new());
        let out = run(&c, &pool, plan(Arrivals::Closed, 3, 30, None));
        assert_eq!(out.records.len(), 30);
        for (i, r) in out.records.iter().enumerate() {
            assert_eq!((r.n, r.error.as_deref(), r.events), (i as u64, None, 2), "{r:?}");
            assert_eq!(r.id, format!("t-{i}"));
            assert_eq!(r.scheduled_ms, r.start_ms);
        }
        // Three connections went back to the pool, and carried every request.
        let pool = pool.into_inner();
        assert_eq!(pool.len(), 3);
        assert_eq!(pool.iter().map(|c| c.uses).sum::<u64>(), 30);
    }

    #[test]
    fn bursts_go_out_together() {
        // Answers take 100 ms: a request that waited for another would
        // start that late.
        let c = client(server(200, 100));
        let pool = Pool::new(Vec::new());
        let burst = Arrivals::Burst { size: 4, interval_s: 0.15 };
        let out = run(&c, &pool, plan(burst, 64, 8, None));
        assert_eq!(out.records.len(), 8);
        for r in &out.records {
            let at = if r.n < 4 { 0.0 } else { 150.0 };
            assert!((r.scheduled_ms - at).abs() < 0.01, "{r:?}");
            // All four of a burst in flight at once.
            assert!(r.start_ms - r.scheduled_ms < 50.0, "{r:?}");
            assert!(r.ok());
        }
        assert!(out.duration_s >= 0.25);
    }

    #[test]
    fn turns_wait_for_the_previous_answer() {
        let c = client(server(200, 5));
        let pool = Pool::new(Vec::new());
        let p = Prefix { groups: 1, users: 2, turns: 3, tokens: 16, tokens_max: 16 };
        let out = run(&c, &pool, plan(Arrivals::Poisson { rate: 1000.0 }, 8, 6, Some(p)));
        assert_eq!(out.records.len(), 6);
        for a in &out.records {
            for b in &out.records {
                let (Some((ca, ta)), Some((cb, tb))) = (a.conv, b.conv) else { panic!() };
                if ca == cb && tb == ta + 1 {
                    assert!(b.start_ms >= a.start_ms + a.e2e_ms.unwrap(), "{a:?} {b:?}");
                }
            }
        }
    }

    #[test]
    fn errors_are_records() {
        let c = client(server(503, 0));
        let pool = Pool::new(Vec::new());
        let out = run(&c, &pool, plan(Arrivals::Poisson { rate: 500.0 }, 4, 5, None));
        assert!(out.records.iter().all(|r| r.error.as_deref() == Some("http 503")));
        // A closed port.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let out = run(&client(addr), &pool, plan(Arrivals::Closed, 2, 4, None));
        assert_eq!(out.records.len(), 4);
        for r in &out.records {
            assert_eq!((r.status, r.error.as_deref()), (0, Some("connect: connection refused")));
        }
    }
}
