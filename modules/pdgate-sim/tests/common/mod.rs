//! What the end-to-end tests share: the built `dist/`, free ports, and an
//! nginx started from a configuration and stopped on drop.
#![allow(dead_code)] // each test crate uses its own part

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub fn dist() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../dist")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The location every test configuration puts in its server on `port`, by
/// which [`Nginx::start`] knows it reached its own nginx.
pub fn whoami_location(port: u16) -> String {
    format!("location = /whoami {{ return 200 \"nginx {port}\"; }}")
}

/// A running nginx (`daemon off`, so `child` is the master or the single
/// process), stopped on drop, its directory removed.
pub struct Nginx {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl Nginx {
    /// Starts `dist/sbin/nginx` with the configuration `conf(port)` for a
    /// free `port`; the configuration must listen there and hold
    /// [`whoami_location`]. A port from [`free_port`] may be taken by a
    /// simulator of a test running beside this one before nginx binds it:
    /// then nginx exits, the port answers but not as nginx, and this starts
    /// again elsewhere.
    pub fn start(tag: &str, conf: impl Fn(u16) -> String) -> Nginx {
        let bin = dist().join("sbin/nginx");
        assert!(bin.exists(), "{} is missing: run ./build.sh first", bin.display());
        for _ in 0..5 {
            let dir = std::env::temp_dir().join(format!(
                "pdgate-{tag}-{}-{}",
                std::process::id(),
                free_port()
            ));
            std::fs::create_dir_all(dir.join("logs")).unwrap();
            let port = free_port();
            std::fs::write(dir.join("nginx.conf"), conf(port)).unwrap();
            let child = Command::new(&bin)
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg("nginx.conf")
                .spawn()
                .expect("nginx starts");
            let mut n = Nginx { child, port, dir };
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if whoami(port).as_deref() == Some(&format!("nginx {port}")[..]) {
                    return n;
                }
                if n.child.try_wait().ok().flatten().is_some() || Instant::now() >= deadline {
                    let log = n.log();
                    assert!(log.contains("Address already in use"), "nginx did not start: {log}");
                    break; // dropping `n` cleans up
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("nginx found no free port in five tries");
    }

    /// Its error log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/error.log")).unwrap_or_default()
    }

    /// `nginx -s <signal>` for this instance.
    pub fn signal(&self, signal: &str) -> std::process::ExitStatus {
        Command::new(dist().join("sbin/nginx"))
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg("nginx.conf")
            .args(["-s", signal])
            .stderr(std::process::Stdio::null())
            .status()
            .expect("nginx -s runs")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM through the pid file: a master then stops its workers
        // (SIGKILL would leave them running).
        if self.dir.join("logs/nginx.pid").exists() {
            let _ = self.signal("stop");
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The body of `GET /whoami` on `port`, if something answers there.
fn whoami(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /whoami HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split("\r\n\r\n").nth(1).map(str::to_owned)
}

/// Sends `req` (a whole HTTP/1.1 request with `Connection: close`) to
/// nginx on `port` and reads the answer within `timeout_s`: its status (0:
/// none) and body.
pub fn request(port: u16, req: &str, timeout_s: u64) -> (u16, String) {
    let (status, r) = exchange(port, req, timeout_s);
    (status, r.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or(r))
}

/// As [`request`], with the whole answer (head and body).
pub fn exchange(port: u16, req: &str, timeout_s: u64) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(timeout_s))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    let status = r.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, r)
}

/// `GET path` from nginx on `port`: status and body.
pub fn get(port: u16, path: &str) -> (u16, String) {
    request(port, &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"), 5)
}
