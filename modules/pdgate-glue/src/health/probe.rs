//! A probe or a scrape: its own connection to one peer on the worker's
//! event loop (`ngx_event_connect_peer`), an HTTP/1.0 `GET`; a probe is
//! done at the status line, a scrape when the engine closes the
//! connection after its whole `/metrics` answer.

use std::ffi::c_void;
use std::ptr::{addr_of, addr_of_mut, null_mut};
use std::time::Instant;

use ngx::ffi::{
    ngx_add_timer, ngx_close_connection, ngx_connection_t, ngx_del_timer, ngx_event_connect_peer,
    ngx_event_get_peer, ngx_event_t, ngx_handle_read_event, ngx_handle_write_event,
    ngx_http_upstream_srv_conf_t, ngx_inet_set_port, ngx_int_t, ngx_log_t, ngx_msec_t,
    ngx_peer_connection_t, ngx_str_t, sockaddr, NGX_AGAIN, NGX_ERROR, NGX_LOG_NOTICE, NGX_LOG_WARN,
    NGX_OK,
};
use pdgate_core::engine::{read_answer, MAX_ANSWER};
use pdgate_core::health::{status_line, Outcome, Status, StatusLine};

use super::{apply_now, Job, Target, ANSWER_BYTES, INFLIGHT};

/// A probe in flight: owned by its connection (`c->data`), freed by
/// [`finish`].
struct Probe {
    pc: ngx_peer_connection_t,
    uscf: *mut ngx_http_upstream_srv_conf_t,
    addr: libc::sockaddr_storage,
    name: ngx_str_t,
    peer: Vec<u8>,
    upstream: Vec<u8>,
    request: Vec<u8>,
    sent: usize,
    /// What was read; `len` bytes of it are the answer so far.
    answer: Vec<u8>,
    len: usize,
    key: u64,
    job: Job,
    started: Instant,
    /// The request went out (a failure after it is not a refusal).
    connected: bool,
}

impl Probe {
    /// Bytes of answer read at most.
    fn limit(&self) -> usize {
        if self.job.is_metrics() {
            MAX_ANSWER
        } else {
            ANSWER_BYTES
        }
    }
}

pub(super) fn start_probe(t: Target, quiet: *mut ngx_log_t) {
    INFLIGHT.with(|f| f.borrow_mut().insert((t.key, t.job.is_metrics())));
    let request = t.job.request(&t.peer);
    let room = if t.job.is_metrics() { 64 << 10 } else { ANSWER_BYTES };
    let pr = Box::new(Probe {
        // SAFETY: all-zero bytes are a valid (empty) peer connection.
        pc: unsafe { std::mem::zeroed() },
        uscf: t.uscf,
        addr: t.addr,
        name: ngx_str_t { len: 0, data: null_mut() },
        peer: t.peer,
        upstream: t.upstream,
        request,
        sent: 0,
        answer: vec![0; room],
        len: 0,
        key: t.key,
        job: t.job,
        started: Instant::now(),
        connected: false,
    });
    let raw = Box::into_raw(pr);
    // SAFETY: the Probe is boxed (its fields do not move) and outlives the
    // connection: finish() closes the connection before freeing it.
    unsafe {
        let p = &mut *raw;
        p.name = ngx_str_t { len: p.peer.len(), data: p.peer.as_mut_ptr() };
        if let Some(port) = p.job.probe().port {
            ngx_inet_set_port(addr_of_mut!(p.addr) as *mut sockaddr, port);
        }
        p.pc.sockaddr = addr_of_mut!(p.addr) as *mut sockaddr;
        p.pc.socklen = t.socklen;
        p.pc.name = &mut p.name;
        p.pc.get = Some(ngx_event_get_peer);
        p.pc.log = quiet;
        let rc = ngx_event_connect_peer(&mut (*raw).pc);
        if rc == NGX_ERROR as ngx_int_t || (*raw).pc.connection.is_null() {
            // NGX_DECLINED: connect() failed at once (refused).
            let outcome =
                if rc == NGX_ERROR as ngx_int_t { Outcome::Closed } else { Outcome::Refused };
            finish(raw, outcome);
            return;
        }
        let c = (*raw).pc.connection;
        (*c).data = raw as *mut c_void;
        (*(*c).read).handler = Some(on_read);
        (*(*c).write).handler = Some(on_write);
        ngx_add_timer((*c).write, (*raw).job.probe().timeout_ms as ngx_msec_t);
        if rc != NGX_AGAIN as ngx_int_t {
            on_write((*c).write);
        }
    }
}

unsafe extern "C" fn noop(_ev: *mut ngx_event_t) {}

unsafe extern "C" fn on_write(wev: *mut ngx_event_t) {
    crate::guard::catch("pd_health_check probe", (), || {
        // SAFETY: a probe connection's event: data is the connection, whose
        // data is the live Probe; send/recv are the connection's own.
        unsafe {
            let c = (*wev).data as *mut ngx_connection_t;
            let pr = (*c).data as *mut Probe;
            if (*wev).timedout() != 0 {
                finish(pr, Outcome::TimedOut);
                return;
            }
            let Some(send) = (*c).send else {
                finish(pr, Outcome::Closed);
                return;
            };
            let p = &mut *pr;
            while p.sent < p.request.len() {
                let n = send(c, p.request.as_mut_ptr().add(p.sent), p.request.len() - p.sent);
                if n == NGX_AGAIN as isize {
                    if ngx_handle_write_event(wev, 0) != NGX_OK as ngx_int_t {
                        finish(pr, Outcome::Closed);
                    }
                    return;
                }
                if n <= 0 {
                    finish(pr, if p.connected { Outcome::Closed } else { Outcome::Refused });
                    return;
                }
                p.sent += n as usize;
            }
            p.connected = true;
            (*wev).handler = Some(noop);
            if (*wev).timer_set() != 0 {
                ngx_del_timer(wev);
            }
            let spent = p.started.elapsed().as_millis() as u64;
            let left = p.job.probe().timeout_ms.saturating_sub(spent).max(1);
            let rev = (*c).read;
            ngx_add_timer(rev, left as ngx_msec_t);
            if ngx_handle_read_event(rev, 0) != NGX_OK as ngx_int_t {
                finish(pr, Outcome::Closed);
                return;
            }
            if (*rev).ready() != 0 {
                on_read(rev);
            }
        }
    })
}

unsafe extern "C" fn on_read(rev: *mut ngx_event_t) {
    crate::guard::catch("pd_health_check probe", (), || {
        // SAFETY: as on_write.
        unsafe {
            let c = (*rev).data as *mut ngx_connection_t;
            let pr = (*c).data as *mut Probe;
            if (*rev).timedout() != 0 {
                finish(pr, Outcome::TimedOut);
                return;
            }
            if !(*pr).connected {
                // An answer before the request went out: wait for write.
                return;
            }
            let Some(recv) = (*c).recv else {
                finish(pr, Outcome::Closed);
                return;
            };
            let p = &mut *pr;
            let metrics = p.job.is_metrics();
            loop {
                if p.len == p.answer.len() {
                    if p.len >= p.limit() {
                        // A scrape this long is not an engine's /metrics.
                        return finish(pr, Outcome::Garbage);
                    }
                    let grown = (p.answer.len() * 2).min(p.limit());
                    p.answer.resize(grown, 0);
                }
                let room = p.answer.len() - p.len;
                let n = recv(c, p.answer.as_mut_ptr().add(p.len), room);
                if n == NGX_AGAIN as isize {
                    if ngx_handle_read_event(rev, 0) != NGX_OK as ngx_int_t {
                        finish(pr, Outcome::Closed);
                    }
                    return;
                }
                if n == 0 {
                    let end = match (p.len, metrics) {
                        (0, _) => Outcome::Closed,
                        // The whole answer: finish reads it.
                        (_, true) => Outcome::Status(200),
                        (_, false) => Outcome::Garbage,
                    };
                    finish(pr, end);
                    return;
                }
                if n < 0 {
                    finish(pr, Outcome::Closed);
                    return;
                }
                p.len += n as usize;
                if metrics {
                    continue;
                }
                match status_line(&p.answer[..p.len]) {
                    StatusLine::Code(s) => return finish(pr, Outcome::Status(s)),
                    StatusLine::Invalid => return finish(pr, Outcome::Garbage),
                    StatusLine::Partial if p.len == ANSWER_BYTES => {
                        return finish(pr, Outcome::Garbage)
                    }
                    StatusLine::Partial => {}
                }
            }
        }
    })
}

/// Ends a probe or scrape: closes its connection, records the outcome (a
/// scrape's whole answer is read here), logs a change of status and frees
/// the probe.
///
/// # Safety
/// `pr` must be a probe from [`start_probe`], not finished yet.
unsafe fn finish(pr: *mut Probe, outcome: Outcome) {
    // SAFETY: as documented: the box is this probe's, handed over by
    // start_probe; its connection (if any) is open and ours; the rows live
    // in the zone, as long as the cycle.
    unsafe {
        let p = Box::from_raw(pr);
        if !p.pc.connection.is_null() {
            ngx_close_connection(p.pc.connection);
        }
        INFLIGHT.with(|f| f.borrow_mut().remove(&(p.key, p.job.is_metrics())));
        let latency = p.started.elapsed().as_micros() as u64;
        let now = crate::observe::now_ms();
        let change = match &p.job {
            Job::Metrics { row, conf, sent } => {
                let Some(row) = row.as_ref() else { return };
                let read = match outcome {
                    Outcome::Status(_) => read_answer(&p.answer[..p.len], conf.model.as_deref())
                        .map_err(|e| e.describe()),
                    o => Err(o.describe()),
                };
                let log = (**addr_of!(ngx::ffi::ngx_cycle)).log;
                let (u, peer) =
                    (String::from_utf8_lossy(&p.upstream), String::from_utf8_lossy(&p.peer));
                match read {
                    Ok(load) => {
                        if row.store(&load, *sent, now, latency, conf) {
                            ngx::ngx_log_error!(
                                NGX_LOG_NOTICE,
                                log,
                                "pd_engine_metrics: upstream \"{}\" peer {} answers its metrics again",
                                u,
                                peer
                            );
                        }
                    }
                    // Logged when scrapes start failing, not at each one.
                    Err(why) if row.failed(latency) => {
                        ngx::ngx_log_error!(
                            NGX_LOG_WARN,
                            log,
                            "pd_engine_metrics: upstream \"{}\" peer {}: {}, its metrics age out",
                            u,
                            peer,
                            why
                        );
                    }
                    Err(_) => {}
                }
                return;
            }
            Job::Health { row, conf } => {
                let Some(row) = row.as_ref() else { return };
                row.record(outcome, now, latency, conf).map(|ch| (ch, conf.passes))
            }
        };
        if change.is_some() {
            apply_now(p.uscf);
        }
        if let Some((ch, passes)) = change {
            let log = (**addr_of!(ngx::ffi::ngx_cycle)).log;
            let (level, why) = if ch.to == Status::Up {
                (NGX_LOG_NOTICE, format!("{} after {} good probes", outcome.describe(), passes))
            } else {
                (NGX_LOG_WARN, outcome.describe())
            };
            ngx::ngx_log_error!(
                level,
                log,
                "pd_health_check: upstream \"{}\" peer {} is {} ({}), was {}",
                String::from_utf8_lossy(&p.upstream),
                String::from_utf8_lossy(&p.peer),
                ch.to.name(),
                why,
                ch.from.name()
            );
        }
    }
}
