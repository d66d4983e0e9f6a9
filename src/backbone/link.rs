//! Links: the registry of live links (what the API and `/metrics` show), the dial and
//! accept loops (redial with backoff; at most [`MAX_INBOUND_LINKS`] inbound), and the
//! hello's IO around the sans-IO `session` (nonces from the OS, the TLS channel binding,
//! the certificate check). What a link does once up is in `upstream_link.rs` (dialed) and
//! `downstream_link.rs` (accepted).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::auth::{self, Nonce};
use super::session::{ControlSession, PeerInfo, SessionError, SessionEvent};
use super::upstream_link::LinkCommand;
use super::wire::code;
use super::{pki, tls, Backbone};
use crate::config::Role;

/// Time for a peer to complete the hello exchange (from the QUIC handshake's end, control
/// stream included).
pub(super) const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Inbound backbone connections held at once (authenticated or not); more are refused.
pub const MAX_INBOUND_LINKS: usize = 512;
pub(super) const REDIAL_MIN: Duration = Duration::from_millis(200);
pub(super) const REDIAL_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("control stream: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("control stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error("peer did not complete the hello in time")]
    HelloTimeout,
    #[error("peer closed the control stream")]
    ControlClosed,
    #[error("peer went away: {0}")]
    GoAway(String),
    #[error("peer presumed dead: nothing heard for {} ms", .0.as_millis())]
    Silent(Duration),
    #[error("no random nonce from the OS")]
    Random,
    #[error("cannot export the TLS channel binding")]
    ChannelBinding,
    #[error("{0}")]
    Certificate(#[from] pki::CertificateError),
}

/// An established link this node dialed.
pub(super) struct OutboundLink {
    pub(super) peer: PeerInfo,
    pub(super) conn: quinn::Connection,
    pub(super) commands: mpsc::Sender<LinkCommand>,
    /// When the link came up.
    pub(super) since: Instant,
}

/// An established link a peer dialed.
pub(super) struct InboundLink {
    pub(super) peer: PeerInfo,
    pub(super) conn: quinn::Connection,
}

/// A link as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct LinkInfo {
    pub node: String,
    pub role: Role,
    pub region: String,
    pub address: String,
    pub direction: &'static str,
    pub rtt_ms: f64,
    /// QUIC packets sent, and those declared lost, since the link came up.
    pub sent_packets: u64,
    pub lost_packets: u64,
    /// `lost_packets / sent_packets`.
    pub loss: f64,
    /// UDP bytes each way since the link came up.
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

impl Backbone {
    pub(super) async fn accept_loop(self: Arc<Self>) {
        loop {
            let incoming = tokio::select! {
                i = self.endpoint.accept() => match i {
                    Some(i) => i,
                    None => return,
                },
                _ = self.shutdown.cancelled() => return,
            };
            if self.token.is_empty() {
                // Closed backbone (logged once at start): an empty token authenticates nobody.
                debug!(peer = %incoming.remote_address(), "refused: the backbone has no token");
                incoming.refuse();
                continue;
            }
            let Ok(slot) = self.inbound_slots.clone().try_acquire_owned() else {
                debug!(peer = %incoming.remote_address(), "refused: {MAX_INBOUND_LINKS} inbound links");
                incoming.refuse();
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let remote = incoming.remote_address();
                let span = tracing::info_span!("backbone", peer = %remote, dir = "in");
                async move {
                    let conn = match incoming.await {
                        Ok(c) => c,
                        Err(e) => {
                            info!("handshake failed: {e}");
                            return;
                        }
                    };
                    me.hub
                        .metrics()
                        .count_connection(crate::metrics::Proto::Backbone);
                    if let Err(e) = me.clone().run_inbound(conn.clone()).await {
                        me.hub
                            .metrics()
                            .count_session_error(crate::metrics::Proto::Backbone);
                        info!("link closed: {e}");
                        conn.close(code::CLOSE_ERROR.into(), e.to_string().as_bytes());
                    }
                }
                .instrument(span)
                .await
            });
        }
    }

    /// Keeps a link to `addr` up until `stop` (shutdown, or `addr` left the origin list):
    /// then a link that is up is closed and its end waited for (briefly), so its pulls
    /// move on as when a link is lost.
    pub(super) async fn dial_loop(self: Arc<Self>, addr: SocketAddr, stop: CancellationToken) {
        let span = tracing::info_span!("backbone", peer = %addr, dir = "out");
        async move {
            let mut backoff = REDIAL_MIN;
            // An authentication failure is said once (at warn) until a link comes up.
            let mut refusal_said = false;
            loop {
                let attempt = async {
                    let conn = self
                        .endpoint
                        .connect_with(self.client_config.clone(), addr, tls::SERVER_NAME)?
                        .await?;
                    self.clone().run_outbound(addr, conn).await
                };
                let started = Instant::now();
                tokio::pin!(attempt);
                tokio::select! {
                    r = &mut attempt => match r {
                        Ok(()) => info!("link closed"),
                        Err(LinkError::Session(
                            e @ (SessionError::Unauthorized | SessionError::NoToken),
                        )) => {
                            if !refusal_said {
                                warn!("link refused: {e}; retrying");
                                refusal_said = true;
                            } else {
                                debug!("link refused: {e}");
                            }
                        }
                        Err(e) => {
                            if started.elapsed() > Duration::from_secs(5) {
                                info!("link lost: {e}");
                            } else {
                                debug!("dial failed: {e}");
                            }
                        }
                    },
                    _ = stop.cancelled() => {
                        if self.shutdown.is_cancelled() {
                            return;
                        }
                        // Left the origin list: close the link, and let it end as a lost
                        // one does (its pulls move to the other origins).
                        let conn = self.outbound.lock().get(&addr).map(|l| l.conn.clone());
                        if let Some(conn) = conn {
                            conn.close(code::CLOSE_SHUTDOWN.into(), b"removed from the origin list");
                        }
                        let _ = tokio::time::timeout(Duration::from_secs(5), attempt).await;
                        info!("unlinked: no longer in the origin list");
                        return;
                    }
                }
                if started.elapsed() > Duration::from_secs(5) {
                    backoff = REDIAL_MIN;
                    refusal_said = false;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(REDIAL_MAX);
            }
        }
        .instrument(span)
        .await
    }

    /// With per-node certificates: whether the peer's certificate names the node its hello
    /// claims (TLS has already checked it against the CA).
    pub(super) fn check_certificate(
        &self,
        conn: &quinn::Connection,
        peer: &PeerInfo,
    ) -> Result<(), LinkError> {
        if !self.node_certs {
            return Ok(());
        }
        let cert = pki::peer_certificate(conn).ok_or(pki::CertificateError::Missing)?;
        Ok(pki::names_node(&cert, &peer.node_id)?)
    }
}
pub(super) fn link_info(
    peer: &PeerInfo,
    conn: &quinn::Connection,
    direction: &'static str,
) -> LinkInfo {
    let stats = conn.stats();
    let (sent, lost) = (stats.path.sent_packets, stats.path.lost_packets);
    LinkInfo {
        node: peer.node_id.clone(),
        role: peer.role,
        region: peer.region.clone(),
        address: conn.remote_address().to_string(),
        direction,
        rtt_ms: conn.rtt().as_secs_f64() * 1000.0,
        sent_packets: sent,
        lost_packets: lost,
        loss: if sent == 0 {
            0.0
        } else {
            lost as f64 / sent as f64
        },
        sent_bytes: stats.udp_tx.bytes,
        received_bytes: stats.udp_rx.bytes,
    }
}

/// Sends what the session still has to say after a failed hello (its refusal) and waits,
/// briefly, for the peer to have it before the connection is closed: a close discards
/// stream data still in flight.
pub(super) async fn say_last_words(session: &mut ControlSession, send: &mut quinn::SendStream) {
    if flush(session, send).await.is_ok() && send.finish().is_ok() {
        let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    }
}

/// The connection's TLS channel binding: keying material both ends export alike.
pub fn channel_binding(conn: &quinn::Connection) -> Result<auth::ChannelBinding, LinkError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, auth::CHANNEL_BINDING_LABEL, b"")
        .map_err(|_| LinkError::ChannelBinding)?;
    Ok(out)
}

/// A fresh nonce for a hello, from the OS generator.
pub(super) fn fresh_nonce() -> Result<Nonce, LinkError> {
    use ring::rand::SecureRandom;
    let mut nonce = [0u8; auth::NONCE_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| LinkError::Random)?;
    Ok(nonce)
}

pub(super) async fn flush(
    session: &mut ControlSession,
    send: &mut quinn::SendStream,
) -> Result<(), LinkError> {
    while let Some(bytes) = session.poll_transmit() {
        send.write_all(&bytes).await?;
    }
    Ok(())
}

/// Runs the hello exchange on the control stream (writing this side's messages to `send`
/// as the session makes them) until it completes; returns the peer and any events that
/// arrived with it. On an error, what the session still has to say (a refusal) is left
/// for the caller to flush.
pub(super) async fn read_until_ready(
    session: &mut ControlSession,
    recv: &mut quinn::RecvStream,
    mut send: Option<&mut quinn::SendStream>,
) -> Result<(PeerInfo, Vec<SessionEvent>), LinkError> {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = recv.read(&mut buf).await?.ok_or(LinkError::ControlClosed)?;
        let mut events = session.handle_input(&buf[..n])?;
        if !session.is_ready() {
            if let Some(send) = send.as_deref_mut() {
                flush(session, send).await?;
            }
        }
        if let Some(pos) = events
            .iter()
            .position(|e| matches!(e, SessionEvent::Ready(_)))
        {
            let SessionEvent::Ready(peer) = events.remove(pos) else {
                unreachable!("position matched Ready")
            };
            return Ok((peer, events));
        }
    }
}
