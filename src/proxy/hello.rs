//! Reading a TLS ClientHello without terminating TLS: the inbound proxy
//! tells mesh TLS (ALPN `weft/...`) from an application's own end-to-end
//! TLS, which must pass through untouched. Only the ALPN and SNI are
//! extracted; every length is bounds-checked, and the parser is fuzzed.

/// TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;
const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const EXT_SNI: u16 = 0x0000;
const EXT_ALPN: u16 = 0x0010;

/// What a buffer holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hello {
    /// The first record is incomplete: this many bytes are needed in all.
    NeedMore(usize),
    /// A ClientHello, with what the mesh cares about.
    ClientHello {
        alpn: Vec<Vec<u8>>,
        sni: Option<String>,
    },
    /// Not a single-record ClientHello the mesh understands.
    Other,
}

impl Hello {
    /// Whether the client asked for mesh TLS.
    pub fn is_mesh(&self) -> bool {
        matches!(self, Hello::ClientHello { alpn, .. } if alpn.iter().any(|p| p.starts_with(b"weft/")))
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }

    /// A sub-cursor over a length-prefixed vector.
    fn vec8(&mut self) -> Option<Cursor<'a>> {
        let n = usize::from(self.u8()?);
        self.take(n).map(Cursor)
    }

    fn vec16(&mut self) -> Option<Cursor<'a>> {
        let n = usize::from(self.u16()?);
        self.take(n).map(Cursor)
    }
}

/// Parses the first TLS record of `buf`.
pub fn parse(buf: &[u8]) -> Hello {
    if buf.len() < RECORD_HEADER {
        return if buf.first().is_none_or(|b| *b == HANDSHAKE) {
            Hello::NeedMore(RECORD_HEADER)
        } else {
            Hello::Other
        };
    }
    if buf[0] != HANDSHAKE || buf[1] != 3 {
        return Hello::Other;
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    let total = RECORD_HEADER + len;
    if buf.len() < total {
        return Hello::NeedMore(total);
    }
    client_hello(&buf[RECORD_HEADER..total]).unwrap_or(Hello::Other)
}

fn client_hello(record: &[u8]) -> Option<Hello> {
    let mut c = Cursor(record);
    if c.u8()? != CLIENT_HELLO {
        return None;
    }
    // A ClientHello split across records is not what a mesh proxy sends.
    let len = c.u24()?;
    let mut body = Cursor(c.take(len)?);
    body.take(2 + 32)?; // legacy version, random
    body.vec8()?; // session id
    body.vec16()?; // cipher suites
    body.vec8()?; // compression methods
    let mut alpn = Vec::new();
    let mut sni = None;
    if body.0.is_empty() {
        return Some(Hello::ClientHello { alpn, sni });
    }
    let mut exts = body.vec16()?;
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let mut data = exts.vec16()?;
        match kind {
            EXT_ALPN => {
                let mut list = data.vec16()?;
                while !list.0.is_empty() {
                    alpn.push(list.vec8()?.0.to_vec());
                }
            }
            EXT_SNI => {
                let mut list = data.vec16()?;
                while !list.0.is_empty() {
                    let name_type = list.u8()?;
                    let name = list.vec16()?;
                    if name_type == 0 {
                        sni = std::str::from_utf8(name.0).ok().map(str::to_owned);
                    }
                }
            }
            _ => {}
        }
    }
    Some(Hello::ClientHello { alpn, sni })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The first flight of a real rustls client.
    fn real_hello(alpn: &[&[u8]]) -> Vec<u8> {
        let mut config = rustls::ClientConfig::builder_with_provider(crate::proxy::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from("payments.payments.svc").expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("write hello");
        out
    }

    #[test]
    fn finds_alpn_and_sni_in_a_real_client_hello() {
        let bytes = real_hello(&[b"weft/h2", b"weft/http1"]);
        let hello = parse(&bytes);
        assert!(hello.is_mesh(), "{hello:?}");
        assert_eq!(
            hello,
            Hello::ClientHello {
                alpn: vec![b"weft/h2".to_vec(), b"weft/http1".to_vec()],
                sni: Some("payments.payments.svc".into())
            }
        );
        let app = parse(&real_hello(&[b"h2", b"http/1.1"]));
        assert!(!app.is_mesh(), "an application's own TLS is not mesh TLS");
        assert!(matches!(app, Hello::ClientHello { .. }));
    }

    #[test]
    fn asks_for_exactly_the_rest_of_the_record() {
        let bytes = real_hello(&[b"weft/tcp"]);
        assert_eq!(parse(&bytes[..3]), Hello::NeedMore(5));
        assert_eq!(parse(&bytes[..100]), Hello::NeedMore(bytes.len()));
        assert!(parse(&bytes).is_mesh());
    }

    #[test]
    fn junk_is_other_never_a_panic() {
        for junk in [
            &b"GET / HTTP/1.1\r\n"[..],
            &[0x16, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff],
            &[0x16, 3, 1, 0, 0],
            &[0x16, 3],
        ] {
            assert!(
                !matches!(parse(junk), Hello::ClientHello { .. }),
                "{junk:?}"
            );
        }
    }
}
