//! Protocol detection: read the first bytes a client sends and decide
//! whether the connection is HTTP/1.x, HTTP/2 with prior knowledge, a TLS
//! ClientHello, or something else (opaque TCP). The bytes read are replayed
//! to whoever handles the connection, so detection is invisible.
//!
//! A client that sends nothing within the timeout is handled as opaque: a
//! server-speaks-first protocol on an undeclared port must not stall.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest token we need to see: the HTTP/2 preface.
const MAX_PEEK: usize = H2_PREFACE.len();
/// How many bytes of blank lines, or of a method with no space after it
/// yet, detection reads before calling the connection HTTP/1. Parsers set
/// no such limit (httparse, hence hyper, reads any number of blank lines
/// and a method of any length: fuzzing found `getget&888…POST /charges`,
/// 33 characters, read as a request by httparse), so relaying such a
/// connection as opaque could carry a request past the access checks
/// with a client's own `weft-client-id`; the HTTP server answers what it
/// cannot parse. The bound also caps what detection buffers.
const MAX_UNDECIDED: usize = 64;
/// Methods that make a request line as soon as their space is seen
/// (`CONNECT`'s target is a bare `host:port`).
const COMMON_METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tls,
    Opaque,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tls => "tls",
            Protocol::Opaque => "opaque",
        }
    }
}

/// Decides from a prefix, or `None` when more bytes are needed.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    if prefix.is_empty() {
        return None;
    }
    // TLS record: handshake (0x16), version 3.x.
    if prefix[0] == 0x16 {
        return match prefix.get(1) {
            None => None,
            Some(3) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    // Empty lines before a request line: RFC 9112 §2.2 asks a server to
    // ignore at least one, and the usual HTTP/1 parsers (httparse, hence
    // hyper; nginx; Node's llhttp) skip any number. So the application
    // would read a request line after them as HTTP: it is HTTP here too,
    // or a request could travel as opaque TCP past the access checks and
    // with a client's own `weft-client-id`. What follows them must still
    // look like a request line: many binary protocols start with 0x0a or
    // 0x0d (a protobuf field 1, a length prefix).
    let blank = prefix
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    if blank >= MAX_UNDECIDED {
        return Some(Protocol::Http1);
    }
    if blank > 0 {
        return request_line(&prefix[blank..]);
    }
    let n = prefix.len().min(MAX_PEEK);
    if H2_PREFACE[..n] == prefix[..n] {
        return if n == MAX_PEEK {
            Some(Protocol::Http2)
        } else {
            None
        };
    }
    request_line(prefix)
}

/// Whether `prefix` starts an HTTP/1 request line: a method, one space,
/// then, for a method other than the common upper-case ones, how a request
/// target starts: `/` (origin form), `*` (OPTIONS *) or `http://` /
/// `https://` in any case (absolute form). A method is any token (RFC 9110
/// §9.1, §5.6.2), in any case: parsers accept `get` or an extension
/// method, and some applications treat `get` as GET. Any method, not only
/// a list: a request with a rarer one must not pass as opaque TCP, past the
/// per-request access checks and the removal of a client's
/// `weft-client-id`. The target check keeps text protocols that also start
/// with a word and a space (memcached's `get hits`) opaque.
fn request_line(prefix: &[u8]) -> Option<Protocol> {
    let method = prefix.iter().take_while(|b| is_tchar(**b)).count();
    if method >= MAX_UNDECIDED {
        return Some(Protocol::Http1);
    }
    if method == prefix.len() {
        return None;
    }
    if method == 0 || prefix[method] != b' ' {
        return Some(Protocol::Opaque);
    }
    if COMMON_METHODS.contains(&&prefix[..method]) {
        return Some(Protocol::Http1);
    }
    let target = &prefix[method + 1..];
    match target.first() {
        None => None,
        Some(b'/' | b'*') => Some(Protocol::Http1),
        Some(b'h' | b'H') => {
            let mut undecided = false;
            for scheme in [&b"http://"[..], b"https://"] {
                let n = target.len().min(scheme.len());
                if target[..n].eq_ignore_ascii_case(&scheme[..n]) {
                    if n == scheme.len() {
                        return Some(Protocol::Http1);
                    }
                    undecided = true;
                }
            }
            if undecided {
                None
            } else {
                Some(Protocol::Opaque)
            }
        }
        Some(_) => Some(Protocol::Opaque),
    }
}

/// A `tchar` of RFC 9110 §5.6.2: what a token, such as a method, is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The outcome of detection: the protocol, the stream with its consumed
/// bytes ready to replay, and whether the timeout decided.
pub struct Detected<S> {
    pub protocol: Protocol,
    pub io: PrefixedIo<S>,
    pub timed_out: bool,
}

/// Reads until [`classify`] decides, the peer closes, or `timeout` passes.
pub async fn detect<S: AsyncRead + Unpin>(mut io: S, timeout: Duration) -> io::Result<Detected<S>> {
    let mut buf = BytesMut::with_capacity(MAX_PEEK);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(protocol) = classify(&buf) {
            return Ok(Detected {
                protocol,
                io: PrefixedIo::new(buf.freeze(), io),
                timed_out: false,
            });
        }
        let mut chunk = [0u8; MAX_PEEK];
        let want = MAX_PEEK - buf.len().min(MAX_PEEK - 1);
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..want])).await {
            Ok(Ok(0)) => {
                // Closed before deciding: whatever it was, it is opaque now.
                return Ok(Detected {
                    protocol: Protocol::Opaque,
                    io: PrefixedIo::new(buf.freeze(), io),
                    timed_out: false,
                });
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Ok(Detected {
                    protocol: Protocol::Opaque,
                    io: PrefixedIo::new(buf.freeze(), io),
                    timed_out: true,
                });
            }
        }
    }
}

/// A stream that first yields `prefix`, then reads from `inner`.
pub struct PrefixedIo<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> PrefixedIo<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// The longest first record a ClientHello is read into: one TLS record.
const MAX_HELLO: usize = 5 + 16 * 1024;

/// Reads the whole first TLS record of a connection detected as TLS and
/// parses its ClientHello; the bytes stay buffered for whoever handles the
/// connection next (the TLS acceptor, or an opaque relay).
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    io: PrefixedIo<S>,
    timeout: Duration,
) -> io::Result<(crate::proxy::hello::Hello, PrefixedIo<S>)> {
    use crate::proxy::hello::{Hello, parse};
    let PrefixedIo { prefix, mut inner } = io;
    let mut buf = BytesMut::from(prefix);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let hello = parse(&buf);
        let want = match hello {
            Hello::NeedMore(n) if n <= MAX_HELLO => n,
            _ => return Ok((hello, PrefixedIo::new(buf.freeze(), inner))),
        };
        buf.reserve(want - buf.len());
        match tokio::time::timeout_at(deadline, inner.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return Ok((Hello::Other, PrefixedIo::new(buf.freeze(), inner))),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefixedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        let cases: [(&[u8], Option<Protocol>); 44] = [
            (b"", None),
            (b"GE", None),
            (b"GET / HTTP/1.1\r\n", Some(Protocol::Http1)),
            (b"DELETE /x", Some(Protocol::Http1)),
            (b"GETX", None),
            (b"GETX /", Some(Protocol::Http1)),
            (b"GET", None),
            (b"GET ", Some(Protocol::Http1)),
            (b"CONNECT api.example:443 HTTP/1.1", Some(Protocol::Http1)),
            (b"MKCOL", None),
            (b"MKCOL ", None),
            (b"PROPFIND /dav/", Some(Protocol::Http1)),
            (b"QUERY /search", Some(Protocol::Http1)),
            (b"VERSION-CONTROL /", Some(Protocol::Http1)),
            (b"OPTIONS * HTTP/1.1", Some(Protocol::Http1)),
            (b"GET http://a/ HTTP/1.1", Some(Protocol::Http1)),
            (b"PING\r\n", Some(Protocol::Opaque)),
            (b"AUTH secret\r\n", Some(Protocol::Opaque)),
            // Any token as a method, in any case: parsers accept them.
            (b"get / HTTP/1.1", Some(Protocol::Http1)),
            (b"Post /charges", Some(Protocol::Http1)),
            (b"X_CUSTOM.1 /", Some(Protocol::Http1)),
            (b"GET HTTP://a/ HTTP/1.1", Some(Protocol::Http1)),
            // Text protocols that also start with a word and a space.
            (b"get hits\r\n", Some(Protocol::Opaque)),
            (b"get h", None),
            (b"get https://a/ HTTP/1.1", Some(Protocol::Http1)),
            // Empty lines before the request line (RFC 9112 2.2).
            (b"\r\nGET / HTTP/1.1", Some(Protocol::Http1)),
            (b"\n\r\nget /x", Some(Protocol::Http1)),
            (b"\n", None),
            (b"\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n", None),
            // ... but not binary that starts with 0x0a: a protobuf field 1.
            (b"\n\x08\x01\x12\x04ping", Some(Protocol::Opaque)),
            (b"\r\x00\x00\x00", Some(Protocol::Opaque)),
            (b"ABCDEFGHIJKLMNOPQRSTU", None),
            // A method of any length (parsers take one): HTTP.
            (
                b"getget&8888888888888888888888POST /charges",
                Some(Protocol::Http1),
            ),
            (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ /", Some(Protocol::Http1)),
            (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ hits", Some(Protocol::Opaque)),
            (&[b'A'; 64], Some(Protocol::Http1)),
            (&[b'\n'; 64], Some(Protocol::Http1)),
            (b"PRI * HTTP/2.0\r\n", None),
            (H2_PREFACE, Some(Protocol::Http2)),
            // A request line with method PRI: HTTP/1, not the preface.
            (b"PRI * HTTP/1.1", Some(Protocol::Http1)),
            (&[0x16, 0x03, 0x01, 0x02], Some(Protocol::Tls)),
            (&[0x16], None),
            (&[0x16, 0x09], Some(Protocol::Opaque)),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Some(Protocol::Opaque)),
        ];
        for (input, expected) in cases {
            assert_eq!(
                classify(input),
                expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[tokio::test]
    async fn replays_what_it_read() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"POST /pay HTTP/1.1\r\n")
            .await
            .expect("write");
        let d = detect(server, Duration::from_secs(5))
            .await
            .expect("detect");
        assert_eq!(d.protocol, Protocol::Http1);
        let mut io = d.io;
        drop(client);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, b"POST /pay HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn silence_is_opaque_after_the_timeout() {
        let (_client, server) = tokio::io::duplex(64);
        let d = detect(server, Duration::from_millis(50))
            .await
            .expect("detect");
        assert_eq!((d.protocol, d.timed_out), (Protocol::Opaque, true));
    }
}
