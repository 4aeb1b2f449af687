//! A small HTTP/1.1 server side: request parsing (Content-Length and chunked
//! bodies, keep-alive) and responses (fixed length, or a chunked stream for
//! SSE). Enough for an engine simulator; not a general web server.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;

/// Largest header section accepted.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Largest body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// A parsed request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    /// Header names in lowercase, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub keep_alive: bool,
}

impl Request {
    /// The first header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Why a request could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection between requests.
    Closed,
    Io(io::Error),
    /// Malformed; answer 400 and close.
    Bad(&'static str),
    /// Too large; answer 413 and close.
    TooLarge,
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

fn read_line<R: BufRead>(r: &mut R, budget: &mut usize) -> Result<String, ReadError> {
    let mut line = Vec::new();
    let n = r.take(*budget as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(ReadError::Closed);
    }
    if n > *budget {
        return Err(ReadError::TooLarge);
    }
    *budget -= n;
    if !line.ends_with(b"\n") {
        return Err(ReadError::Bad("truncated line"));
    }
    line.pop();
    if line.ends_with(b"\r") {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| ReadError::Bad("header is not UTF-8"))
}

/// Reads one request from a buffered connection.
pub fn read_request<R: BufRead>(r: &mut R) -> Result<Request, ReadError> {
    let mut budget = MAX_HEADER_BYTES;
    let mut line = read_line(r, &mut budget)?;
    // Tolerate empty lines before a request (RFC 9112 §2.2).
    while line.is_empty() {
        line = read_line(r, &mut budget)?;
    }
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Bad("bad request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ReadError::Bad("unsupported HTTP version"));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (target.to_owned(), String::new()),
    };
    let mut req = Request {
        method: method.to_owned(),
        path,
        query,
        keep_alive: version == "HTTP/1.1",
        ..Request::default()
    };
    loop {
        let line = match read_line(r, &mut budget) {
            Err(ReadError::Closed) => return Err(ReadError::Bad("truncated headers")),
            other => other?,
        };
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').ok_or(ReadError::Bad("bad header line"))?;
        req.headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    if let Some(c) = req.header("connection") {
        let c = c.to_ascii_lowercase();
        if c.contains("close") {
            req.keep_alive = false;
        } else if c.contains("keep-alive") {
            req.keep_alive = true;
        }
    }
    let chunked =
        req.header("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let mut b = MAX_HEADER_BYTES;
            let size_line = read_line(r, &mut b)?;
            let size_hex = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| ReadError::Bad("bad chunk size"))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !read_line(r, &mut b)?.is_empty() {}
                break;
            }
            if req.body.len() + size > MAX_BODY_BYTES {
                return Err(ReadError::TooLarge);
            }
            let start = req.body.len();
            req.body.resize(start + size, 0);
            r.read_exact(&mut req.body[start..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
            if &crlf != b"\r\n" {
                return Err(ReadError::Bad("bad chunk end"));
            }
        }
    } else if let Some(cl) = req.header("content-length") {
        let n: usize = cl.parse().map_err(|_| ReadError::Bad("bad Content-Length"))?;
        if n > MAX_BODY_BYTES {
            return Err(ReadError::TooLarge);
        }
        req.body.resize(n, 0);
        r.read_exact(&mut req.body)?;
    }
    Ok(req)
}

/// The reason phrase of a status.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// The head of a response; `length` None means chunked.
fn head(
    status: u16,
    content_type: &str,
    length: Option<usize>,
    keep_alive: bool,
    extra: &[(&str, &str)],
) -> String {
    let framing = match length {
        Some(n) => format!("Content-Length: {n}\r\n"),
        None => "Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n".to_owned(),
    };
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\n{framing}Connection: {}\r\n",
        reason(status),
        if keep_alive { "keep-alive" } else { "close" }
    );
    for (k, v) in extra {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head
}

/// Writes a complete response.
pub fn write_response<W: Write>(
    w: &mut W,
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    extra: &[(&str, &str)],
) -> io::Result<()> {
    let head = head(status, content_type, Some(body.len()), keep_alive, extra);
    let mut buf = Vec::with_capacity(head.len() + body.len());
    buf.extend_from_slice(head.as_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf)?;
    w.flush()
}

/// A chunked (streaming) response in progress.
pub struct Stream<'a, W: Write> {
    w: &'a mut W,
}

impl<'a, W: Write> Stream<'a, W> {
    /// Sends the head of a chunked response.
    pub fn start(
        w: &'a mut W,
        status: u16,
        content_type: &str,
        keep_alive: bool,
        extra: &[(&str, &str)],
    ) -> io::Result<Stream<'a, W>> {
        let head = head(status, content_type, None, keep_alive, extra);
        w.write_all(head.as_bytes())?;
        w.flush()?;
        Ok(Stream { w })
    }

    /// Sends one chunk and flushes it.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(b"\r\n");
        self.w.write_all(&buf)?;
        self.w.flush()
    }

    /// Ends the response.
    pub fn finish(self) -> io::Result<()> {
        self.w.write_all(b"0\r\n\r\n")?;
        self.w.flush()
    }
}

/// A buffered reader and a writer over one connection.
pub fn split(stream: TcpStream) -> io::Result<(BufReader<TcpStream>, TcpStream)> {
    let w = stream.try_clone()?;
    Ok((BufReader::with_capacity(16 * 1024, stream), w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn content_length_and_keepalive() {
        let raw = b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-Request-Id: r1\r\n\r\nhelloGET /health HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut c = Cursor::new(&raw[..]);
        let r = read_request(&mut c).unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.query.as_str()),
            ("POST", "/v1/completions", "x=1")
        );
        assert_eq!(r.body, b"hello");
        assert_eq!(r.header("x-request-id"), Some("r1"));
        assert!(r.keep_alive);
        let r2 = read_request(&mut c).unwrap();
        assert_eq!(r2.path, "/health");
        assert!(!r2.keep_alive);
        assert!(matches!(read_request(&mut c), Err(ReadError::Closed)));
    }

    #[test]
    fn chunked_body() {
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let r = read_request(&mut Cursor::new(&raw[..])).unwrap();
        assert_eq!(r.body, b"abcde");
    }

    #[test]
    fn malformed() {
        assert!(matches!(
            read_request(&mut Cursor::new(&b"garbage\r\n\r\n"[..])),
            Err(ReadError::Bad(_))
        ));
        assert!(matches!(
            read_request(&mut Cursor::new(&b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"[..])),
            Err(ReadError::Bad("bad Content-Length"))
        ));
        assert!(matches!(
            read_request(&mut Cursor::new(
                &b"POST / HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n"[..]
            )),
            Err(ReadError::TooLarge)
        ));
    }

    #[test]
    fn responses() {
        let mut out = Vec::new();
        write_response(&mut out, 200, "application/json", b"{}", true, &[("X-A", "1")]).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(
            s.contains("Content-Length: 2\r\n")
                && s.contains("X-A: 1\r\n")
                && s.ends_with("\r\n\r\n{}")
        );
        let mut out = Vec::new();
        let mut st = Stream::start(&mut out, 200, "text/event-stream", true, &[]).unwrap();
        st.send(b"data: x\n\n").unwrap();
        st.finish().unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("Transfer-Encoding: chunked")
                && s.ends_with("9\r\ndata: x\n\n\r\n0\r\n\r\n")
        );
    }
}
