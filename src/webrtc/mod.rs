//! WebRTC with str0m (sans-IO, RTP mode) on one UDP port for every peer: WHIP publishers
//! and WHEP viewers.
//!
//! [`WebRtc`] is the facade the HTTP API calls: it answers an offer, registers the session
//! and starts its peer. The parts, by job:
//!
//! * `io`: the shared UDP socket and ICE-TCP connections; reading, routing
//!   ([`demux`]: by source address once known, else by the ufrag of a STUN request) and
//!   batched sending (`batch`, GSO). Peers send straight on the shared socket without
//!   waiting: a full socket buffer drops the datagram, as the network would, and NACK/RTX
//!   repairs it. **ICE over TCP** is the fallback for clients that cannot use UDP: each
//!   peer also gets a passive TCP host candidate (lower priority than UDP) on the same port.
//! * `sessions`: the registry of sessions (ids, streams, the session limit, their tasks).
//! * `offer`: answering an SDP offer (sans-IO), and the errors that decide the HTTP answer.
//! * `whip`: a publisher's peer, RTP in ([`assemble`]) and frames out to the hub; its
//!   decisions are sans-IO: `track_clock` puts the tracks on one timeline, `primary` picks
//!   the simulcast layer the stream itself carries.
//! * `whep`: a viewer's peer, frames from the hub out as RTP ([`h264`], [`vp8`]).
//! * `shard`: the tasks that drive viewers' peers, many per task, one wake-up per frame.
//! * [`layers`]: which simulcast layer a viewer gets and when it switches (sans-IO).
//! * [`client`]: str0m WHEP/WHIP clients for tests and load generation.
//!
//! Each publisher is one task that owns its `Rtc` and its hub publisher; viewers are served
//! in shards, one per worker thread, each owning its viewers' `Rtc`s and subscriptions (one
//! owner per peer, no lock per packet).
//!
//! This module may use the hub and media below it; it never reaches up into the API,
//! the cluster or the node (they hand it what it needs).

pub mod assemble;
mod batch;
pub mod client;
pub mod demux;
mod dtls;
pub mod h264;
mod io;
pub mod layers;
mod offer;
mod primary;
mod rtp_out;
mod sessions;
mod shard;
mod track_clock;
pub mod vp8;
mod whep;
mod whip;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::hub::{Hub, Publisher, Subscription};
use crate::media::StreamKey;
use io::Io;
pub(crate) use offer::negotiated;
pub use offer::{answer_offer, dtls_certificate, random_token, BadOffer, PeerKind, WebRtcError};
use sessions::Sessions;
use shard::Shards;

/// How long a WHEP offer waits for its stream's configuration (a relay just pulling).
const CONFIG_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct WebRtcSettings {
    pub listen: SocketAddr,
    /// Addresses put in host candidates (public IPs with the listen port).
    pub candidates: Vec<SocketAddr>,
    /// STUN/TURN URLs handed to clients (WHIP/WHEP `Link` headers).
    pub ice_servers: Vec<String>,
    /// Also take ICE over TCP on the listen port.
    pub tcp: bool,
    /// WHIP and WHEP sessions at most, connecting or connected.
    pub max_sessions: usize,
    /// What viewers of a stream with B-frames get (`webrtc.bframes`).
    pub bframes: crate::config::BframePolicy,
}

/// A created WHEP/WHIP session.
pub struct Created {
    pub id: String,
    pub answer: String,
}

pub struct WebRtc {
    io: Arc<Io>,
    local_addr: SocketAddr,
    settings: WebRtcSettings,
    sessions: Arc<Sessions>,
    viewers: Shards,
    /// One DTLS certificate for every peer of this node (str0m would make one per peer).
    dtls_cert: str0m::config::DtlsCert,
}

impl WebRtc {
    /// Binds the shared UDP socket (and TCP listener) and starts reading them.
    pub async fn start(
        settings: WebRtcSettings,
        metrics: &crate::metrics::Metrics,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<WebRtc>> {
        let (io, tcp) = Io::bind(settings.listen, settings.tcp).await?;
        let io = Arc::new(io);
        let local_addr = io.local_addr()?;
        let dtls_cert = dtls_certificate()
            .ok_or_else(|| anyhow::anyhow!("cannot generate a DTLS certificate"))?;
        tokio::spawn(io.clone().read_udp(shutdown.clone()));
        if let Some(listener) = tcp {
            tokio::spawn(io.clone().accept_tcp(listener, shutdown.clone()));
        }
        let sessions = Arc::new(Sessions::new(
            io.clone(),
            settings.max_sessions,
            shutdown.clone(),
        ));
        // A shard per worker thread: the viewers' work spreads over the cores.
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        let viewers = Shards::start(
            workers,
            sessions.clone(),
            io.clone(),
            metrics.webrtc_viewers_joining.clone(),
            shutdown,
        )?;
        Ok(Arc::new(WebRtc {
            io,
            local_addr,
            settings,
            sessions,
            viewers,
            dtls_cert,
        }))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn ice_servers(&self) -> &[String] {
        &self.settings.ice_servers
    }

    /// What viewers of a stream with B-frames get (`webrtc.bframes`).
    pub fn bframes(&self) -> crate::config::BframePolicy {
        self.settings.bframes
    }

    /// The address peers send to, as str0m must see it in each datagram's destination: the
    /// (first) announced candidate, not a wildcard bind address or a private address behind
    /// NAT. (With several announced addresses, checks to the others are not matched yet.)
    fn ice_address(&self) -> SocketAddr {
        self.candidates()
            .first()
            .copied()
            .unwrap_or(self.local_addr)
    }

    /// Host candidates: the configured ones, or the bound address.
    fn candidates(&self) -> Vec<SocketAddr> {
        if !self.settings.candidates.is_empty() {
            return self.settings.candidates.clone();
        }
        let mut a = self.local_addr;
        if a.ip().is_unspecified() {
            a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        vec![a]
    }

    /// Creates a WHEP session playing `sub` from an SDP offer. The answer depends on the
    /// stream's configuration (video codec, simulcast), which a relay that has just started
    /// pulling may not have yet: it is waited for, briefly.
    pub async fn create_whep(
        self: &Arc<Self>,
        stream: StreamKey,
        offer: &str,
        mut sub: Subscription,
        hub: Arc<Hub>,
    ) -> Result<Created, WebRtcError> {
        let config = sub.wait_config(CONFIG_WAIT).await;
        let video = offer::VideoFormat::of(config.as_ref().and_then(|c| c.video.as_ref()));
        offer::check_viewer_codecs(offer, video.codec)?;
        let kind = match config {
            Some(c) if !c.simulcast.is_empty() => PeerKind::SimulcastViewer,
            _ => PeerKind::Viewer,
        };
        self.sessions.check_capacity()?;
        let (rtc, answer, ufrag) = self.negotiate_off_thread(offer, kind).await?;
        let place = self.viewers.place();
        let (id, cancel) = self
            .sessions
            .register_to(&stream, ufrag, self.viewers.queue(&place));
        let span = tracing::info_span!("whep", session = %id, %stream);
        let peer = whep::WhepPeer::new(
            rtc,
            video,
            sub,
            hub,
            stream,
            self.io.clone(),
            self.ice_address(),
            cancel,
            self.viewers.wake(&place),
            self.settings.bframes == crate::config::BframePolicy::Transcode,
        );
        if !self.viewers.add(place, id.clone(), span, peer).await {
            self.sessions.remove(&id);
            return Err(WebRtcError::ShuttingDown);
        }
        Ok(Created { id, answer })
    }

    /// Creates a WHIP session feeding `publisher` from an SDP offer.
    pub fn create_whip(
        self: &Arc<Self>,
        stream: StreamKey,
        offer: &str,
        publisher: Publisher,
    ) -> Result<Created, WebRtcError> {
        offer::check_publisher_codecs(offer)?;
        self.sessions.check_capacity()?;
        let (rtc, answer, ufrag) = self.negotiate(offer, PeerKind::Publisher)?;
        let session = self.sessions.register(&stream, ufrag);
        let id = session.id.clone();
        let span = tracing::info_span!("whip", session = %id, %stream);
        let peer = whip::WhipPeer::new(rtc, publisher, self.io.clone(), self.ice_address());
        self.sessions.spawn(id.clone(), span, peer.run(session));
        Ok(Created { id, answer })
    }

    /// Answers an offer for this node ([`answer_offer`] with its certificate and candidates).
    fn negotiate(
        &self,
        offer: &str,
        kind: PeerKind,
    ) -> Result<(str0m::Rtc, String, String), WebRtcError> {
        answer_offer(
            offer,
            kind,
            &self.dtls_cert,
            &self.candidates(),
            self.settings.tcp,
        )
    }

    /// [`Self::negotiate`] on the blocking pool: answering an offer (SDP parsing, the
    /// session's DTLS and ICE state, ~0.5 ms) then never holds up the async workers that
    /// carry every viewer's frames, so a storm of joins does not stall those watching.
    async fn negotiate_off_thread(
        &self,
        offer: &str,
        kind: PeerKind,
    ) -> Result<(str0m::Rtc, String, String), WebRtcError> {
        let offer = offer.to_string();
        let cert = self.dtls_cert.clone();
        let candidates = self.candidates();
        let tcp = self.settings.tcp;
        tokio::task::spawn_blocking(move || answer_offer(&offer, kind, &cert, &candidates, tcp))
            .await
            .unwrap_or_else(|_| Err(offer::BadOffer::Inconsistent.into()))
    }

    /// Ends a session (WHIP/WHEP DELETE); false if there is no such session for `stream`.
    pub fn delete(&self, stream: &StreamKey, id: &str) -> bool {
        self.sessions.delete(stream, id)
    }

    pub fn session_exists(&self, stream: &StreamKey, id: &str) -> bool {
        self.sessions.exists(stream, id)
    }

    pub fn session_count(&self) -> usize {
        self.sessions.count()
    }
}
