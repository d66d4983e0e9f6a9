//! TLS for the backbone (QUIC requires it).
//!
//! Two modes, chosen by config:
//! * `backbone.cert`/`key`/`ca` set: each node presents its certificate (which must name the
//!   DNS name `meshcast`) and verifies its peer's against the CA. Peers are authenticated by
//!   TLS *and* by proving the shared token.
//!   With a node certificate too (`meshcast cert node`), links are mutual TLS: dialers
//!   show their certificate as well, and each side checks that the other's names the node
//!   its hello claims ([`super::pki`]).
//! * nothing set: each node generates a self-signed certificate at start and does **not**
//!   verify the peer's certificate. The link is encrypted, and peers prove they know the
//!   shared `backbone.token` in the hello without sending it ([`super::auth`]). An active
//!   man-in-the-middle on the path could still relay a hello between two real nodes, and
//!   could try to guess a short token offline from a dialer's proof (hence at least 16 bytes
//!   off loopback). Use a CA outside a trusted network. A warning is logged at start.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::wire::ALPN;
use crate::config::{BackboneConfig, Congestion};

/// The TLS server name every node certificate carries.
pub const SERVER_NAME: &str = "meshcast";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A link idle this long sends a PING, so that a live peer is heard from several times
/// within `backbone.link_timeout_ms` (the liveness check in the backbone driver).
pub const KEEP_ALIVE: Duration = Duration::from_millis(150);

/// Group streams an acceptor may have open toward a dialer at once.
const MAX_GROUP_STREAMS: u32 = 1024;
/// Connections still in their QUIC handshake at once, and the early data buffered for them.
const MAX_PENDING_HANDSHAKES: usize = 256;
const PENDING_BUFFER: u64 = 64 << 10;
const PENDING_BUFFER_TOTAL: u64 = 4 << 20;

/// Which end of a connection a transport config is for: it says which streams the *peer*
/// may open.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// The acceptor: its dialer opens one control stream and nothing else.
    Server,
    /// The dialer: its acceptor opens group streams (unidirectional) only.
    Client,
}

/// QUIC transport tuned for the backbone: fast liveness (keep-alive 150 ms, idle 5 s), BBR
/// unless configured otherwise (random loss does not cut its rate), 1500-byte initial MTU
/// (quinn's default leaves 1162-byte datagrams; this raises it to 1434), and per connection only the streams the protocol uses: a dialer may
/// open one bidirectional stream (control), an acceptor [`MAX_GROUP_STREAMS`]
/// unidirectional ones (groups). Receive windows bound what a peer can have in flight.
fn transport(congestion: Congestion, end: End) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // 5 s fits in a VarInt: the conversion cannot fail.
    t.max_idle_timeout(Some(
        Duration::from_secs(5).try_into().expect("5s idle timeout"),
    ));
    match end {
        End::Server => {
            t.max_concurrent_uni_streams(0u32.into());
            t.max_concurrent_bidi_streams(1u32.into());
        }
        End::Client => {
            t.max_concurrent_uni_streams(MAX_GROUP_STREAMS.into());
            t.max_concurrent_bidi_streams(0u32.into());
        }
    }
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    t.initial_mtu(1452);
    match congestion {
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
    };
    Arc::new(t)
}

fn load_identity(
    cfg: &BackboneConfig,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading {}", key.display()))?;
            Ok((certs, key))
        }
        _ => {
            let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
                .context("generating a self-signed certificate")?;
            let key = PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der());
            Ok((vec![ck.cert.der().clone()], key.into()))
        }
    }
}

/// The CA certificates in `ca` (PEM).
fn roots(ca: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))?
    {
        roots.add(cert?)?;
    }
    Ok(roots)
}

/// Whether links use mutual TLS with per-node certificates (a CA and this node's
/// certificate configured): then a peer's certificate must name the node it says it is.
pub fn node_certificates(cfg: &BackboneConfig) -> bool {
    cfg.ca.is_some() && cfg.cert.is_some()
}

pub fn server_config(cfg: &BackboneConfig) -> anyhow::Result<quinn::ServerConfig> {
    let (certs, key) = load_identity(cfg)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    // A CA and a node certificate: mutual TLS, every dialer shows a certificate of the CA.
    let builder = match (&cfg.ca, &cfg.cert) {
        (Some(ca), Some(_)) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            )
            .build()?,
        ),
        _ => builder.with_no_client_auth(),
    };
    let mut tls = builder.with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    server.transport_config(transport(cfg.congestion, End::Server));
    server
        .max_incoming(MAX_PENDING_HANDSHAKES)
        .incoming_buffer_size(PENDING_BUFFER)
        .incoming_buffer_size_total(PENDING_BUFFER_TOTAL);
    Ok(server)
}

pub fn client_config(cfg: &BackboneConfig) -> anyhow::Result<quinn::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut tls = match &cfg.ca {
        Some(ca) if cfg.cert.is_some() => {
            let (certs, key) = load_identity(cfg)?;
            builder
                .with_root_certificates(roots(ca)?)
                .with_client_auth_cert(certs, key)?
        }
        Some(ca) => builder
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth(),
        None => {
            tracing::warn!(
                "backbone: no CA configured; peer certificates are not verified (token-only authentication)"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
                .with_no_client_auth()
        }
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    client.transport_config(transport(cfg.congestion, End::Client));
    Ok(client)
}

/// Accepts any server certificate but still checks the handshake signatures (so the peer
/// holds the key of the certificate it sent). Used only without a configured CA.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
