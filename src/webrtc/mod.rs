//! WebRTC with str0m (sans-IO, RTP mode) on one UDP port for every peer.
//!
//! One task reads the shared socket and routes each datagram to its peer ([`demux`]): by
//! source address once known, else by the ufrag in a STUN binding request (we choose each
//! session's ufrag, so it names the session). Each peer is one task that owns its `Rtc` and
//! its hub subscription (one owner per peer, no lock per packet); tokio spreads peer tasks
//! over the cores. Peers send straight on the shared socket without waiting: a full socket
//! buffer drops the datagram, as the network would, and NACK/RTX repairs it.
//!
//! **ICE over TCP** is the fallback for clients that cannot use UDP: the same port also
//! listens for TCP, each peer gets a passive TCP host candidate (lower priority than UDP),
//! and packets on a TCP connection are framed as RFC 4571 says (16-bit length prefix). A
//! connection is routed like a datagram, by the ufrag of its first STUN request, and peers'
//! packets to a TCP address go out through that connection's writer.
//!
//! WHEP viewers get H.264 as RTP payloads packetized once per frame per node ([`h264`]) and
//! shared by all viewers; each viewer adds only its RTP header (own SSRC, sequence numbers
//! and timestamps starting at random values) and SRTP.

pub mod assemble;
mod batch;
pub mod client;
pub mod demux;
pub mod h264;
pub mod simulcast;
pub mod vp8;
mod whip;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use str0m::bwe::{Bitrate, BweKind};
use str0m::change::SdpOffer;
use str0m::format::Codec as RtcCodec;
use str0m::media::{MediaKind, Mid};
use str0m::net::{Protocol, Receive, TcpType};
use str0m::rtp::{RtpWrite, SeqNo};
use str0m::{Candidate, Event, IceConnectionState, IceCreds, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::hub::{Hub, Publisher, Scope, StreamEvent, Subscription, SubscriptionEnd};
use crate::media::packet::{Encoding, Packet};
use crate::media::{avc, Codec, StreamConfig, StreamKey, Timebase, TrackKind};
use simulcast::LayerChooser;

/// RTP payload bytes per packet (leaves room for RTP header, extensions and SRTP tag).
const RTP_MTU: usize = 1100;
/// Datagrams queued per peer between the socket reader and the peer task.
const PEER_QUEUE: usize = 256;
/// Receive buffer of the shared socket: join bursts overflow the default (FIELD-NOTES).
const SOCKET_RCVBUF: usize = 4 << 20;
/// How long a WHEP offer waits for its stream's configuration (a relay just pulling).
const CONFIG_WAIT: Duration = Duration::from_secs(2);
/// A session that is not connected within this time is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const VIDEO_CLOCK: Timebase = Timebase(90_000);
const OPUS_CLOCK: Timebase = Timebase(48_000);
/// Packets each viewer stream keeps for NACK resends.
const RTX_CACHE_PACKETS: usize = 128;
/// A frame's packets are handed to str0m this many at a time (see `WhepPeer::send_queued`).
const SEND_CHUNK: usize = 8;
/// A simulcast viewer's bandwidth estimate before its first feedback.
const INITIAL_ESTIMATE_BPS: u64 = 1_000_000;
/// How soon a viewer tries again to join a simulcast layer it could not subscribe to.
const LAYER_RETRY: Duration = Duration::from_secs(1);
/// How far (90 kHz ticks, 5 ms) a layer's keyframe may be behind the last frame sent and
/// still be joined, as a picture of the same capture instant.
const SAME_CAPTURE_TICKS: i64 = 450;
/// How often a layer being joined is asked again for the keyframe the join waits for.
const LAYER_KEYFRAME_REPEAT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum WebRtcError {
    #[error("bad SDP offer: {0}")]
    BadOffer(String),
    #[error("offer rejected: {0}")]
    Rejected(String),
    #[error("the offer has no {0} media for this stream")]
    NoVideo(&'static str),
    #[error("this node is at its WebRTC session limit ({0})")]
    TooManySessions(usize),
}

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
}

/// A datagram (or RFC 4571 frame) for a peer.
pub(crate) struct Datagram {
    at: Instant,
    from: SocketAddr,
    proto: Protocol,
    data: Vec<u8>,
}

/// Packets queued toward one ICE-TCP connection before it drops them.
const TCP_QUEUE: usize = 512;
/// A TCP connection must name its session (a STUN request) within this time.
const TCP_FIRST_PACKET_TIMEOUT: Duration = Duration::from_secs(10);

/// Where peers send: the shared UDP socket, and the writers of ICE-TCP connections (which
/// take packets already framed).
pub(crate) struct Io {
    udp: UdpSocket,
    /// Batched (GSO) sends on `udp`.
    udp_state: quinn_udp::UdpSocketState,
    tcp: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
}

impl Io {
    fn new(udp: UdpSocket) -> std::io::Result<Io> {
        let udp_state = quinn_udp::UdpSocketState::new((&udp).into())?;
        // quinn-udp turns on receive offload (UDP_GRO), which would hand the reader several
        // datagrams in one buffer; this socket's reader takes them one at a time.
        disable_udp_gro(&udp);
        Ok(Io {
            udp,
            udp_state,
            tcp: Mutex::new(HashMap::new()),
        })
    }

    /// Sends one of a peer's packets without waiting: a full socket buffer or connection
    /// queue drops it, as a congested link would, and NACK/RTX repairs it. UDP packets join
    /// this thread's GSO batch ([`batch`]), which [`Io::flush`] must send before the peer
    /// waits.
    fn transmit(&self, t: &str0m::net::Transmit) {
        if t.proto != Protocol::Udp {
            return self.send_tcp(t);
        }
        let max_segments = self.udp_state.max_gso_segments();
        batch::BATCH.with_borrow_mut(|b| {
            if !b.push(t.destination, &t.contents, max_segments) {
                self.send_batch(b);
                b.push(t.destination, &t.contents, max_segments);
            }
        });
    }

    /// Sends this thread's batch.
    fn flush(&self) {
        batch::BATCH.with_borrow_mut(|b| self.send_batch(b));
    }

    fn send_batch(&self, b: &mut batch::Batch) {
        if let Some((destination, contents, segment_size)) = b.contents() {
            let t = quinn_udp::Transmit {
                destination,
                ecn: None,
                contents,
                segment_size,
                src_ip: None,
            };
            let _ = self.udp.try_io(tokio::io::Interest::WRITABLE, || {
                self.udp_state.send((&self.udp).into(), &t)
            });
        }
        b.clear();
    }

    /// Sends over an ICE-TCP connection (RFC 4571 framing, built here so the packet is
    /// copied once); a full connection queue drops the packet.
    fn send_tcp(&self, t: &str0m::net::Transmit) {
        if let Some(tx) = self.tcp.lock().get(&t.destination) {
            let mut framed = Vec::with_capacity(2 + t.contents.len());
            framed.extend_from_slice(&(t.contents.len() as u16).to_be_bytes());
            framed.extend_from_slice(&t.contents);
            let _ = tx.try_send(framed);
        }
    }
}

#[derive(Clone)]
struct PeerRoute {
    tx: mpsc::Sender<Datagram>,
}

struct SessionEntry {
    stream: StreamKey,
    ufrag: String,
    cancel: CancellationToken,
}

/// What a negotiated peer is, for the extensions and estimator it gets.
#[derive(Clone, Copy, Debug)]
pub enum PeerKind {
    Publisher,
    Viewer,
    /// A viewer of a simulcast stream: its layer follows its bandwidth estimate (TWCC).
    SimulcastViewer,
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
    routes: Mutex<demux::Routes<PeerRoute>>,
    sessions: Mutex<HashMap<String, SessionEntry>>,
    /// One DTLS certificate for every peer of this node (str0m would make one per peer).
    dtls_cert: str0m::config::DtlsCert,
    shutdown: CancellationToken,
}

impl WebRtc {
    /// Binds the shared UDP socket and starts routing datagrams.
    pub async fn start(
        settings: WebRtcSettings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<WebRtc>> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(settings.listen),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        if let Err(e) = socket.set_recv_buffer_size(SOCKET_RCVBUF) {
            warn!("webrtc: cannot set SO_RCVBUF: {e}");
        }
        let _ = socket.set_send_buffer_size(SOCKET_RCVBUF);
        socket.set_nonblocking(true)?;
        socket.bind(&settings.listen.into())?;
        let socket = UdpSocket::from_std(socket.into())?;
        let local_addr = socket.local_addr()?;
        let tcp = if settings.tcp {
            Some(tokio::net::TcpListener::bind(local_addr).await?)
        } else {
            None
        };
        let dtls_cert = dtls_certificate()
            .ok_or_else(|| anyhow::anyhow!("cannot generate a DTLS certificate"))?;
        let webrtc = Arc::new(WebRtc {
            io: Arc::new(Io::new(socket)?),
            local_addr,
            settings,
            routes: Mutex::new(demux::Routes::default()),
            sessions: Mutex::new(HashMap::new()),
            dtls_cert,
            shutdown,
        });
        tokio::spawn(webrtc.clone().read_loop());
        if let Some(listener) = tcp {
            tokio::spawn(webrtc.clone().accept_tcp(listener));
        }
        Ok(webrtc)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn ice_servers(&self) -> &[String] {
        &self.settings.ice_servers
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

    async fn read_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, from) = tokio::select! {
                r = self.io.udp.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // ICMP errors surface here on Linux; they concern one peer only.
                        debug!("webrtc recv: {e}");
                        continue;
                    }
                },
                _ = self.shutdown.cancelled() => return,
            };
            let packet = &buf[..n];
            let Some(route) = self.routes.lock().route(from, packet) else {
                continue;
            };
            // A full queue drops the datagram, like a congested link would.
            let _ = route.tx.try_send(Datagram {
                at: Instant::now(),
                from,
                proto: Protocol::Udp,
                data: packet.to_vec(),
            });
        }
    }

    async fn accept_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let (stream, from) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        debug!("webrtc tcp accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = self.shutdown.cancelled() => return,
            };
            let _ = stream.set_nodelay(true);
            let me = self.clone();
            tokio::spawn(async move {
                match me.clone().serve_tcp(stream, from).await {
                    Ok(()) => debug!(%from, "ICE-TCP connection closed"),
                    Err(e) => debug!(%from, "ICE-TCP connection ended: {e}"),
                }
                me.io.tcp.lock().remove(&from);
            });
        }
    }

    /// One ICE-TCP connection: RFC 4571 frames in, routed like datagrams; the peer's
    /// packets for `from` out through a bounded queue. Ends when either side closes, when
    /// its session is gone, or when its first frame names no session.
    async fn serve_tcp(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        from: SocketAddr,
    ) -> std::io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
        self.io.tcp.lock().insert(from, tx);
        let writer = async move {
            while let Some(framed) = rx.recv().await {
                wr.write_all(&framed).await?;
            }
            Ok::<(), std::io::Error>(())
        };
        let reader = async {
            let mut buf = vec![0u8; u16::MAX as usize];
            let mut first = true;
            loop {
                let read = async {
                    let len = rd.read_u16().await? as usize;
                    rd.read_exact(&mut buf[..len]).await?;
                    Ok::<usize, std::io::Error>(len)
                };
                let len = if first {
                    tokio::time::timeout(TCP_FIRST_PACKET_TIMEOUT, read)
                        .await
                        .map_err(|_| std::io::Error::other("no STUN request in time"))??
                } else {
                    read.await?
                };
                let packet = &buf[..len];
                let Some(route) = self.routes.lock().route(from, packet) else {
                    if first {
                        return Err(std::io::Error::other("first frame names no session"));
                    }
                    continue;
                };
                first = false;
                let d = Datagram {
                    at: Instant::now(),
                    from,
                    proto: Protocol::Tcp,
                    data: packet.to_vec(),
                };
                if let Err(mpsc::error::TrySendError::Closed(_)) = route.tx.try_send(d) {
                    return Ok(()); // the session ended
                }
            }
        };
        tokio::select! {
            r = writer => r,
            r = reader => r,
            _ = self.shutdown.cancelled() => Ok(()),
        }
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
        let video_codec = config
            .as_ref()
            .and_then(|c| c.video.as_ref().map(|v| v.codec))
            .unwrap_or(Codec::H264);
        let wanted = match video_codec {
            Codec::Vp8 => "vp8/90000",
            _ => "h264/90000",
        };
        let lower = offer.to_ascii_lowercase();
        if !lower.contains("m=video") || !lower.contains(wanted) {
            return Err(WebRtcError::NoVideo(wanted));
        }
        let kind = match config {
            Some(c) if !c.simulcast.is_empty() => PeerKind::SimulcastViewer,
            _ => PeerKind::Viewer,
        };
        self.check_capacity()?;
        let (rtc, answer, ufrag) = self.negotiate(offer, kind)?;
        let (id, rx, cancel) = self.register(&stream, ufrag);
        let peer = WhepPeer {
            video_codec,
            rtc: Box::new(rtc),
            sub,
            layers: Layers {
                hub,
                stream: stream.clone(),
                chooser: None,
                current: None,
                next: None,
                opening: None,
                last_video_pts: None,
                desired_bps: 0,
                open_failed: None,
            },
            io: self.io.clone(),
            local_addr: self.ice_address(),
            video: None,
            audio: None,
            connected: false,
            video_rtp: RtpState::new(),
            audio_rtp: RtpState::new(),
            failed: None,
        };
        let span = tracing::info_span!("whep", session = %id, %stream);
        self.spawn_session(id.clone(), span, peer.run(rx, cancel));
        Ok(Created { id, answer })
    }

    /// Creates a WHIP session feeding `publisher` from an SDP offer.
    pub fn create_whip(
        self: &Arc<Self>,
        stream: StreamKey,
        offer: &str,
        publisher: Publisher,
    ) -> Result<Created, WebRtcError> {
        let lower = offer.to_ascii_lowercase();
        if !lower.contains("h264/90000")
            && !lower.contains("vp8/90000")
            && !lower.contains("opus/48000")
        {
            return Err(WebRtcError::NoVideo("h264/90000, vp8/90000 or opus/48000"));
        }
        self.check_capacity()?;
        let (rtc, answer, ufrag) = self.negotiate(offer, PeerKind::Publisher)?;
        let (id, rx, cancel) = self.register(&stream, ufrag);
        let peer = whip::WhipPeer {
            rtc: Box::new(rtc),
            publisher,
            io: self.io.clone(),
            local_addr: self.ice_address(),
        };
        let span = tracing::info_span!("whip", session = %id, %stream);
        self.spawn_session(id.clone(), span, peer.run(rx, cancel));
        Ok(Created { id, answer })
    }

    fn spawn_session(
        self: &Arc<Self>,
        id: String,
        span: tracing::Span,
        session: impl std::future::Future<Output = Result<&'static str, str0m::RtcError>>
            + Send
            + 'static,
    ) {
        let me = self.clone();
        // Boxed so the wrapper below holds a pointer, not a second copy of the session.
        let session = Box::pin(session);
        tokio::spawn(
            async move {
                match session.await {
                    Ok(reason) => info!("session ended: {reason}"),
                    Err(e) => info!("session failed: {e}"),
                }
                me.remove(&id);
            }
            .instrument(span),
        );
    }

    /// Answers an offer for this node ([`answer_offer`] with its certificate and candidates).
    fn negotiate(&self, offer: &str, kind: PeerKind) -> Result<(Rtc, String, String), WebRtcError> {
        answer_offer(
            offer,
            kind,
            &self.dtls_cert,
            &self.candidates(),
            self.settings.tcp,
        )
    }

    /// Routes `ufrag`'s datagrams to a new session; returns its id, queue and cancel token.
    /// Refuses a new session past `max_sessions` (those still connecting count: they
    /// expire after the connect timeout).
    fn check_capacity(&self) -> Result<(), WebRtcError> {
        if self.sessions.lock().len() >= self.settings.max_sessions {
            return Err(WebRtcError::TooManySessions(self.settings.max_sessions));
        }
        Ok(())
    }

    fn register(
        &self,
        stream: &StreamKey,
        ufrag: String,
    ) -> (String, mpsc::Receiver<Datagram>, CancellationToken) {
        let id = random_token(20);
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let cancel = self.shutdown.child_token();
        self.routes.lock().insert(ufrag.clone(), PeerRoute { tx });
        self.sessions.lock().insert(
            id.clone(),
            SessionEntry {
                stream: stream.clone(),
                ufrag,
                cancel: cancel.clone(),
            },
        );
        (id, rx, cancel)
    }

    /// Ends a session (WHIP/WHEP DELETE); false if there is no such session for `stream`.
    pub fn delete(&self, stream: &StreamKey, id: &str) -> bool {
        let sessions = self.sessions.lock();
        match sessions.get(id) {
            Some(s) if &s.stream == stream => {
                s.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    pub fn session_exists(&self, stream: &StreamKey, id: &str) -> bool {
        self.sessions
            .lock()
            .get(id)
            .is_some_and(|s| &s.stream == stream)
    }

    fn remove(&self, id: &str) {
        if let Some(s) = self.sessions.lock().remove(id) {
            self.routes.lock().remove(&s.ufrag);
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }
}

/// A new DTLS certificate from the configured crypto provider (one per node).
pub fn dtls_certificate() -> Option<str0m::config::DtlsCert> {
    str0m::crypto::from_feature_flags()
        .dtls_provider
        .generate_certificate()
}

/// [`answer_offer_unguarded`] with str0m's panics contained: some offers make str0m's SDP
/// handling panic (payload types claimed twice across bundled m-lines trip an assertion in
/// its payload-type allocator, found by the `sdp_offer` fuzz target). The `Rtc` is built
/// and dropped in here, so, as [`crate::rtmp::feed_server`] does for rml_rtmp, a panic is
/// turned into a refused offer instead of unwinding through the HTTP handler.
pub fn answer_offer(
    offer: &str,
    kind: PeerKind,
    dtls_cert: &str0m::config::DtlsCert,
    candidates: &[SocketAddr],
    tcp: bool,
) -> Result<(Rtc, String, String), WebRtcError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        answer_offer_unguarded(offer, kind, dtls_cert, candidates, tcp)
    }))
    .unwrap_or_else(|_| {
        warn!("webrtc: an offer made the SDP library panic; refused");
        Err(WebRtcError::BadOffer(
            "the offer is inconsistent (refused)".into(),
        ))
    })
}

/// Answers an offer with a new ICE-lite, RTP-mode `Rtc` (H.264, VP8, Opus), with the
/// header extensions and estimator `kind` needs: only simulcast viewers get a bandwidth
/// estimate from their TWCC feedback (which also paces their video to it).
/// Returns the `Rtc`, the answer and the local ufrag. Sans-IO: no socket, so the offer
/// fuzz target calls it (through [`answer_offer`]) directly.
fn answer_offer_unguarded(
    offer: &str,
    kind: PeerKind,
    dtls_cert: &str0m::config::DtlsCert,
    candidates: &[SocketAddr],
    tcp: bool,
) -> Result<(Rtc, String, String), WebRtcError> {
    let offer =
        SdpOffer::from_sdp_string(offer).map_err(|e| WebRtcError::BadOffer(e.to_string()))?;
    let ufrag = random_token(16);
    let mut builder = Rtc::builder();
    match kind {
        PeerKind::SimulcastViewer => {
            builder = builder.enable_bwe(Some(Bitrate::bps(INITIAL_ESTIMATE_BPS)));
        }
        // Nothing reads a plain viewer's bandwidth: without transport-cc every packet
        // it is sent is a header extension shorter and is not logged for feedback, and
        // the viewer sends no feedback to parse. The mid keeps BUNDLE demuxing simple.
        PeerKind::Viewer => {
            builder = builder
                .clear_extension_map()
                .set_extension(4, str0m::rtp::Extension::RtpMid);
        }
        // Publishers keep the standard extensions: their encoders adapt to our
        // transport-cc feedback, and simulcast needs rid.
        PeerKind::Publisher => {}
    }
    let mut rtc = builder
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .set_dtls_cert(dtls_cert.clone())
        .clear_codecs()
        .enable_h264(true)
        .enable_vp8(true)
        .enable_opus(true, false)
        .set_local_ice_credentials(IceCreds {
            ufrag: ufrag.clone(),
            pass: random_token(24),
        })
        .build(Instant::now());
    for &addr in candidates {
        let tcp = tcp.then(|| {
            Candidate::builder()
                .tcp()
                .host(addr)
                .tcptype(TcpType::Passive)
                .build()
        });
        for c in std::iter::once(Candidate::host(addr, "udp")).chain(tcp) {
            match c {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => warn!("webrtc: bad candidate {addr}: {e}"),
            }
        }
    }
    let answer = rtc
        .sdp_api()
        .accept_offer(offer)
        .map_err(|e| WebRtcError::Rejected(e.to_string()))?;
    Ok((rtc, answer.to_sdp_string(), ufrag))
}

/// Feeds one datagram to a peer's `Rtc`; an unparsable one is dropped.
fn receive(rtc: &mut Rtc, local_addr: SocketAddr, d: &Datagram) -> Result<(), str0m::RtcError> {
    match Receive::new(d.proto, d.from, local_addr, &d.data) {
        Ok(r) => rtc.handle_input(Input::Receive(d.at, r)),
        Err(e) => {
            debug!("unparsable datagram: {e}");
            Ok(())
        }
    }
}

/// Random URL-safe token (session ids, ICE credentials).
fn random_token(len: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Turns off `UDP_GRO` on `socket` (Linux; elsewhere there is nothing to turn off).
fn disable_udp_gro(socket: &UdpSocket) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let off: libc::c_int = 0;
        // SAFETY: a valid socket descriptor and an int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_GRO,
                (&off as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            debug!("webrtc: UDP_GRO off: {}", std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// Per-viewer RTP numbering: random starts, then continuous whatever the source does.
struct RtpState {
    seq: u64,
    ts_offset: u32,
    first_pts: Option<i64>,
}

impl RtpState {
    fn new() -> Self {
        use rand::Rng;
        let mut rng = rand::rng();
        RtpState {
            seq: rng.random_range(0..30_000),
            ts_offset: rng.random(),
            first_pts: None,
        }
    }

    /// The RTP timestamp of a frame presented at `pts` (in the track's RTP clock): relative
    /// to the viewer's first frame, from a random base. B-frames before the first frame wrap
    /// correctly.
    fn timestamp(&mut self, pts: i64) -> u32 {
        let first = *self.first_pts.get_or_insert(pts);
        ((pts - first) as u32).wrapping_add(self.ts_offset)
    }
}

/// A negotiated outgoing track.
#[derive(Clone, Copy)]
struct TrackOut {
    mid: Mid,
    pt: str0m::media::Pt,
    /// Whether the viewer NACKs this payload (video; browsers and str0m do not NACK Opus):
    /// only then are its packets kept for resending.
    nack: bool,
}

impl TrackOut {
    fn new(mid: Mid, params: &str0m::format::PayloadParams) -> TrackOut {
        TrackOut {
            mid,
            pt: params.pt(),
            nack: params.fb_nack(),
        }
    }
}

/// One simulcast layer a viewer is subscribed to.
struct LayerSub {
    rid: String,
    sub: Subscription,
    config: Option<Arc<StreamConfig>>,
    /// When a keyframe was last asked of this layer (joining it waits for one).
    asked: Instant,
}

/// A WHEP viewer's simulcast state: the layer it is sent, and the one it switches to at that
/// layer's next keyframe. Unused for streams without simulcast.
struct Layers {
    hub: Arc<Hub>,
    stream: StreamKey,
    chooser: Option<LayerChooser>,
    current: Option<LayerSub>,
    next: Option<LayerSub>,
    /// A layer subscription being made (on an edge it may pull the layer first).
    opening: Option<(String, oneshot::Receiver<Option<Subscription>>)>,
    /// The last video frame sent (90 kHz): a layer is joined at a keyframe after it.
    last_video_pts: Option<i64>,
    desired_bps: u64,
    /// When a layer subscription last failed (retried after [`LAYER_RETRY`]).
    open_failed: Option<Instant>,
}

impl Layers {
    /// The stream's configuration arrived or changed: starts or updates layer choice.
    fn set_layers(&mut self, config: &StreamConfig) {
        if config.simulcast.is_empty() {
            return;
        }
        match &mut self.chooser {
            Some(c) if c.layers() == config.simulcast.as_slice() => {}
            Some(c) => c.set_layers(config.simulcast.clone()),
            None => {
                let c = LayerChooser::new(config.simulcast.clone(), INITIAL_ESTIMATE_BPS);
                info!(layers = config.simulcast.len(), first = %c.target().rid, "simulcast viewer");
                self.chooser = Some(c);
            }
        }
    }
}

/// The next event of an optional layer subscription (never, without one).
async fn next_of(layer: &mut Option<LayerSub>) -> Result<StreamEvent, SubscriptionEnd> {
    match layer {
        Some(l) => l.sub.next().await,
        None => std::future::pending().await,
    }
}

/// The outcome of an optional layer subscription being made (never, without one).
async fn opened(
    opening: &mut Option<(String, oneshot::Receiver<Option<Subscription>>)>,
) -> Option<Subscription> {
    match opening {
        Some((_, rx)) => rx.await.ok().flatten(),
        None => std::future::pending().await,
    }
}

struct WhepPeer {
    /// The stream's video codec, which the viewer's video m-line must carry.
    video_codec: Codec,
    /// Boxed, like the peer's future in [`WebRtc::spawn_session`]: an async fn keeps its
    /// arguments and its locals apart, so a ~10 KB `Rtc` held by value was stored several
    /// times over in each viewer's task.
    rtc: Box<Rtc>,
    sub: Subscription,
    layers: Layers,
    io: Arc<Io>,
    local_addr: SocketAddr,
    video: Option<TrackOut>,
    audio: Option<TrackOut>,
    connected: bool,
    video_rtp: RtpState,
    audio_rtp: RtpState,
    /// An error met while sending a frame, returned by the next [`Self::drain`].
    failed: Option<str0m::RtcError>,
}

impl WhepPeer {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Datagram>,
        cancel: CancellationToken,
    ) -> Result<&'static str, str0m::RtcError> {
        let started = Instant::now();
        let mut config: Option<Arc<StreamConfig>> = None;
        loop {
            let timeout = self.drain()?;
            if !self.rtc.is_alive() {
                return Ok("peer closed");
            }
            if !self.connected && started.elapsed() > CONNECT_TIMEOUT {
                return Ok("ICE did not connect in time");
            }
            let sending = self.connected && self.video.is_some();
            if sending {
                self.steer_layers();
            }
            tokio::select! {
                d = rx.recv() => {
                    let Some(d) = d else { return Ok("closed") };
                    receive(&mut self.rtc, self.local_addr, &d)?;
                }
                ev = self.sub.next(), if sending => match ev {
                    Ok(StreamEvent::Config(c)) => {
                        self.layers.set_layers(&c);
                        config = Some(c);
                    }
                    Ok(StreamEvent::Frame(p)) => {
                        // With simulcast, video comes from the viewer's layer.
                        let layered = self.layers.chooser.is_some() && (p.frame.track() == TrackKind::Video);
                        if let (Some(c), false) = (&config, layered) {
                            self.send_frame(&p, c);
                        }
                    }
                    Ok(StreamEvent::Discontinuity) => {}
                    Err(SubscriptionEnd::Ended) => {
                        self.rtc.disconnect();
                        return Ok("stream ended");
                    }
                    Err(SubscriptionEnd::Kicked) => {
                        self.rtc.disconnect();
                        return Ok("disconnected by the operator");
                    }
                    Err(SubscriptionEnd::TooSlow) => {
                        self.rtc.disconnect();
                        return Ok("viewer too slow");
                    }
                },
                ev = next_of(&mut self.layers.current), if sending => self.on_layer_event(ev),
                ev = next_of(&mut self.layers.next), if sending => self.on_next_layer_event(ev),
                sub = opened(&mut self.layers.opening) => {
                    let (rid, _) = self.layers.opening.take().expect("opening");
                    if sub.is_none() {
                        self.layers.open_failed = Some(Instant::now());
                    }
                    if let Some(sub) = sub {
                        if self.layers.current.is_some() {
                            sub.request_keyframe();
                        }
                        let asked = Instant::now();
                        self.layers.next = Some(LayerSub { rid, sub, config: None, asked });
                    }
                }
                _ = tokio::time::sleep_until(timeout.into()) => {
                    self.rtc.handle_input(Input::Timeout(Instant::now()))?;
                }
                _ = cancel.cancelled() => {
                    self.rtc.disconnect();
                    let _ = self.drain();
                    return Ok("deleted");
                }
            }
        }
    }

    /// Subscribes to the layer the chooser wants when it is neither sent nor being joined,
    /// and keeps str0m probing toward the next layer up.
    fn steer_layers(&mut self) {
        let l = &mut self.layers;
        let Some(chooser) = &l.chooser else { return };
        let desired = chooser.desired_bps();
        if desired != l.desired_bps {
            l.desired_bps = desired;
            self.rtc
                .bwe()
                .set_bitrate(Bitrate::ZERO, Bitrate::bps(desired));
        }
        let l = &mut self.layers;
        // A join waits for the layer's next keyframe: ask again while it has not come (a
        // request can be lost on the way; every hop's gate merges the repeats).
        if let (Some(next), Some(_)) = (&mut l.next, &l.current) {
            if next.asked.elapsed() >= LAYER_KEYFRAME_REPEAT {
                next.sub.request_keyframe();
                next.asked = Instant::now();
            }
        }
        let Some(chooser) = &l.chooser else { return };
        let target = chooser.target().rid.as_str();
        let have = |s: &Option<LayerSub>| s.as_ref().is_some_and(|s| s.rid == target);
        let opening = l.opening.as_ref().is_some_and(|(r, _)| r == target);
        let failed_lately = l.open_failed.is_some_and(|t| t.elapsed() < LAYER_RETRY);
        if have(&l.current) || have(&l.next) || opening || failed_lately {
            return;
        }
        let target = target.to_string();
        l.next = None;
        let (tx, rx) = oneshot::channel();
        let (hub, key) = (l.hub.clone(), l.stream.layer(&target));
        tokio::spawn(async move {
            match hub.subscribe(&key, Scope::Any).await {
                Ok(sub) => {
                    let _ = tx.send(Some(sub));
                }
                Err(e) => debug!("layer {key}: {e}"),
            }
        });
        l.opening = Some((target, rx));
    }

    fn on_layer_event(&mut self, ev: Result<StreamEvent, SubscriptionEnd>) {
        match ev {
            Ok(StreamEvent::Config(c)) => {
                if let Some(cur) = &mut self.layers.current {
                    cur.config = Some(c);
                }
            }
            Ok(StreamEvent::Frame(p)) => self.send_layer_frame(&p),
            Ok(StreamEvent::Discontinuity) => {}
            // The layer stopped (its publisher dropped it): the chooser's target is joined
            // again, or another one once the layer list changes.
            Err(_) => self.layers.current = None,
        }
    }

    /// Events of the layer being joined: it becomes the sent layer at its first keyframe
    /// after the last frame sent, so the picture switches cleanly and time runs on.
    fn on_next_layer_event(&mut self, ev: Result<StreamEvent, SubscriptionEnd>) {
        let l = &mut self.layers;
        let Some(next) = &mut l.next else { return };
        match ev {
            Ok(StreamEvent::Config(c)) => next.config = Some(c),
            Ok(StreamEvent::Frame(p)) => {
                let pts = p.frame.timebase.rescale(p.frame.pts, VIDEO_CLOCK);
                // Layers share one timeline (aligned at ingest), so a requested keyframe is
                // often the same capture as the frame just sent from the current layer:
                // it replaces that picture, one tick later for the decoder.
                let step = l.last_video_pts.map_or(0, |last| last + 1 - pts);
                let joinable = step <= SAME_CAPTURE_TICKS;
                if p.frame.is_video_keyframe() {
                    debug!(rid = %next.rid, pts, last = ?l.last_video_pts, configured = next.config.is_some(), "keyframe on the layer being joined");
                }
                if p.frame.is_video_keyframe() && joinable && next.config.is_some() {
                    if step > 0 {
                        self.video_rtp.ts_offset =
                            self.video_rtp.ts_offset.wrapping_add(step as u32);
                    }
                    let l = &mut self.layers;
                    let next = l.next.take().expect("next layer");
                    info!(from = ?l.current.as_ref().map(|c| &c.rid), to = %next.rid, "simulcast layer switch");
                    if let Some(chooser) = &mut l.chooser {
                        chooser.switched(Instant::now(), &next.rid);
                    }
                    l.current = Some(next);
                    self.send_layer_frame(&p);
                }
            }
            Ok(StreamEvent::Discontinuity) => {}
            Err(_) => l.next = None,
        }
    }

    fn send_layer_frame(&mut self, p: &Arc<Packet>) {
        let Some(config) = self.layers.current.as_ref().and_then(|c| c.config.clone()) else {
            return;
        };
        if !(p.frame.track() == TrackKind::Video) {
            return;
        }
        let bytes = self.send_frame(p, &config);
        let l = &mut self.layers;
        l.last_video_pts = Some(p.frame.timebase.rescale(p.frame.pts, VIDEO_CLOCK));
        if let Some(chooser) = &mut l.chooser {
            chooser.on_sent(Instant::now(), bytes);
        }
    }

    /// Sends what str0m has to send (in GSO batches) and handles its events; returns its
    /// next timeout.
    fn drain(&mut self) -> Result<Instant, str0m::RtcError> {
        let next = self.poll();
        self.io.flush();
        next
    }

    /// Hands str0m's output to the send batch and handles its events until str0m waits;
    /// returns when it wants to be woken.
    fn poll(&mut self) -> Result<Instant, str0m::RtcError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        // str0m often asks for a timeout that is already due (its send queues want a
        // fresh look right after media was written): handling it here rather than through
        // the runtime's timer saves a wake-up per frame. A few rounds at most.
        let mut due_rounds = 0;
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(t) if due_rounds < 4 && t <= Instant::now() => {
                    due_rounds += 1;
                    self.rtc.handle_input(Input::Timeout(Instant::now()))?;
                }
                Output::Timeout(t) => return Ok(t),
                Output::Transmit(t) => self.io.transmit(&t),
                Output::Event(ev) => self.on_event(ev),
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Connected => {
                info!("connected");
                self.connected = true;
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                info!("ICE disconnected");
                self.rtc.disconnect();
            }
            Event::MediaAdded(m) if m.kind == MediaKind::Video && self.video.is_none() => {
                let codec = match self.video_codec {
                    Codec::Vp8 => RtcCodec::Vp8,
                    _ => RtcCodec::H264,
                };
                match negotiated(&self.rtc, m.mid, codec) {
                    Some(pt) => self.video = Some(TrackOut::new(m.mid, &pt)),
                    None => warn!("viewer offered no {codec:?} for the stream's video"),
                }
                bound_rtx_cache(&mut self.rtc, m.mid);
            }
            Event::MediaAdded(m) if m.kind == MediaKind::Audio && self.audio.is_none() => {
                self.audio = negotiated(&self.rtc, m.mid, RtcCodec::Opus)
                    .map(|pt| TrackOut::new(m.mid, &pt));
                bound_rtx_cache(&mut self.rtc, m.mid);
            }
            Event::KeyframeRequest(r) => {
                debug!(kind = ?r.kind, "keyframe request from viewer");
                match &self.layers.current {
                    Some(layer) => layer.sub.request_keyframe(),
                    None => self.sub.request_keyframe(),
                }
            }
            Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) => {
                debug!(%estimate, "viewer bandwidth estimate");
                if let Some(chooser) = &mut self.layers.chooser {
                    chooser.on_estimate(Instant::now(), estimate.as_u64());
                }
            }
            _ => {}
        }
    }

    /// Sends one frame; returns the payload bytes sent.
    fn send_frame(&mut self, p: &Arc<Packet>, config: &StreamConfig) -> usize {
        let (track, rtp, clock) = match p.frame.codec {
            Codec::H264 | Codec::Vp8 => (self.video, &mut self.video_rtp, VIDEO_CLOCK),
            Codec::Opus => (self.audio, &mut self.audio_rtp, OPUS_CLOCK),
            // AAC reaches WebRTC viewers bridged to Opus (crate::bridge).
            Codec::Aac => return 0,
        };
        let Some(track) = track else { return 0 };
        let payloads = RTP_PAYLOADS.get(p, |p| packetize(p, config));
        let time = rtp.timestamp(p.frame.timebase.rescale(p.frame.pts, clock));
        let mut seq = rtp.seq;
        rtp.seq += payloads.len() as u64;
        let mut chunks = payloads.chunks(SEND_CHUNK).peekable();
        while let Some(chunk) = chunks.next() {
            let last_chunk = chunks.peek().is_none();
            write_packets(&mut self.rtc, track, seq, time, chunk, last_chunk);
            seq += chunk.len() as u64;
            if !last_chunk {
                self.send_queued();
            }
        }
        payloads.iter().map(|p| p.len()).sum()
    }

    /// Moves the packets written so far into the send batch, so that str0m's send queue
    /// holds [`SEND_CHUNK`] packets at most instead of a keyframe's worth: each queued
    /// packet is ~400 bytes of str0m state, and the queue keeps its largest size for the
    /// viewer's lifetime. The rest of the frame goes out in [`Self::drain`], which also
    /// returns an error met here.
    fn send_queued(&mut self) {
        if let Err(e) = self.poll() {
            self.failed = Some(e);
        }
    }
}

/// A frame's RTP payloads, shared by every viewer.
static RTP_PAYLOADS: Encoding<Vec<Arc<[u8]>>> = Encoding::new("rtp payloads");

/// A frame's RTP payloads, per codec (built once per frame per node).
fn packetize(p: &Packet, config: &StreamConfig) -> Vec<Arc<[u8]>> {
    match p.frame.codec {
        Codec::H264 => {
            let (sps, pps) = config
                .video
                .as_ref()
                .and_then(|v| avc::parse_decoder_config(&v.record).ok())
                .map(|c| (c.sps.first().cloned(), c.pps.first().cloned()))
                .unwrap_or((None, None));
            h264::packetize(
                &p.frame.payload,
                sps.as_deref().unwrap_or(&[]),
                pps.as_deref().unwrap_or(&[]),
                RTP_MTU,
            )
        }
        Codec::Vp8 => vp8::packetize(&p.frame.payload, RTP_MTU),
        Codec::Opus => vec![Arc::from(&p.frame.payload[..])],
        Codec::Aac => vec![],
    }
}

/// Resends cover what a NACK can still save at live latency: the last second, at most
/// [`RTX_CACHE_PACKETS`] packets. (str0m's default, 1024 packets / 3 s per stream, was most of
/// a viewer's memory.) No cap on the resent share: the cap's byte history (an entry per
/// packet sent in the last second) cost ~20 KB per viewer, and resends are already bounded
/// by this cache.
fn bound_rtx_cache(rtc: &mut Rtc, mid: Mid) {
    if let Some(tx) = rtc.direct_api().stream_tx_by_mid(mid, None) {
        tx.set_rtx_cache(RTX_CACHE_PACKETS, Duration::from_secs(1), None);
    }
}

/// Writes consecutive RTP payloads of a frame on `track`, numbered from `seq`; the marker
/// goes on the last one if `ends_frame`.
fn write_packets(
    rtc: &mut Rtc,
    track: TrackOut,
    seq: u64,
    time: u32,
    payloads: &[Arc<[u8]>],
    ends_frame: bool,
) {
    let mut api = rtc.direct_api();
    let Some(tx) = api.stream_tx_by_mid(track.mid, None) else {
        return;
    };
    let now = Instant::now();
    let last = payloads.len().saturating_sub(1);
    for (i, payload) in payloads.iter().enumerate() {
        tx.write_rtp(
            RtpWrite::new(
                track.pt,
                SeqNo::from(seq + i as u64),
                time,
                now,
                payload.clone(),
            )
            .marker(ends_frame && i == last)
            .nackable(track.nack),
        );
    }
}

/// The negotiated payload of `codec` on an m-line (H.264 only with packetization-mode 1).
pub(crate) fn negotiated(
    rtc: &Rtc,
    mid: Mid,
    codec: RtcCodec,
) -> Option<str0m::format::PayloadParams> {
    let media = rtc.media(mid)?;
    let params = rtc.codec_config().params();
    media.remote_pts().iter().find_map(|pt| {
        params
            .iter()
            .find(|p| {
                p.pt() == *pt
                    && p.spec().codec == codec
                    && (codec != RtcCodec::H264 || p.spec().format.packetization_mode == Some(1))
            })
            .cloned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_that_makes_str0m_panic_is_refused_not_unwound() {
        // Found by fuzz/fuzz_targets/sdp_offer.rs: a payload type given two different H.264
        // formats on two bundled m-lines trips str0m's "Pt locked multiple times"
        // assertion inside accept_offer.
        let offer = [
        "v=0",
        "o=- 1 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE v a",
        "m=video 9 UDP/TLS/RTP/SAVPF 123",
        "c=IN IP4 0.0.0.0",
        "a=mid:v",
        "a=sendrecv",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:abcdefghijklmnopqrstuvwx",
        "a=fingerprint:sha-256 AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA",
        "a=setup:actpass",
        "a=rtpmap:123 H264/90000",
        "a=fmtp:123 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "c=IN IP4 0.0.0.0",
        "a=mid:a",
        "a=sendrecv",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:abcdefghijklmnopqrstuvwx",
        "a=fingerprint:sha-256 AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA:AA",
        "a=setup:actpass",
        "a=rtpmap:123 H264/90000",
        "a=fmtp:123 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=4d001f",
        "a=rtpmap:111 opus/48000/2",
        ]
        .map(|l| format!("{l}\r\n"))
        .concat();
        let cert = dtls_certificate().expect("a DTLS certificate");
        let addr: SocketAddr = "192.0.2.10:8189".parse().unwrap();
        for kind in [PeerKind::Publisher, PeerKind::Viewer] {
            let r = answer_offer(&offer, kind, &cert, &[addr], false);
            assert!(matches!(r, Err(WebRtcError::BadOffer(_))), "{kind:?}");
        }
    }
}
