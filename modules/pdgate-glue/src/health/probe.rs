//! A probe: its own connection to one peer on the worker's event loop
//! (`ngx_event_connect_peer`), an HTTP/1.0 `GET`, done at the status line.

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
use pdgate_core::health::{status_line, CheckConf, HealthRow, Outcome, Status, StatusLine};

use super::{apply_now, Target, ANSWER_BYTES, INFLIGHT};

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
    answer: [u8; ANSWER_BYTES],
    len: usize,
    key: u64,
    row: *const HealthRow,
    conf: CheckConf,
    started: Instant,
    /// The request went out (a failure after it is not a refusal).
    connected: bool,
}

pub(super) fn start_probe(t: Target, quiet: *mut ngx_log_t) {
    INFLIGHT.with(|f| f.borrow_mut().insert(t.key));
    let request = t.conf.request(&t.peer);
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
        answer: [0; ANSWER_BYTES],
        len: 0,
        key: t.key,
        row: t.row,
        conf: t.conf,
        started: Instant::now(),
        connected: false,
    });
    let raw = Box::into_raw(pr);
    // SAFETY: the Probe is boxed (its fields do not move) and outlives the
    // connection: finish() closes the connection before freeing it.
    unsafe {
        let p = &mut *raw;
        p.name = ngx_str_t { len: p.peer.len(), data: p.peer.as_mut_ptr() };
        if let Some(port) = p.conf.port {
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
        ngx_add_timer((*c).write, (*raw).conf.timeout_ms as ngx_msec_t);
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
            let left = p.conf.timeout_ms.saturating_sub(spent).max(1);
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
            loop {
                let room = ANSWER_BYTES - p.len;
                let n = recv(c, p.answer.as_mut_ptr().add(p.len), room);
                if n == NGX_AGAIN as isize {
                    if ngx_handle_read_event(rev, 0) != NGX_OK as ngx_int_t {
                        finish(pr, Outcome::Closed);
                    }
                    return;
                }
                if n == 0 {
                    finish(pr, if p.len == 0 { Outcome::Closed } else { Outcome::Garbage });
                    return;
                }
                if n < 0 {
                    finish(pr, Outcome::Closed);
                    return;
                }
                p.len += n as usize;
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

/// Ends a probe: closes its connection, records the outcome, logs a change
/// of status and frees the probe.
///
/// # Safety
/// `pr` must be a probe from [`start_probe`], not finished yet.
unsafe fn finish(pr: *mut Probe, outcome: Outcome) {
    // SAFETY: as documented: the box is this probe's, handed over by
    // start_probe; its connection (if any) is open and ours; the row lives
    // in the zone, as long as the cycle.
    unsafe {
        let p = Box::from_raw(pr);
        if !p.pc.connection.is_null() {
            ngx_close_connection(p.pc.connection);
        }
        INFLIGHT.with(|f| f.borrow_mut().remove(&p.key));
        let latency = p.started.elapsed().as_micros() as u64;
        let Some(row) = p.row.as_ref() else { return };
        let change = row.record(outcome, crate::observe::now_ms(), latency, &p.conf);
        if change.is_some() {
            apply_now(p.uscf);
        }
        if let Some(ch) = change {
            let log = (**addr_of!(ngx::ffi::ngx_cycle)).log;
            let (level, why) = if ch.to == Status::Up {
                (
                    NGX_LOG_NOTICE,
                    format!("{} after {} good probes", outcome.describe(), p.conf.passes),
                )
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
