//! Connections to meshed destinations: mTLS originated by this proxy, with
//! the ALPN saying both "mesh TLS" and what runs inside (`weft/h2`,
//! `weft/http1`, `weft/tcp`), and the server's SPIFFE id checked against the
//! identities the config says serve the destination.
//!
//! A destination not (yet) enforcing STRICT may still have endpoints
//! without a sidecar, during a migration: when such an endpoint answers the
//! ClientHello with something that is not TLS (or hangs up), the proxy
//! falls back to plaintext and counts it. A certificate problem never falls
//! back, and a STRICT destination never does.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::metrics::{DstLabels, ProxyMetrics};
use super::tls::{ExpectedServer, MeshIdentity};

/// How long a TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TLS handshake may take once connected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A meshed destination as an outbound connection sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MeshTarget {
    pub server: ExpectedServer,
    /// Never fall back to plaintext.
    pub strict: bool,
}

impl MeshTarget {
    pub fn from_config(mesh: &crate::config::MeshedServer) -> Self {
        Self {
            server: ExpectedServer {
                namespace: mesh.namespace.clone(),
                service_accounts: mesh.service_accounts.clone(),
            },
            strict: mesh.strict,
        }
    }

    /// The same destination as served by one pod of ServiceAccount `sa`:
    /// that pod must present exactly `sa`'s identity. An account the
    /// Service does not list keeps the Service's list, which that pod's
    /// own certificate then fails.
    pub fn for_account(&self, sa: &str) -> Self {
        let listed = self.server.service_accounts.is_empty()
            || self.server.service_accounts.iter().any(|a| a == sa);
        let mut narrowed = self.clone();
        if listed {
            narrowed.server.service_accounts = vec![sa.to_owned()];
        }
        narrowed
    }
}

/// An upstream connection: mesh TLS, or plaintext after a fallback.
pub enum MeshStream {
    Tls(Box<TlsStream<TcpStream>>),
    Plain(TcpStream),
    /// TLS this proxy originated to a destination outside the mesh
    /// ([`super::origin`]): encrypted, but not mesh mTLS.
    Origin(Box<TlsStream<TcpStream>>),
}

impl MeshStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, MeshStream::Tls(_))
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshStream::Tls(s) | MeshStream::Origin(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MeshStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MeshStream::Tls(s) | MeshStream::Origin(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MeshStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MeshStream::Tls(s) | MeshStream::Origin(s) => {
                Pin::new(s.as_mut()).poll_write_vectored(cx, bufs)
            }
            MeshStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MeshStream::Tls(s) | MeshStream::Origin(s) => s.is_write_vectored(),
            MeshStream::Plain(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshStream::Tls(s) | MeshStream::Origin(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MeshStream::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshStream::Tls(s) | MeshStream::Origin(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MeshStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Who must serve, and the ALPN carried.
type ConfigKey = (ExpectedServer, &'static [u8]);

/// Opens mesh connections; one per proxy.
pub struct Originator {
    identity: Arc<MeshIdentity>,
    metrics: Arc<ProxyMetrics>,
    /// Client configs by expectation and ALPN. The certificate is resolved
    /// per handshake, so a cached config follows rotations.
    configs: Mutex<HashMap<ConfigKey, Arc<ClientConfig>>>,
}

impl Originator {
    pub fn new(identity: Arc<MeshIdentity>, metrics: Arc<ProxyMetrics>) -> Self {
        Self {
            identity,
            metrics,
            configs: Mutex::default(),
        }
    }

    fn config(
        &self,
        server: &ExpectedServer,
        alpn: &'static [u8],
    ) -> io::Result<Arc<ClientConfig>> {
        let mut map = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&(server.clone(), alpn)) {
            return Ok(c.clone());
        }
        let config = self
            .identity
            .client_config(server.clone(), alpn)
            .map_err(io::Error::other)?;
        map.insert((server.clone(), alpn), config.clone());
        Ok(config)
    }

    /// Connects to `addr` and establishes mesh TLS carrying `alpn`, falling
    /// back to plaintext only as the module documents.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        target: &MeshTarget,
        alpn: &'static [u8],
    ) -> io::Result<MeshStream> {
        let tcp = connect_tcp(addr).await?;
        if !self.identity.ready() {
            if target.strict {
                return Err(io::Error::other(format!(
                    "{addr} requires mesh TLS and this proxy has no identity loaded yet"
                )));
            }
            return Ok(MeshStream::Plain(tcp));
        }
        let connector = TlsConnector::from(self.config(&target.server, alpn)?);
        let name = ServerName::IpAddress(addr.ip().into());
        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp));
        let err = match handshake.await {
            Ok(Ok(tls)) => return Ok(MeshStream::Tls(Box::new(tls))),
            Ok(Err(e)) => e,
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"),
        };
        if target.strict || !peer_is_not_tls(&err) {
            if !super::tls::refused_by_verifier(&err) {
                self.metrics
                    .tls_handshake_failures
                    .get_or_create(&super::metrics::HandshakeLabels {
                        direction: super::metrics::Direction::Outbound,
                    })
                    .inc();
            }
            return Err(io::Error::new(
                err.kind(),
                format!("mesh TLS with {addr} failed: {err}"),
            ));
        }
        tracing::debug!(%addr, error = %err, "endpoint does not speak mesh TLS; plaintext fallback");
        self.metrics
            .plaintext_fallbacks
            .get_or_create(&DstLabels {
                dst: addr.to_string(),
            })
            .inc();
        Ok(MeshStream::Plain(connect_tcp(addr).await?))
    }
}

/// A TCP connection with the connect timeout and Nagle off.
pub async fn connect_tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out"),
            )
        })??;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Whether a failed handshake means the peer does not speak TLS at all
/// (an endpoint without a sidecar), rather than refusing us or our
/// certificate.
fn peer_is_not_tls(err: &io::Error) -> bool {
    if let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return matches!(
            tls,
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }
        );
    }
    matches!(
        err.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_peer_that_is_not_tls_allows_a_fallback() {
        let cases = [
            (io::Error::from(io::ErrorKind::UnexpectedEof), true),
            (io::Error::from(io::ErrorKind::ConnectionReset), true),
            (
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                ),
                true,
            ),
            (
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
                ),
                false,
            ),
            (
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
                ),
                false,
            ),
            (io::Error::from(io::ErrorKind::TimedOut), false),
        ];
        for (err, fallback) in cases {
            assert_eq!(peer_is_not_tls(&err), fallback, "{err:?}");
        }
    }
}
