//! The P/D side channel: SGLang bootstrap rooms (publish, wait) and vLLM
//! KV fetches (the decode pulls the prefill's KV), over one-line requests
//! on the engine's side-channel port.

use super::*;

impl Sim {
    /// SGLang prefill: makes the request's bootstrap room (its KV) available
    /// to the decode waiting on it, once the prefill computed the prompt.
    pub(super) fn publish_room(&self, areq: &ApiRequest) {
        if let (Role::Prefill, Flavor::Sglang, Some(b)) =
            (self.cfg.role, self.cfg.flavor, &areq.bootstrap)
        {
            self.rooms.lock().insert(b.room, areq.prompt_tokens);
            self.rooms_cv.notify_all();
        }
    }

    /// vLLM decode: fetch the prompt's KV from the prefill named in
    /// `kv_transfer_params`, taking the transfer time.
    pub(super) fn fetch_kv(&self, rid: &str, areq: &ApiRequest) -> Result<(), String> {
        let p = areq.kv_transfer_params.as_ref().ok_or("no kv_transfer_params")?;
        if p.get("do_remote_prefill").and_then(Value::as_bool) != Some(true) {
            return Err("kv_transfer_params without do_remote_prefill".into());
        }
        let host = p.get("remote_host").and_then(Value::as_str).ok_or("no remote_host")?;
        let port = p.get("remote_port").and_then(Value::as_u64).ok_or("no remote_port")?;
        let key = p.get("remote_request_id").and_then(Value::as_str).unwrap_or(rid);
        let reply = side_call(
            host,
            port,
            &format!("FETCH {key} {}\n", areq.prompt_tokens),
            Duration::from_secs(5),
        )?;
        match reply.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["OK", tokens] => {
                let tokens: u64 = tokens.parse().map_err(|_| "bad side-channel reply")?;
                thread::sleep(self.wall(self.cfg.profile.kv_transfer_us(tokens)));
                self.metrics.kv_transfers.fetch_add(1, Relaxed);
                Ok(())
            }
            ["MISSING"] => Err(format!("prefill {host}:{port} holds no KV for request {key} (never prefilled there, or expired)")),
            _ => Err(format!("bad side-channel reply \"{}\"", reply.trim())),
        }
    }

    /// SGLang decode: wait until the prefill of the room is done.
    pub(super) fn wait_room(&self, b: &api::Bootstrap) -> Result<u64, String> {
        let timeout = self.cfg.bootstrap_timeout_ms;
        let reply = side_call(
            &b.host,
            u64::from(b.port),
            &format!("WAIT {} {timeout}\n", b.room),
            Duration::from_millis(timeout + 5000),
        )?;
        match reply.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["OK", tokens] => tokens.parse().map_err(|_| "bad bootstrap reply".to_owned()),
            ["TIMEOUT"] => Err(format!("the prefill did not finish within {timeout} ms")),
            _ => Err(format!("bad bootstrap reply \"{}\"", reply.trim())),
        }
    }

    /// Serves one side-channel connection: `FETCH <request-id> <tokens>` or
    /// `WAIT <room> <timeout-ms>`, one line each, one answer line each.
    pub(super) fn side_conn(self: Arc<Self>, conn: TcpStream) {
        let Ok(mut w) = conn.try_clone() else { return };
        let mut r = BufReader::new(conn);
        let mut line = String::new();
        while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            if self.cfg.faults.slow_kv_ms > 0 {
                thread::sleep(Duration::from_millis(self.cfg.faults.slow_kv_ms));
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let reply = match words.as_slice() {
                ["FETCH", rid, tokens] => {
                    let want: u64 = tokens.parse().unwrap_or(0);
                    let held = self.held.lock().remove(*rid);
                    match held {
                        Some(h) if want == 0 || h.tokens == want => {
                            self.engine.lock().release(h.seq);
                            format!("OK {}\n", h.tokens)
                        }
                        Some(h) => {
                            // Not the prompt we hold: keep it, refuse.
                            self.held.lock().insert((*rid).to_owned(), h);
                            "MISSING\n".to_owned()
                        }
                        None => "MISSING\n".to_owned(),
                    }
                }
                ["WAIT", room, timeout] => {
                    let room: u64 = room.parse().unwrap_or(u64::MAX);
                    let deadline =
                        Instant::now() + Duration::from_millis(timeout.parse().unwrap_or(0));
                    let mut rooms = self.rooms.lock();
                    loop {
                        if let Some(t) = rooms.remove(&room) {
                            break format!("OK {t}\n");
                        }
                        if self.rooms_cv.wait_until(&mut rooms, deadline).timed_out() {
                            break match rooms.remove(&room) {
                                Some(t) => format!("OK {t}\n"),
                                None => "TIMEOUT\n".to_owned(),
                            };
                        }
                    }
                }
                _ => "ERROR unknown command\n".to_owned(),
            };
            if w.write_all(reply.as_bytes()).is_err() {
                return;
            }
            line.clear();
        }
    }
}

/// One request/answer line over a fresh side-channel connection.
fn side_call(host: &str, port: u64, line: &str, timeout: Duration) -> Result<String, String> {
    let port = u16::try_from(port).map_err(|_| format!("bad port {port}"))?;
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {host}"))?;
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("side channel {host}:{port} unreachable: {e}"))?;
    let _ = conn.set_read_timeout(Some(timeout));
    let mut w = conn.try_clone().map_err(|e| e.to_string())?;
    w.write_all(line.as_bytes()).map_err(|e| format!("side channel write: {e}"))?;
    let mut reply = String::new();
    BufReader::new(conn).read_line(&mut reply).map_err(|e| format!("side channel read: {e}"))?;
    Ok(reply)
}
