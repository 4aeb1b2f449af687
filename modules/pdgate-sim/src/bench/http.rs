//! pd-bench's HTTP/1.1 client: the target URL, an incremental response
//! parser (Content-Length, chunked, or read to close; 1xx skipped) that
//! hands the body to a sink as it arrives, and a keep-alive connection
//! that sends one request at a time over a blocking `TcpStream`.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Largest response head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Longest chunk-size or trailer line accepted.
const MAX_LINE_BYTES: usize = 4096;

/// Where requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host[:port]` as given, for the `Host` header.
    pub authority: String,
    pub addr: SocketAddr,
    /// A path prefix before `/v1/...` (empty for none).
    pub prefix: String,
}

/// Parses `http://host[:port][/prefix]` and resolves the host (first
/// address). A trailing `/v1` is dropped, so an OpenAI `base_url` works too.
pub fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs are supported")?;
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    if authority.is_empty() {
        return Err("no host".into());
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => {
            (h, p.parse::<u16>().map_err(|_| format!("bad port \"{p}\""))?)
        }
        _ => (authority, 80),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve \"{host}\": {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve \"{host}\""))?;
    let path = path.trim_end_matches('/');
    let prefix = path.strip_suffix("/v1").unwrap_or(path).to_owned();
    Ok(Target { authority: authority.to_owned(), addr, prefix })
}

/// How the body of a response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// Read to the end of the connection.
    Close,
}

/// A response's status line and the headers pd-bench looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// The connection may carry another request afterwards.
    pub keep_alive: bool,
    /// `Content-Type`, lowercase.
    pub content_type: String,
    pub framing: Framing,
}

impl Head {
    pub fn is_sse(&self) -> bool {
        self.content_type.starts_with("text/event-stream")
    }
}

/// Receives a response as it is parsed: the head once, then body bytes
/// (de-chunked) in as many pieces as they arrived.
pub trait Sink {
    fn head(&mut self, head: &Head);
    fn body(&mut self, data: &[u8]);
}

/// Why a response could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Not HTTP, or broken framing.
    Bad(String),
    /// The connection closed before the response was complete.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailer,
    Close,
    Done,
}

/// An incremental HTTP/1.1 response parser.
#[derive(Debug, Clone)]
pub struct ResponseParser {
    state: State,
    /// The head, or the current chunk-size/trailer line, so far.
    line: Vec<u8>,
    head: Option<Head>,
    /// Bytes arrived after the response (the connection is not reusable).
    trailing: bool,
}

impl Default for ResponseParser {
    fn default() -> Self {
        ResponseParser::new()
    }
}

/// The end of a head in `buf` (the index after its blank line), accepting
/// bare LF line ends too.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(p) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let nl = i + p;
        match buf.get(nl + 1..nl + 3) {
            Some([b'\n', _]) => return Some(nl + 2),
            Some([b'\r', b'\n']) => return Some(nl + 3),
            _ if buf.get(nl + 1) == Some(&b'\n') => return Some(nl + 2),
            _ => i = nl + 1,
        }
    }
    None
}

fn parse_head(bytes: &[u8]) -> Result<Head, ParseError> {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split_ascii_whitespace();
    let version = parts.next().unwrap_or("");
    let bad = || ParseError::Bad(format!("bad status line \"{}\"", status_line.trim()));
    if !version.starts_with("HTTP/1.") {
        return Err(bad());
    }
    let status = parts.next().and_then(|s| s.parse::<u16>().ok()).ok_or_else(bad)?;
    let mut head = Head {
        status,
        keep_alive: version != "HTTP/1.0",
        content_type: String::new(),
        framing: Framing::Close,
    };
    let (mut chunked, mut length) = (false, None);
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(ParseError::Bad(format!("bad header line \"{line}\"")));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "connection" => {
                for token in value.split(',').map(|t| t.trim().to_ascii_lowercase()) {
                    match token.as_str() {
                        "close" => head.keep_alive = false,
                        "keep-alive" => head.keep_alive = true,
                        _ => {}
                    }
                }
            }
            "transfer-encoding" => {
                chunked = value.to_ascii_lowercase().split(',').any(|t| t.trim() == "chunked")
            }
            "content-length" => {
                length = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| ParseError::Bad(format!("bad Content-Length \"{value}\"")))?,
                )
            }
            "content-type" => head.content_type = value.to_ascii_lowercase(),
            _ => {}
        }
    }
    head.framing = if status < 200 || status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        head.keep_alive = false;
        Framing::Close
    };
    Ok(head)
}

impl ResponseParser {
    pub fn new() -> ResponseParser {
        ResponseParser { state: State::Head, line: Vec::new(), head: None, trailing: false }
    }

    pub fn head(&self) -> Option<&Head> {
        self.head.as_ref()
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The connection can carry the next request.
    pub fn reusable(&self) -> bool {
        self.is_done() && !self.trailing && self.head.as_ref().is_some_and(|h| h.keep_alive)
    }

    /// Takes the next bytes of a line (through its LF) into `self.line`;
    /// returns how many bytes of `data` it used and whether the line is
    /// complete.
    fn take_line(&mut self, data: &[u8]) -> Result<(usize, bool), ParseError> {
        let (used, complete) = match data.iter().position(|&b| b == b'\n') {
            Some(p) => (p + 1, true),
            None => (data.len(), false),
        };
        self.line.extend_from_slice(&data[..used]);
        if self.line.len() > MAX_LINE_BYTES {
            return Err(ParseError::Bad("line too long in the chunked body".into()));
        }
        Ok((used, complete))
    }

    /// The completed line without its line end, clearing the buffer.
    fn finish_line(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.line).trim_end_matches(['\r', '\n']).to_owned();
        self.line.clear();
        s
    }

    /// Parses the next bytes, giving the head and body to `sink`.
    pub fn feed(&mut self, mut data: &[u8], sink: &mut impl Sink) -> Result<(), ParseError> {
        while !data.is_empty() {
            match self.state {
                State::Head => {
                    let old = self.line.len();
                    self.line.extend_from_slice(data);
                    let Some(end) = head_end(&self.line, old.saturating_sub(2)) else {
                        if self.line.len() > MAX_HEAD_BYTES {
                            return Err(ParseError::Bad("response head too large".into()));
                        }
                        return Ok(());
                    };
                    data = &data[end - old..];
                    let head = parse_head(&self.line[..end])?;
                    self.line.clear();
                    if head.status < 200 && head.status != 101 {
                        continue; // 100 Continue, 103 Early Hints: the answer follows
                    }
                    sink.head(&head);
                    self.state = match head.framing {
                        Framing::Length(0) => State::Done,
                        Framing::Length(n) => State::Length(n),
                        Framing::Chunked => State::ChunkSize,
                        Framing::Close => State::Close,
                    };
                    self.head = Some(head);
                }
                State::Length(left) | State::ChunkData(left) => {
                    let n = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    sink.body(&data[..n]);
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), _) => State::Length(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                }
                State::ChunkSize | State::ChunkEnd | State::Trailer => {
                    let (used, complete) = self.take_line(data)?;
                    data = &data[used..];
                    if !complete {
                        continue;
                    }
                    let line = self.finish_line();
                    self.state = match self.state {
                        State::ChunkSize => {
                            let hex = line.split(';').next().unwrap_or("").trim();
                            match u64::from_str_radix(hex, 16) {
                                Ok(0) => State::Trailer,
                                Ok(n) => State::ChunkData(n),
                                Err(_) => {
                                    return Err(ParseError::Bad(format!(
                                        "bad chunk size \"{line}\""
                                    )))
                                }
                            }
                        }
                        State::ChunkEnd if line.is_empty() => State::ChunkSize,
                        State::ChunkEnd => {
                            return Err(ParseError::Bad("chunk data longer than its size".into()))
                        }
                        _ if line.is_empty() => State::Done,
                        _ => State::Trailer,
                    };
                }
                State::Close => {
                    sink.body(data);
                    data = &[];
                }
                State::Done => {
                    self.trailing = true;
                    data = &[];
                }
            }
        }
        Ok(())
    }

    /// The connection closed: fine for a read-to-close body, otherwise the
    /// response is cut short.
    pub fn eof(&mut self) -> Result<(), ParseError> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(ParseError::Closed),
        }
    }
}

/// Why a request failed at the HTTP level.
#[derive(Debug)]
pub enum Failure {
    Connect(io::Error),
    Io(io::Error),
    Timeout,
    Closed,
    Bad(String),
}

impl Failure {
    /// The error class pd-bench counts by.
    pub fn class(&self) -> String {
        match self {
            Failure::Connect(e) if is_timeout(e) => "connect: timed out".into(),
            Failure::Connect(e) => format!("connect: {}", e.kind()),
            Failure::Io(e) if is_timeout(e) => "timeout".into(),
            Failure::Io(e) => format!("io: {}", e.kind()),
            Failure::Timeout => "timeout".into(),
            Failure::Closed => "connection closed early".into(),
            Failure::Bad(_) => "bad response".into(),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// An open keep-alive connection.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    /// Where it goes.
    pub addr: SocketAddr,
    /// Requests answered on it.
    pub uses: u64,
}

impl Conn {
    /// Connects, with `timeout` for connecting and for each read or write.
    pub fn open(addr: &SocketAddr, timeout: Duration) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Conn { stream, addr: *addr, uses: 0 })
    }

    /// One request and its response. Returns whether the connection can be
    /// reused, or the failure and whether any response byte had arrived.
    fn round_trip(
        &mut self,
        request: &[u8],
        deadline: Instant,
        buf: &mut [u8],
        sink: &mut impl Sink,
    ) -> Result<bool, (Failure, bool)> {
        self.stream.write_all(request).map_err(|e| (Failure::Io(e), false))?;
        let mut parser = ResponseParser::new();
        let mut got = false;
        loop {
            let n = match self.stream.read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err((Failure::Io(e), got)),
            };
            if n == 0 {
                return match parser.eof() {
                    Ok(()) => Ok(false),
                    Err(_) => Err((Failure::Closed, got)),
                };
            }
            got = true;
            parser.feed(&buf[..n], sink).map_err(|e| match e {
                ParseError::Bad(m) => (Failure::Bad(m), true),
                ParseError::Closed => (Failure::Closed, true),
            })?;
            if parser.is_done() {
                return Ok(parser.reusable());
            }
            if Instant::now() > deadline {
                return Err((Failure::Timeout, true));
            }
        }
    }
}

/// Sends `request` to `addr` and reads the answer into `sink`, on `slot`'s
/// connection when it holds one (which is left there when it can carry the
/// next request). A reused connection that fails before any byte of the
/// answer (the server closed it while idle) is replaced once.
pub fn exchange(
    slot: &mut Option<Conn>,
    addr: &SocketAddr,
    timeout: Duration,
    request: &[u8],
    buf: &mut [u8],
    sink: &mut impl Sink,
) -> Result<(), Failure> {
    let deadline = Instant::now() + timeout;
    let mut retried = false;
    loop {
        let reused = slot.is_some();
        let conn = match slot {
            Some(c) => c,
            None => slot.insert(Conn::open(addr, timeout).map_err(Failure::Connect)?),
        };
        match conn.round_trip(request, deadline, buf, sink) {
            Ok(reusable) => {
                conn.uses += 1;
                if !reusable {
                    *slot = None;
                }
                return Ok(());
            }
            Err((failure, got)) => {
                *slot = None;
                let stale = matches!(&failure, Failure::Closed)
                    || matches!(&failure, Failure::Io(e) if !is_timeout(e));
                if reused && !got && stale && !retried {
                    retried = true;
                    continue;
                }
                return Err(failure);
            }
        }
    }
}

/// A sink that keeps the whole answer.
#[derive(Debug, Default)]
pub struct Collect {
    pub head: Option<Head>,
    pub body: Vec<u8>,
}

impl Sink for Collect {
    fn head(&mut self, head: &Head) {
        self.head = Some(head.clone());
    }
    fn body(&mut self, data: &[u8]) {
        self.body.extend_from_slice(data);
    }
}

/// A GET on a fresh connection: status and body.
pub fn get(target: &Target, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>), Failure> {
    let req = format!(
        "GET {}{path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        target.prefix, target.authority
    );
    let mut c = Collect::default();
    let mut buf = vec![0; 16 * 1024];
    exchange(&mut None, &target.addr, timeout, req.as_bytes(), &mut buf, &mut c)?;
    Ok((c.head.map_or(0, |h| h.status), c.body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes.
    fn parse(input: &[u8], step: usize) -> (Result<(), ParseError>, Collect, ResponseParser) {
        let mut p = ResponseParser::new();
        let mut c = Collect::default();
        for piece in input.chunks(step) {
            if let Err(e) = p.feed(piece, &mut c) {
                return (Err(e), c, p);
            }
        }
        (Ok(()), c, p)
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
        Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\nA\r\n, world!!!\r\n0\r\nX-T: 1\r\n\r\n";

    #[test]
    fn chunked_in_any_pieces() {
        for step in 1..=CHUNKED.len() {
            let (r, c, p) = parse(CHUNKED, step);
            assert_eq!(r, Ok(()), "step {step}");
            assert!(p.is_done() && p.reusable(), "step {step}");
            assert_eq!(c.body, b"hello, world!!!", "step {step}");
            let h = c.head.unwrap();
            assert_eq!((h.status, h.framing, h.is_sse()), (200, Framing::Chunked, true));
        }
    }

    #[test]
    fn content_length_and_keep_alive() {
        let r = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nConnection: close\r\n\r\nbusy";
        for step in [1, 3, r.len()] {
            let (res, c, p) = parse(r, step);
            assert_eq!(res, Ok(()));
            assert!(p.is_done() && !p.reusable());
            assert_eq!(c.body, b"busy");
            assert_eq!(c.head.unwrap().status, 503);
        }
        // HTTP/1.0 closes unless told otherwise; bare LF line ends are fine.
        let (_, c, p) = parse(b"HTTP/1.0 200 OK\nContent-Length: 2\n\nok", 4);
        assert_eq!((c.body.as_slice(), p.reusable()), (&b"ok"[..], false));
        let (_, _, p) =
            parse(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", 7);
        assert!(p.is_done() && p.reusable());
        // Bytes after the response: not reusable.
        let (_, _, p) = parse(b"HTTP/1.1 204 No Content\r\n\r\nextra", 100);
        assert!(p.is_done() && !p.reusable());
    }

    #[test]
    fn read_to_close_and_short_bodies() {
        let (r, c, mut p) = parse(b"HTTP/1.1 200 OK\r\n\r\nsome body", 5);
        assert_eq!(r, Ok(()));
        assert!(!p.is_done());
        assert_eq!(p.eof(), Ok(()));
        assert!(p.is_done() && !p.reusable());
        assert_eq!(c.body, b"some body");
        let (_, _, mut p) = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", 5);
        assert_eq!(p.eof(), Err(ParseError::Closed));
        let (_, _, mut p) = parse(&CHUNKED[..CHUNKED.len() - 2], 9);
        assert_eq!(p.eof(), Err(ParseError::Closed));
    }

    #[test]
    fn interim_responses_are_skipped() {
        let r = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx";
        for step in [1, 10, r.len()] {
            let (res, c, p) = parse(r, step);
            assert_eq!(res, Ok(()));
            assert!(p.is_done());
            assert_eq!((c.head.unwrap().status, c.body.as_slice()), (200, &b"x"[..]));
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(parse(b"SSH-2.0-OpenSSH\r\n\r\n", 4).0, Err(ParseError::Bad(_))));
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(matches!(parse(bad, 4).0, Err(ParseError::Bad(_))));
        let long = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n";
        assert!(matches!(parse(long, 100).0, Err(ParseError::Bad(_))));
    }

    #[test]
    fn urls() {
        let t = parse_url("http://127.0.0.1:8000").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.addr.port(), t.prefix.as_str()),
            ("127.0.0.1:8000", 8000, "")
        );
        let t = parse_url("http://127.0.0.1:9/v1/").unwrap();
        assert_eq!(t.prefix, "");
        let t = parse_url("http://127.0.0.1/proxy/v1").unwrap();
        assert_eq!((t.addr.port(), t.prefix.as_str()), (80, "/proxy"));
        let t = parse_url("http://[::1]:8080").unwrap();
        assert_eq!(t.addr, "[::1]:8080".parse().unwrap());
        assert!(parse_url("https://x").is_err());
        assert!(parse_url("http://127.0.0.1:99999").is_err());
        assert!(parse_url("http://").is_err());
    }
}
