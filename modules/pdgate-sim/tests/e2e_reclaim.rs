//! End to end: a worker that dies loses nothing. nginx (dist/, built by
//! ./build.sh; master process, two workers) places requests through two
//! balancers (least_total_load, pd_score_balance as a prefill role) and
//! the SGLang mode (its own counters zone) onto backends that accept and
//! never answer; workers are then SIGKILLed with the requests in flight,
//! and the status pages must come back to what the live workers hold —
//! zero once every worker that held something is gone.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::{dist, whoami_location, Nginx};

/// A backend that accepts connections and keeps them, never answering.
struct Silent {
    port: u16,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl Silent {
    fn start() -> Silent {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let held = Arc::new(Mutex::new(Vec::new()));
        let h = held.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                h.lock().unwrap().push(s);
            }
        });
        Silent { port, held }
    }

    /// Closes every connection it holds (nginx then answers 502).
    fn drop_all(&self) {
        self.held.lock().unwrap().clear();
    }
}

impl Nginx {
    fn start_pair(a: u16, b: u16) -> Nginx {
        let m = dist().join("modules");
        let conf = |port: u16| {
            format!(
                r#"load_module {m}/ngx_http_upstream_least_total_load_module.so;
load_module {m}/ngx_http_upstream_pd_score_balance_module.so;
load_module {m}/ngx_http_prefill_refactor_module.so;
daemon off;
master_process on;
worker_processes 2;
error_log logs/error.log notice;
pid logs/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    proxy_read_timeout 60s;
    upstream lb_ltl {{ server 127.0.0.1:{a}; server 127.0.0.1:{b}; least_total_load on; }}
    upstream lb_pds {{ server 127.0.0.1:{a}; server 127.0.0.1:{b}; pd_score_balance prefill; }}
    server {{
        # One listening socket per worker: the kernel spreads the test's
        # connections over both workers.
        listen 127.0.0.1:{port} reuseport;
        {whoami}
        location /ltl/ {{ proxy_pass http://lb_ltl; }}
        location /pds/ {{ proxy_pass http://lb_pds; }}
        location = /status/ltl {{ least_total_load_status; }}
        location = /status/pds {{ pd_score_balance_status; }}
        location /v1/ {{
            prefill_refactor /prefill_internal;
            prefill_servers_list 127.0.0.1:{a},127.0.0.1:{b};
            decode_servers_list 127.0.0.1:{a},127.0.0.1:{b};
            bootstrap_ports_list 8998,8998;
            pd_distribution p_before_d;
            pd_backend sglang;
            proxy_pass http://$decode_server;
        }}
        location /prefill_internal/ {{
            internal;
            rewrite ^/prefill_internal(/.*)$ $1 break;
            proxy_pass http://$prefill_server;
        }}
        location = /counters {{
            prefill_servers_list 127.0.0.1:{a},127.0.0.1:{b};
            decode_servers_list 127.0.0.1:{a},127.0.0.1:{b};
            return 200 "$prefill_refactor_counters\n";
        }}
    }}
}}
"#,
                m = m.display(),
                whoami = whoami_location(port),
            )
        };
        Nginx::start("reclaim", conf)
    }

    /// The master's worker processes, by /proc.
    fn workers(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(master) && f[0] != "Z" {
                out.push(pid);
            }
        }
        out.sort_unstable();
        out
    }

    fn get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        r.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or(r)
    }

    /// In flight, summed over the balancer's peers: (requests, tokens), and
    /// the "# in prefill" count if the page has one.
    fn balancer(&self, which: &str) -> (u64, u64, u64) {
        let page = self.get(&format!("/status/{which}"));
        let mut sum = (0, 0, 0);
        for l in page.lines() {
            let f: Vec<&str> = l.split(' ').collect();
            if l.starts_with("lb_") {
                sum.0 += f[2].parse::<u64>().unwrap();
                sum.1 += f[3].parse::<u64>().unwrap();
            } else if let Some(n) = l.strip_prefix("# in prefill ") {
                sum.2 = n.trim().parse().unwrap();
            }
        }
        sum
    }

    /// The SGLang counters: active prefill and decode requests in all.
    fn sglang(&self) -> (u64, u64) {
        let v: serde_json::Value = serde_json::from_str(self.get("/counters").trim()).unwrap();
        let sum = |leg: &str| -> u64 {
            v[leg].as_object().unwrap().values().map(|s| s["active"].as_u64().unwrap()).sum()
        };
        (sum("prefill"), sum("decode"))
    }

    /// Every count the test watches: ltl (requests, tokens), pds
    /// (requests, tokens, in prefill), sglang (prefill, decode).
    fn counts(&self) -> [u64; 7] {
        let (a, b, _) = self.balancer("ltl");
        let (c, d, e) = self.balancer("pds");
        let (f, g) = self.sglang();
        [a, b, c, d, e, f, g]
    }

    fn wait_for(&self, want: [u64; 7], what: &str) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let got = self.counts();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: counts {got:?}, want {want:?}\n{}",
                log(&self.dir)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn log(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default()
}

/// Sends a request and keeps the connection open (the answer never comes).
fn send(port: u16, path: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// Whether nginx closed (or reset) the connection: its worker is gone.
/// (The kernel closes a killed process's sockets as it dies.)
fn closed(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    let gone = match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    };
    s.set_nonblocking(false).unwrap();
    gone
}

fn kill(pid: u32) {
    let st = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(st.success());
}

/// Requests of each kind in flight.
const N: usize = 6;

#[test]
fn a_killed_worker_gives_back_what_it_held() {
    let a = Silent::start();
    let b = Silent::start();
    let ngx = Nginx::start_pair(a.port, b.port);
    let body = format!(r#"{{"prompt":"{}","max_tokens":8}}"#, "x".repeat(400));
    // Each kind: (path, counts it adds per request).
    let mut conns: Vec<(usize, TcpStream)> = Vec::new();
    for i in 0..N {
        conns.push((0, send(ngx.port, &format!("/ltl/{i}"), &body)));
        conns.push((1, send(ngx.port, &format!("/pds/{i}"), &body)));
        conns.push((2, send(ngx.port, "/v1/completions", &body)));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let full = loop {
        let c = ngx.counts();
        if c[0] == N as u64 && c[2] == N as u64 && c[4] == N as u64 && c[5] == N as u64 {
            break c;
        }
        assert!(Instant::now() < deadline, "requests never all in flight: {c:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let tokens = full[1] / N as u64;
    assert!(tokens > 0 && full[3] == full[1], "{full:?}");
    assert_eq!(full[6], N as u64, "p_before_d chooses the decode server up front: {full:?}");
    // What each request adds to the counts, by kind.
    let adds = |kind: usize| -> [u64; 7] {
        match kind {
            0 => [1, tokens, 0, 0, 0, 0, 0],
            1 => [0, 0, 1, tokens, 1, 0, 0],
            _ => [0, 0, 0, 0, 0, 1, 1],
        }
    };
    let workers = ngx.workers();
    assert_eq!(workers.len(), 2, "{workers:?}");

    // Kill one worker: what it held goes, what the other holds stays.
    kill(workers[0]);
    std::thread::sleep(Duration::from_millis(200));
    let mut left = full;
    let mut alive = Vec::new();
    for (kind, mut s) in conns {
        if closed(&mut s) {
            for (l, d) in left.iter_mut().zip(adds(kind)) {
                *l -= d;
            }
        } else {
            alive.push((kind, s));
        }
    }
    eprintln!("in flight {full:?}; after killing worker {}: {left:?}", workers[0]);
    ngx.wait_for(left, "after killing one worker");
    // A sweep later (the timer runs every second) nothing more is taken.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(ngx.counts(), left, "the live worker's share stays");
    let gone = log(&ngx.dir);
    // With reuseport both workers hold some (all 18 on one: p = 2^-17).
    assert!(left != full && left != [0; 7], "{full:?} {left:?}");
    assert!(gone.contains(&format!("process {} is gone, gave back", workers[0])), "{gone}");

    // Kill the other one too (and the respawned one if it holds anything):
    // everything goes back to zero.
    for w in ngx.workers() {
        if w != workers[0] {
            kill(w);
        }
    }
    ngx.wait_for([0; 7], "after killing every worker that held requests");
    let deadline = Instant::now() + Duration::from_secs(3);
    while ngx.workers().len() != 2 {
        assert!(Instant::now() < deadline, "nginx did not respawn its workers");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(alive);
    a.drop_all();
    b.drop_all();
    // New requests still count and release normally.
    let mut s = send(ngx.port, "/ltl/again", &body);
    let deadline = Instant::now() + Duration::from_secs(3);
    while ngx.counts()[0] != 1 {
        assert!(Instant::now() < deadline, "a new request was not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    a.drop_all();
    b.drop_all();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    ngx.wait_for([0; 7], "after the last request ended");
    let l = log(&ngx.dir);
    assert!(!l.contains("internal error"), "{l}");
    for line in l.lines().filter(|l| l.contains("is gone")) {
        eprintln!("{line}");
    }
}
