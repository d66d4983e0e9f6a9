//! The backbone: QUIC links between nodes (quinn), driving the sans-IO [`session`] and
//! [`wire`] code.
//!
//! * Every node dials the addresses in its config (origins: the other origins; edges: their
//!   origins) and keeps redialing. The dialer of a connection subscribes; the acceptor
//!   announces its local streams (to origins) and sends media. Two origins that list each
//!   other hold one connection per direction.
//! * A subscription's media travels one QUIC unidirectional stream per group (GOP), written by
//!   [`send_media`] and put back in order by [`group::GroupSequencer`].
//! * [`Backbone`] implements the hub's [`Upstream`]: an edge pulls from the first origin of its
//!   list that is connected; an origin pulls from the origin whose announce it holds, and never
//!   passes on another origin's stream to a third origin (one hop).
//!
//! One task per connection owns its control stream; one task per served subscription writes
//! its groups; one task per received group stream reads it. Queues are bounded: a served
//! subscription that cannot keep up skips to the next keyframe via the hub's ring.
//!
//! Nothing a peer sends makes a node grow without bound: at most [`MAX_INBOUND_LINKS`]
//! inbound connections, QUIC stream limits per connection ([`tls`]), a hello that must
//! complete within [`HELLO_TIMEOUT`] and [`wire::HANDSHAKE_MESSAGE`] bytes per message, and
//! media items read into buffers that grow as their bytes arrive (never to an announced
//! length). The nonces of the hello come from the OS generator here, not in the session.
//! Without a `backbone.token` the node refuses every incoming connection (said once in the
//! log): an empty token authenticates nobody.

pub mod auth;
pub mod directory;
pub mod group;
pub mod nodes;
pub mod pki;
pub mod session;
pub mod tls;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::config::{Config, Role};
use crate::hub::{
    BoxFuture, Hub, HubEvent, KeyframeRequester, Publisher, Scope, StreamEvent, Subscription,
    SubscriptionEnd, Upstream,
};
use crate::media::keyframe::{KeyframeRequestGate, KEYFRAME_REQUEST_INTERVAL};
use crate::media::splice::Splicer;
use crate::media::Packet;
use crate::media::{StreamConfig, StreamKey, TrackKind};
use auth::Nonce;
use directory::Directory;
use group::GroupSequencer;
use nodes::{NodeTable, NODE_STATE_INTERVAL};
use session::{ControlSession, PeerInfo, SessionError, SessionEvent};
use wire::{code, Announcement, GroupHeader, MediaItem, NodeRecord, PeerRole, GROUP_HEADER_LEN};

/// Time for a peer to complete the hello exchange (from the QUIC handshake's end, control
/// stream included).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Inbound backbone connections held at once (authenticated or not); more are refused.
pub const MAX_INBOUND_LINKS: usize = 512;
/// Time for an upstream to answer a subscribe.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A group that makes no progress this long while a newer one waits is abandoned.
const GROUP_STALL: Duration = Duration::from_millis(500);
/// Items buffered between group readers and a pull.
const FEED_QUEUE: usize = 512;
/// Audio-only streams start a new group every this many frames.
const AUDIO_GROUP_FRAMES: u32 = 50;
const REDIAL_MIN: Duration = Duration::from_millis(200);
const REDIAL_MAX: Duration = Duration::from_secs(2);

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
    #[error("peer presumed dead: {0}")]
    Silent(String),
    #[error("no random nonce from the OS")]
    Random,
    #[error("cannot export the TLS channel binding")]
    ChannelBinding,
    #[error("{0}")]
    Certificate(String),
}

/// Rival publishes of one name started this close together count as a race (the message
/// to the loser says so); farther apart, the later one was simply late.
const RACE_WINDOW_MS: u64 = 1000;

/// How often a link's liveness is checked.
const LIVENESS_TICK: Duration = Duration::from_millis(50);
/// How often a pull that lost its upstream looks for another.
const REHOME_RETRY: Duration = Duration::from_millis(100);

/// Watches that datagrams keep arriving on a connection. QUIC keep-alives
/// ([`tls::KEEP_ALIVE`]) make a live peer answer several times per timeout even when no
/// media flows, so silence means the peer or the path is gone: a dead origin is noticed
/// in `timeout`, not the QUIC idle timeout.
struct Silence {
    datagrams: u64,
    since: Instant,
    timeout: Duration,
}

impl Silence {
    fn new(conn: &quinn::Connection, timeout: Duration) -> Silence {
        Silence {
            datagrams: conn.stats().udp_rx.datagrams,
            since: Instant::now(),
            timeout,
        }
    }

    /// How long the link has been silent, once that exceeds the timeout.
    fn check(&mut self, conn: &quinn::Connection, now: Instant) -> Option<Duration> {
        self.observe(conn.stats().udp_rx.datagrams, now)
    }

    fn observe(&mut self, datagrams: u64, now: Instant) -> Option<Duration> {
        if datagrams != self.datagrams {
            self.datagrams = datagrams;
            self.since = now;
            return None;
        }
        let silent = now.saturating_duration_since(self.since);
        (silent >= self.timeout).then_some(silent)
    }
}

/// What flows from group readers to a pull.
enum FeedItem {
    Media {
        group: u64,
        item: MediaItem,
    },
    GroupEnd {
        group: u64,
    },
    /// The upstream ended the subscription (`code` from [`wire::code`]).
    Done {
        code: u16,
        reason: String,
    },
}

/// An accepted upstream subscription: its id, timeline and media.
struct Accepted {
    id: u64,
    session: u64,
    feed: mpsc::Receiver<FeedItem>,
}

enum LinkCommand {
    Subscribe {
        stream: StreamKey,
        reply: oneshot::Sender<Result<Accepted, String>>,
    },
    Unsubscribe(u64),
    KeyframeRequest(u64),
}

/// An established link this node dialed.
struct OutboundLink {
    peer: PeerInfo,
    conn: quinn::Connection,
    commands: mpsc::Sender<LinkCommand>,
    /// When the link came up.
    since: Instant,
}

/// An established link a peer dialed.
struct InboundLink {
    peer: PeerInfo,
    conn: quinn::Connection,
}

/// A link as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct LinkInfo {
    pub node: String,
    pub role: PeerRole,
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

pub struct Backbone {
    me: Weak<Backbone>,
    hub: Arc<Hub>,
    local: PeerInfo,
    role: Role,
    token: String,
    /// Mutual TLS with per-node certificates: a peer's certificate must name its node.
    node_certs: bool,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    /// Addresses to dial, in preference order.
    upstreams: Vec<SocketAddr>,
    outbound: Mutex<HashMap<SocketAddr, OutboundLink>>,
    inbound: Mutex<HashMap<usize, InboundLink>>,
    /// Inbound connections held now, authenticated or not (at most [`MAX_INBOUND_LINKS`]).
    inbound_slots: Arc<tokio::sync::Semaphore>,
    /// Which origin publishes each stream (from announces).
    directory: Mutex<Directory>,
    /// The other nodes' records; this node's own.
    nodes: Mutex<NodeTable>,
    me_record: Mutex<NodeRecord>,
    max_viewers: u32,
    idle_grace: Duration,
    link_timeout: Duration,
    rehome_window: Duration,
    return_after: Duration,
    write_timeout: Duration,
    shutdown: CancellationToken,
}

impl Backbone {
    /// Binds the QUIC endpoint and starts accepting and dialing.
    pub fn start(
        config: &Config,
        hub: Arc<Hub>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Backbone>> {
        let bb = &config.backbone;
        let client_config = tls::client_config(bb)?;
        let endpoint = match bb.listen {
            Some(addr) => quinn::Endpoint::server(tls::server_config(bb)?, addr)?,
            None => {
                let ip = bb.bind.unwrap_or(match bb.origins.first() {
                    Some(SocketAddr::V6(_)) => IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
                    _ => IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
                });
                quinn::Endpoint::client(SocketAddr::new(ip, 0))?
            }
        };
        let role = config.node.role;
        let upstreams = match role {
            Role::Edge => bb.origins.clone(),
            _ => bb.peers.clone(),
        };
        let peer_role = match role {
            Role::Origin => PeerRole::Origin,
            Role::Edge => PeerRole::Edge,
            Role::Standalone => PeerRole::Standalone,
        };
        let backbone = Arc::new_cyclic(|me| Backbone {
            me: me.clone(),
            hub,
            local: PeerInfo {
                node_id: config.node.id.clone(),
                role: peer_role,
                region: config.node.region.clone(),
            },
            role,
            token: bb.token.clone(),
            node_certs: tls::node_certificates(bb),
            endpoint,
            client_config,
            upstreams,
            outbound: Mutex::new(HashMap::new()),
            inbound: Mutex::new(HashMap::new()),
            inbound_slots: Arc::new(tokio::sync::Semaphore::new(MAX_INBOUND_LINKS)),
            directory: Mutex::new(Directory::default()),
            nodes: Mutex::new(NodeTable::new(&config.node.id)),
            me_record: Mutex::new(NodeRecord {
                node: config.node.id.clone(),
                role: peer_role,
                region: config.node.region.clone(),
                http_url: config.public_http_url(),
                rtmp_url: config.public_rtmp_url(),
                incarnation: crate::clock::unix_ms(),
                age_ms: 0,
                viewers: 0,
                load_permille: 0,
                egress: 0,
                out_bps: 0,
                links: vec![],
                streams: vec![],
                pulls: vec![],
            }),
            max_viewers: config.node.max_viewers,
            idle_grace: bb.idle_grace,
            link_timeout: bb.link_timeout,
            rehome_window: bb.rehome_window,
            return_after: bb.return_after,
            write_timeout: config.limits.viewer_write_timeout,
            shutdown,
        });
        let me = Arc::downgrade(&backbone);
        backbone
            .hub
            .metrics()
            .links
            .set_reader(move || me.upgrade().map(|b| b.link_samples()).unwrap_or_default());
        if bb.listen.is_some() {
            if bb.token.is_empty() {
                warn!(
                    "backbone: no backbone.token is set, so the backbone is closed: every incoming \
                     backbone connection is refused until a token (16 bytes or more) is set"
                );
            }
            tokio::spawn(backbone.clone().accept_loop());
        }
        tokio::spawn(backbone.clone().state_loop());
        for (i, addr) in backbone.upstreams.clone().into_iter().enumerate() {
            tokio::spawn(backbone.clone().dial_loop(addr, i));
        }
        Ok(backbone)
    }

    /// The UDP address the endpoint is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    fn arc(&self) -> Arc<Backbone> {
        // `self` is alive, so is its Arc.
        self.me.upgrade().expect("backbone alive while in use")
    }

    pub fn links(&self) -> Vec<LinkInfo> {
        let mut out: Vec<LinkInfo> = self
            .outbound
            .lock()
            .values()
            .map(|l| link_info(&l.peer, &l.conn, "outbound"))
            .collect();
        out.extend(
            self.inbound
                .lock()
                .values()
                .map(|l| link_info(&l.peer, &l.conn, "inbound")),
        );
        out.sort_by(|a, b| (a.direction, &a.node).cmp(&(b.direction, &b.node)));
        out
    }

    /// Which origin announced each stream, as this node's directory has it (by stream).
    /// The links' transport figures for `/metrics`.
    fn link_samples(&self) -> Vec<crate::metrics::LinkSample> {
        self.links()
            .into_iter()
            .map(|l| crate::metrics::LinkSample {
                node: l.node,
                direction: l.direction,
                rtt_ms: l.rtt_ms,
                sent_packets: l.sent_packets,
                lost_packets: l.lost_packets,
                sent_bytes: l.sent_bytes,
                received_bytes: l.received_bytes,
            })
            .collect()
    }

    pub fn directory(&self) -> Vec<(StreamKey, String)> {
        self.directory.lock().list()
    }

    /// Closes every link and the endpoint.
    pub async fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    async fn accept_loop(self: Arc<Self>) {
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
                        conn.close(1u32.into(), e.to_string().as_bytes());
                    }
                }
                .instrument(span)
                .await
            });
        }
    }

    async fn dial_loop(self: Arc<Self>, addr: SocketAddr, index: usize) {
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
                tokio::select! {
                    r = attempt => match r {
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
                    _ = self.shutdown.cancelled() => return,
                }
                if started.elapsed() > Duration::from_secs(5) {
                    backoff = REDIAL_MIN;
                    refusal_said = false;
                }
                let _ = index;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = self.shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(REDIAL_MAX);
            }
        }
        .instrument(span)
        .await
    }

    /// With per-node certificates: whether the peer's certificate names the node its hello
    /// claims (TLS has already checked it against the CA).
    fn check_certificate(
        &self,
        conn: &quinn::Connection,
        peer: &PeerInfo,
    ) -> Result<(), LinkError> {
        if !self.node_certs {
            return Ok(());
        }
        let cert = pki::peer_certificate(conn)
            .ok_or_else(|| LinkError::Certificate("the peer showed no certificate".into()))?;
        pki::names_node(&cert, &peer.node_id).map_err(LinkError::Certificate)
    }

    /// Drives a link this node dialed: hello, announces in, subscriptions out, media in.
    async fn run_outbound(
        self: Arc<Self>,
        addr: SocketAddr,
        conn: quinn::Connection,
    ) -> Result<(), LinkError> {
        let (mut send, mut recv) = conn.open_bi().await?;
        let mut session = ControlSession::dialer(
            self.local.clone(),
            &self.token,
            fresh_nonce()?,
            channel_binding(&conn)?,
        );
        flush(&mut session, &mut send).await?;
        let hello = tokio::time::timeout(
            HELLO_TIMEOUT,
            read_until_ready(&mut session, &mut recv, Some(&mut send)),
        )
        .await
        .map_err(|_| LinkError::HelloTimeout)?;
        let (peer, early) = match hello {
            Ok(ready) => ready,
            Err(e) => {
                say_last_words(&mut session, &mut send).await;
                conn.close(1u32.into(), e.to_string().as_bytes());
                return Err(e);
            }
        };
        if let Err(e) = self.check_certificate(&conn, &peer) {
            conn.close(1u32.into(), e.to_string().as_bytes());
            return Err(e);
        }
        info!(node = %peer.node_id, role = ?peer.role, region = %peer.region, "link up");
        let link_id = conn.stable_id();
        let (cmd_tx, mut cmd_rx) = mpsc::channel(64);
        self.outbound.lock().insert(
            addr,
            OutboundLink {
                peer: peer.clone(),
                conn: conn.clone(),
                commands: cmd_tx,
                since: Instant::now(),
            },
        );
        self.hub.metrics().backbone_links.inc();
        let feeds: Arc<Mutex<HashMap<u64, mpsc::Sender<FeedItem>>>> = Arc::default();
        let mut pending: HashMap<u64, PendingSubscribe> = HashMap::new();
        let uni = tokio::spawn(
            accept_groups(conn.clone(), feeds.clone(), self.hub.clone())
                .instrument(tracing::Span::current()),
        );

        let result = async {
            for ev in early {
                self.on_dialer_event(&peer, link_id, ev, &feeds, &mut pending)?;
            }
            let mut buf = vec![0u8; 16 * 1024];
            let mut watchdog = Silence::new(&conn, self.link_timeout);
            let mut tick = tokio::time::interval(LIVENESS_TICK);
            let mut state_tick = tokio::time::interval(NODE_STATE_INTERVAL);
            loop {
                tokio::select! {
                    // The acceptor takes only our own record from us (see `session`).
                    _ = state_tick.tick() => session.node_state(self.records_for(peer.role, false)),
                    n = recv.read(&mut buf) => {
                        let n = n?.ok_or(LinkError::ControlClosed)?;
                        for ev in session.handle_input(&buf[..n])? {
                            self.on_dialer_event(&peer, link_id, ev, &feeds, &mut pending)?;
                        }
                    }
                    _ = tick.tick() => {
                        if let Some(silent) = watchdog.check(&conn, Instant::now()) {
                            self.hub.metrics().backbone_links_timed_out.inc();
                            let reason = format!("nothing heard for {} ms", silent.as_millis());
                            conn.close(2u32.into(), reason.as_bytes());
                            return Err(LinkError::Silent(reason));
                        }
                        continue;
                    }
                    cmd = cmd_rx.recv() => match cmd {
                        Some(LinkCommand::Subscribe { stream, reply }) => {
                            let id = session.subscribe(stream)?;
                            let (tx, rx) = mpsc::channel(FEED_QUEUE);
                            // Registered before the request leaves: media may beat the answer.
                            feeds.lock().insert(id, tx);
                            pending.insert(id, PendingSubscribe { reply, feed: rx });
                        }
                        Some(LinkCommand::Unsubscribe(id)) => {
                            feeds.lock().remove(&id);
                            session.unsubscribe(id)?;
                        }
                        Some(LinkCommand::KeyframeRequest(id)) => session.request_keyframe(id)?,
                        None => return Ok(()),
                    },
                    e = conn.closed() => return Err(LinkError::Connection(e)),
                    _ = self.shutdown.cancelled() => {
                        session.go_away("shutdown");
                        let _ = flush(&mut session, &mut send).await;
                        return Ok(());
                    }
                }
                flush(&mut session, &mut send).await?;
            }
        }
        .await;

        uni.abort();
        self.outbound.lock().remove(&addr);
        self.hub.metrics().backbone_links.dec();
        self.directory.lock().drop_node(&peer.node_id);
        self.nodes.lock().forget_link(link_id);
        // Dropping the feeds ends every pull over this link.
        feeds.lock().clear();
        result
    }

    fn on_dialer_event(
        &self,
        peer: &PeerInfo,
        link_id: usize,
        ev: SessionEvent,
        feeds: &Mutex<HashMap<u64, mpsc::Sender<FeedItem>>>,
        pending: &mut HashMap<u64, PendingSubscribe>,
    ) -> Result<(), LinkError> {
        match ev {
            SessionEvent::Announced(a) => self.on_announce(peer, a),
            SessionEvent::NodeState(records) => self.on_node_state(peer, link_id, records),
            SessionEvent::Withdrawn(stream) => {
                debug!(%stream, "withdrawn");
                self.directory.lock().withdraw(&peer.node_id, &stream);
            }
            SessionEvent::SubscribeAccepted { id, session } => {
                if let Some(p) = pending.remove(&id) {
                    let _ = p.reply.send(Ok(Accepted {
                        id,
                        session,
                        feed: p.feed,
                    }));
                }
            }
            SessionEvent::SubscribeRejected { id, code, reason } => {
                feeds.lock().remove(&id);
                if let Some(p) = pending.remove(&id) {
                    let _ = p.reply.send(Err(format!("{code} {reason}")));
                }
            }
            SessionEvent::SubscriptionDone { id, code, reason } => {
                if let Some(tx) = feeds.lock().remove(&id) {
                    let _ = tx.try_send(FeedItem::Done { code, reason });
                }
                pending.remove(&id);
            }
            SessionEvent::GoAway(reason) => return Err(LinkError::GoAway(reason)),
            SessionEvent::Ready(_)
            | SessionEvent::SubscribeRequested { .. }
            | SessionEvent::Unsubscribed(_)
            | SessionEvent::KeyframeRequested(_) => {}
        }
        Ok(())
    }

    /// Records an origin's announce. A name published on two origins (two publishers raced,
    /// or a publisher started on one origin while another holds the name) goes to the
    /// publish that ranks first ([`Announcement::rank`]): every node computes the same
    /// winner. The origin holding the loser evicts its publisher, telling it why; viewers
    /// pulling the loser's copy re-home to the winner ([`code::MOVED`]). The winner answers
    /// a rival's announce by announcing again, so the rival learns it lost even when the
    /// winner's first announce reached it before its own publish began.
    fn on_announce(&self, peer: &PeerInfo, a: Announcement) {
        debug!(stream = %a.stream, session = a.session, "announced");
        let key = a.stream.clone();
        let theirs = (a.started_ms, peer.node_id.clone());
        self.directory.lock().announce(&peer.node_id, a);
        let Some(local) = self.hub.get(&key).filter(|s| s.is_local()) else {
            return;
        };
        let mine = (local.started_ms(), self.local.node_id.clone());
        if theirs < mine {
            let earlier = mine.0.saturating_sub(theirs.0);
            let reason = if earlier < RACE_WINDOW_MS {
                format!(
                    "lost the publish race for {key} to {} (published {earlier} ms earlier)",
                    theirs.1
                )
            } else {
                format!("{key} is already published on {}", theirs.1)
            };
            warn!("{reason}");
            self.hub.evict(&key, &reason);
        } else {
            info!(stream = %key, rival = %theirs.1,
                "{key} is also published on {}; this node's publish came first and keeps it",
                theirs.1);
            self.hub.reannounce(&key);
        }
    }

    /// Records the session let through (see `session` for whose records each side takes).
    fn on_node_state(&self, peer: &PeerInfo, link_id: usize, records: Vec<NodeRecord>) {
        self.nodes
            .lock()
            .update(records, &peer.node_id, link_id, Instant::now());
    }

    /// The node records to send to a peer of `role`: this node's, then (origins only, and
    /// only on links the peer dialed: `pass_on`) what it passes on
    /// ([`NodeTable::to_pass_on`]).
    fn records_for(&self, role: PeerRole, pass_on: bool) -> Vec<NodeRecord> {
        let mut out = vec![self.me_record.lock().clone()];
        if pass_on && self.local.role.is_origin() {
            out.extend(self.nodes.lock().to_pass_on(role, Instant::now()));
        }
        let dropped = nodes::fit_streams(&mut out, nodes::STATE_STREAM_BYTES);
        if dropped > 0 {
            debug!(dropped, "node state: stream lists over budget left out");
        }
        out
    }

    /// Every live node record this node knows, its own included.
    pub fn node_records(&self) -> Vec<NodeRecord> {
        let mut out = vec![self.me_record.lock().clone()];
        out.extend(self.nodes.lock().fresh(Instant::now()));
        out
    }

    /// Refreshes this node's own record every [`NODE_STATE_INTERVAL`]: viewers, load
    /// (viewers against `node.max_viewers`, and CPU), measured link RTTs, streams held.
    async fn state_loop(self: Arc<Self>) {
        let mut cpu = CpuSampler::new();
        let mut sent = (self.hub.metrics().bytes_out_total(), Instant::now());
        let mut tick = tokio::time::interval(NODE_STATE_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let streams = self.hub.list();
            let attached: i64 = streams.iter().map(|s| s.subscribers as i64).sum();
            let relays = self
                .hub
                .metrics()
                .viewers_of(crate::metrics::Proto::Backbone);
            let viewers = (attached - relays).max(0) as u32;
            let by_viewers = (viewers as f64 / self.max_viewers as f64).min(1.0);
            let load = by_viewers.max(cpu.sample());
            let mut links: Vec<(String, u32)> = self
                .links()
                .into_iter()
                .map(|l| (l.node, (l.rtt_ms * 1000.0) as u32))
                .collect();
            links.sort();
            links.dedup_by(|a, b| a.0 == b.0);
            let metrics = self.hub.metrics();
            let now = (metrics.bytes_out_total(), Instant::now());
            let secs = now.1.duration_since(sent.1).as_secs_f64().max(1e-3);
            let out_bps = (now.0.saturating_sub(sent.0) as f64 * 8.0 / secs) as u64;
            sent = now;
            let mut pulls: HashMap<String, u32> = HashMap::new();
            for s in &streams {
                if let crate::hub::Source::Relay { node } = &s.source {
                    *pulls.entry(node.clone()).or_default() += 1;
                }
            }
            let mut pulls: Vec<(String, u32)> = pulls.into_iter().collect();
            pulls.sort();
            let mut me = self.me_record.lock();
            me.viewers = viewers;
            me.egress = metrics.egress_active.get().max(0) as u32;
            me.out_bps = out_bps;
            me.pulls = pulls;
            me.load_permille = (load * 1000.0).round() as u16;
            me.links = links;
            me.streams = streams
                .into_iter()
                // Derived streams (audio bridges) are local views, not names on the wire.
                .filter(|s| !matches!(s.source, crate::hub::Source::Bridge { .. }))
                .map(|s| s.stream)
                .take(wire::MAX_RECORD_ITEMS)
                .collect();
        }
    }

    /// Whether the best-ranked announcer of `key` is alive: it answers within the link
    /// timeout (its QUIC keep-alives arrive several times a second). A node that just died
    /// still has its announces here until its link times out; a publisher that moved to
    /// another origin at once must not be refused for them.
    async fn owner_alive(&self, key: &StreamKey) -> Option<String> {
        // An edge has no directory: a name it relays from a linked origin is taken.
        let relayed_from = self.hub.get(key).and_then(|s| match s.source() {
            crate::hub::Source::Relay { node } => Some(node),
            _ => None,
        });
        let owner = self.directory.lock().owner(key).map(|o| o.node.clone());
        let node = match (self.role, relayed_from) {
            (Role::Edge, Some(node)) => node,
            _ => owner?,
        };
        let conn = self
            .outbound
            .lock()
            .values()
            .find(|l| l.peer.node_id == node)
            .map(|l| l.conn.clone())?;
        let heard = conn.stats().udp_rx.datagrams;
        let deadline = Instant::now() + self.link_timeout;
        while Instant::now() < deadline && conn.close_reason().is_none() {
            if conn.stats().udp_rx.datagrams > heard {
                return Some(node);
            }
            tokio::time::sleep(LIVENESS_TICK / 2).await;
        }
        None
    }

    fn local_announcements(&self) -> Vec<Announcement> {
        self.hub
            .local_streams()
            .into_iter()
            .filter_map(|k| self.announcement(k))
            .collect()
    }

    /// This node's announce of a local stream, if it is still published here.
    fn announcement(&self, key: StreamKey) -> Option<Announcement> {
        let stream = self.hub.get(&key).filter(|s| s.is_local())?;
        Some(Announcement {
            session: stream.session(),
            started_ms: stream.started_ms(),
            stream: key,
        })
    }

    /// Drives a link a peer dialed: hello, announces out, subscriptions in, media out.
    async fn run_inbound(self: Arc<Self>, conn: quinn::Connection) -> Result<(), LinkError> {
        // One deadline for the whole hello: opening the control stream and the exchange.
        let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
        let (mut send, mut recv) = tokio::time::timeout_at(deadline, conn.accept_bi())
            .await
            .map_err(|_| LinkError::HelloTimeout)??;
        let mut session = ControlSession::acceptor(
            self.local.clone(),
            &self.token,
            fresh_nonce()?,
            channel_binding(&conn)?,
        );
        let hello = tokio::time::timeout_at(
            deadline,
            read_until_ready(&mut session, &mut recv, Some(&mut send)),
        )
        .await;
        let (peer, early) = match hello {
            Ok(Ok((peer, early))) => {
                // No welcome for a peer whose certificate is for another node.
                if let Err(e) = self.check_certificate(&conn, &peer) {
                    conn.close(1u32.into(), e.to_string().as_bytes());
                    return Err(e);
                }
                // The welcome.
                flush(&mut session, &mut send).await?;
                (peer, early)
            }
            Ok(Err(e)) => {
                say_last_words(&mut session, &mut send).await;
                return Err(e);
            }
            Err(_) => return Err(LinkError::HelloTimeout),
        };
        info!(node = %peer.node_id, role = ?peer.role, region = %peer.region, "peer joined");
        let link_id = conn.stable_id();
        self.inbound.lock().insert(
            link_id,
            InboundLink {
                peer: peer.clone(),
                conn: conn.clone(),
            },
        );
        self.hub.metrics().backbone_links.inc();

        // Origins learn our streams; edges just ask.
        let announce = peer.role.is_origin();
        let mut hub_events = self.hub.events();
        // What this link has been told is published here (to withdraw what a lag hid).
        let mut announced: HashSet<StreamKey> = HashSet::new();
        if announce {
            for a in self.local_announcements() {
                announced.insert(a.stream.clone());
                session.announce(a)?;
            }
        }
        let scope = if peer.role.is_origin() {
            Scope::LocalOnly
        } else {
            Scope::Any
        };
        let (internal_tx, mut internal_rx) = mpsc::channel::<Internal>(256);
        let mut state_tick = tokio::time::interval(NODE_STATE_INTERVAL);
        let mut senders: HashMap<u64, (CancellationToken, KeyframeRequester)> = HashMap::new();

        let result = async {
            let mut events = early;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                for ev in events.drain(..) {
                    match ev {
                        SessionEvent::SubscribeRequested { id, stream } => {
                            let hub = self.hub.clone();
                            let tx = internal_tx.clone();
                            tokio::spawn(async move {
                                let r = hub.subscribe(&stream, scope).await;
                                let _ = tx
                                    .send(Internal::Subscribed {
                                        id,
                                        stream,
                                        result: r,
                                    })
                                    .await;
                            });
                        }
                        SessionEvent::Unsubscribed(id) => {
                            if let Some((t, _)) = senders.remove(&id) {
                                t.cancel();
                            }
                        }
                        SessionEvent::KeyframeRequested(id) => {
                            // Merged with this node's own viewers' requests; the stream's
                            // owner forwards at most one per interval.
                            if let Some((_, k)) = senders.get(&id) {
                                k.request();
                            }
                        }
                        SessionEvent::GoAway(reason) => return Err(LinkError::GoAway(reason)),
                        SessionEvent::NodeState(records) => {
                            self.on_node_state(&peer, link_id, records)
                        }
                        _ => {}
                    }
                }
                flush(&mut session, &mut send).await?;
                tokio::select! {
                    n = recv.read(&mut buf) => {
                        let n = n?.ok_or(LinkError::ControlClosed)?;
                        events = session.handle_input(&buf[..n])?;
                    }
                    _ = state_tick.tick() => session.node_state(self.records_for(peer.role, true)),
                    msg = internal_rx.recv() => match msg {
                        Some(Internal::Subscribed { id, stream, result: Ok(sub) }) => {
                            if session.accept(id, sub.session())? {
                                let token = self.shutdown.child_token();
                                senders.insert(id, (token.clone(), sub.keyframe_requester()));
                                let span = tracing::info_span!("send", sub = id, %stream);
                                tokio::spawn(
                                    send_media(
                                        conn.clone(),
                                        id,
                                        sub,
                                        token,
                                        internal_tx.clone(),
                                        self.write_timeout,
                                        self.hub.clone(),
                                    )
                                    .instrument(span),
                                );
                                info!(%stream, sub = id, "serving subscription");
                            }
                        }
                        Some(Internal::Subscribed { id, stream, result: Err(e) }) => {
                            info!(%stream, "subscribe refused: {e}");
                            let c = match e {
                                crate::hub::SubscribeError::NotFound(_) => code::NOT_FOUND,
                                crate::hub::SubscribeError::UpstreamTimeout(_) => code::TIMEOUT,
                            };
                            session.reject(id, c, &e.to_string())?;
                        }
                        Some(Internal::SenderDone { id, code, reason }) => {
                            senders.remove(&id);
                            session.done(id, code, &reason)?;
                        }
                        None => return Ok(()),
                    },
                    ev = hub_events.recv(), if announce => match ev {
                        Ok(HubEvent::Published(s)) => {
                            if let Some(a) = self.announcement(s) {
                                announced.insert(a.stream.clone());
                                session.announce(a)?;
                            }
                        }
                        Ok(HubEvent::Unpublished(s)) => {
                            announced.remove(&s);
                            session.withdraw(s)?;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            // Events were missed: announce what is published now and
                            // withdraw what was announced and has ended since.
                            let now = self.local_announcements();
                            let current: HashSet<StreamKey> =
                                now.iter().map(|a| a.stream.clone()).collect();
                            for gone in announced.difference(&current) {
                                session.withdraw(gone.clone())?;
                            }
                            for a in now {
                                session.announce(a)?;
                            }
                            announced = current;
                        }
                        Err(_) => {}
                    },
                    e = conn.closed() => return Err(LinkError::Connection(e)),
                    _ = self.shutdown.cancelled() => {
                        session.go_away("shutdown");
                        let _ = flush(&mut session, &mut send).await;
                        return Ok(());
                    }
                }
            }
        }
        .await;

        for (_, (t, _)) in senders.drain() {
            t.cancel();
        }
        self.inbound.lock().remove(&link_id);
        self.nodes.lock().forget_link(link_id);
        self.hub.metrics().backbone_links.dec();
        result
    }

    /// The link to pull `stream` over, and the node at its end.
    fn choose_link(&self, stream: &StreamKey) -> Option<(String, mpsc::Sender<LinkCommand>)> {
        let outbound = self.outbound.lock();
        match self.role {
            // Nearest first: the config order.
            Role::Edge => self
                .upstreams
                .iter()
                .find_map(|a| outbound.get(a))
                .map(|l| (l.peer.node_id.clone(), l.commands.clone())),
            Role::Origin | Role::Standalone => {
                let node = self.directory.lock().owner(stream)?.node.clone();
                outbound
                    .values()
                    .find(|l| l.peer.node_id == node)
                    .map(|l| (node, l.commands.clone()))
            }
        }
    }

    /// Subscribes to `stream` on the link [`Self::choose_link`] picks.
    async fn subscribe_upstream(
        &self,
        stream: &StreamKey,
    ) -> Result<(String, mpsc::Sender<LinkCommand>, Accepted), String> {
        let (node, commands) = self
            .choose_link(stream)
            .ok_or_else(|| "no upstream has this stream".to_string())?;
        let accepted = subscribe_on(&node, &commands, stream).await?;
        Ok((node, commands, accepted))
    }

    /// For an edge pulling from `current`: a more preferred origin (earlier in its list) that
    /// has been linked for `return_after`, to move back to.
    fn preferred_over(&self, current: &str) -> Option<(String, mpsc::Sender<LinkCommand>)> {
        if self.role != Role::Edge || self.return_after.is_zero() {
            return None;
        }
        let outbound = self.outbound.lock();
        for addr in &self.upstreams {
            let Some(link) = outbound.get(addr) else {
                continue;
            };
            if link.peer.node_id == current {
                return None;
            }
            if link.since.elapsed() >= self.return_after {
                return Some((link.peer.node_id.clone(), link.commands.clone()));
            }
        }
        None
    }
}

/// Subscribes to `stream` over one link and waits for the answer.
async fn subscribe_on(
    node: &str,
    commands: &mpsc::Sender<LinkCommand>,
    stream: &StreamKey,
) -> Result<Accepted, String> {
    let (reply_tx, reply_rx) = oneshot::channel();
    commands
        .send(LinkCommand::Subscribe {
            stream: stream.clone(),
            reply: reply_tx,
        })
        .await
        .map_err(|_| format!("link to {node} closed"))?;
    match tokio::time::timeout(SUBSCRIBE_TIMEOUT, reply_rx).await {
        Ok(Ok(Ok(accepted))) => Ok(accepted),
        Ok(Ok(Err(reason))) => Err(format!("{node} refused: {reason}")),
        Ok(Err(_)) => Err(format!("link to {node} closed")),
        Err(_) => Err(format!("{node} did not answer the subscribe")),
    }
}

impl Backbone {
    /// Feeds `relay` from upstream until the stream ends or goes idle.
    ///
    /// When the upstream is lost (its link died, or it stopped serving without the stream
    /// ending), the pull subscribes again through the next upstream that can serve it, for
    /// up to `rehome_window`. The relay, and with it every viewer's connection, lives on;
    /// the [`Splicer`] keeps the viewers' timeline continuous.
    async fn run_pull(self: Arc<Self>, mut relay: Publisher) {
        let key = relay.key().clone();
        let idle = relay.idle_waiter(self.idle_grace);
        tokio::pin!(idle);
        let mut splice = Splicer::new();
        let mut lost: Option<Instant> = None;
        loop {
            if let Some(local) = self.local_takeover(&relay) {
                // The publisher came back here: feed the relay's viewers from it.
                let lost_for = lost.map(|t| t.elapsed()).unwrap_or_default();
                self.hub.metrics().backbone_rehomes.inc();
                info!(stream = %key, "re-homed to the local publisher after {lost_for:?}");
                return self.pump_local(relay, local, splice, idle).await;
            }
            let attempt = tokio::select! {
                a = self.subscribe_upstream(&key) => a,
                _ = &mut idle => return self.released(&key),
            };
            let (node, commands, accepted) = match attempt {
                Ok(a) => a,
                Err(e) => {
                    let Some(since) = lost else {
                        info!(stream = %key, "cannot pull: {e}");
                        return;
                    };
                    if since.elapsed() >= self.rehome_window {
                        warn!(stream = %key, "no upstream within {:?}: {e}", self.rehome_window);
                        return;
                    }
                    debug!(stream = %key, "looking for another upstream: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(REHOME_RETRY) => continue,
                        _ = &mut idle => return self.released(&key),
                    }
                }
            };
            let has_video = relay.config().video.is_some();
            let join = splice.begin(accepted.session, has_video);
            if let Some(since) = lost.take() {
                self.hub.metrics().backbone_rehomes.inc();
                info!(stream = %key, %node, ?join, "re-homed after {:?}", since.elapsed());
            } else {
                info!(stream = %key, %node, sub = accepted.id, "pulling from upstream");
            }
            let mut up = Feed {
                node,
                commands,
                id: accepted.id,
                feed: accepted.feed,
            };
            let end = self
                .pump_feed(&mut relay, &mut up, &mut splice, &mut idle)
                .await;
            let Feed {
                node, commands, id, ..
            } = up;
            match end {
                PullEnd::Ended(reason) => {
                    info!(stream = %key, "upstream ended the stream: {reason}");
                    return;
                }
                PullEnd::Idle => {
                    let _ = commands.send(LinkCommand::Unsubscribe(id)).await;
                    return self.released(&key);
                }
                PullEnd::Lost(reason) => {
                    let _ = commands.try_send(LinkCommand::Unsubscribe(id));
                    info!(stream = %key, %node, "upstream lost ({reason}); re-homing");
                    lost = Some(Instant::now());
                }
            }
        }
    }

    /// A local publish of the relay's name that replaced it in the hub ([`Hub::publish`]).
    fn local_takeover(&self, relay: &Publisher) -> Option<Arc<crate::hub::Stream>> {
        self.hub
            .get(relay.key())
            .filter(|s| s.is_local() && !Arc::ptr_eq(s, relay.stream()))
    }

    /// Feeds `relay` from this node's own publish of the name, through the splicer (a new
    /// session: it resumes at a keyframe, timestamps continuing), until that publish ends
    /// or the relay goes idle.
    async fn pump_local(
        &self,
        mut relay: Publisher,
        local: Arc<crate::hub::Stream>,
        mut splice: Splicer,
        mut idle: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) {
        let key = relay.key().clone();
        let Ok(mut sub) = self.hub.subscribe(&key, Scope::LocalOnly).await else {
            return;
        };
        let has_video = relay.config().video.is_some();
        splice.begin(local.session(), has_video);
        relay.set_live(&self.local.node_id);
        sub.request_keyframe();
        let keyframe_signal = relay.keyframe_signal();
        loop {
            let ev = tokio::select! {
                ev = sub.next() => ev,
                _ = keyframe_signal.wanted() => {
                    sub.request_keyframe();
                    continue;
                }
                _ = idle.as_mut() => return self.released(&key),
            };
            match ev {
                Ok(StreamEvent::Config(c)) => relay.set_config((*c).clone()),
                Ok(StreamEvent::Frame(p)) => {
                    if let Some(f) = splice.frame(p.frame.clone()) {
                        relay.set_session(splice.timeline().unwrap_or_default());
                        relay.push(Packet::new(f));
                    }
                }
                Ok(StreamEvent::Discontinuity) => {}
                Err(_) => {
                    info!(stream = %key, "the local publisher ended the stream");
                    return;
                }
            }
        }
    }

    fn released(&self, key: &StreamKey) {
        info!(stream = %key, "no consumers for {:?}; releasing", self.idle_grace);
    }

    /// Pushes upstream media into `relay` until the subscription ends.
    ///
    /// An edge pulling from a less preferred origin meanwhile returns to a more preferred
    /// one that has been linked for `return_after` (make-before-break): it subscribes there
    /// as well, and moves over once that feed provably continues what was sent
    /// ([`Splicer::touches`]); then it drops the old subscription. Viewers see no gap.
    async fn pump_feed(
        &self,
        relay: &mut Publisher,
        up: &mut Feed,
        splice: &mut Splicer,
        idle: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> PullEnd {
        let metrics = self.hub.metrics().clone();
        let (frames_in, bytes_in) = metrics.ingest(crate::metrics::Proto::Backbone);
        let mut seq = GroupSequencer::new(GROUP_STALL);
        let keyframe_signal = relay.keyframe_signal();
        let mut gate = KeyframeRequestGate::new(KEYFRAME_REQUEST_INTERVAL);
        if splice.waiting_for_keyframe() && gate.request(Instant::now()) {
            metrics.keyframe_requests_to_upstream.inc();
            let _ = up.commands.send(LinkCommand::KeyframeRequest(up.id)).await;
        }
        let mut configured = false;
        // The timeline the relay serves (see `Splicer::timeline`).
        let mut served = None;
        let mut dropped = 0;
        let returns = self.role == Role::Edge && !self.return_after.is_zero();
        let mut ret = Return::default();
        let mut return_tick = tokio::time::interval(RETURN_CHECK);
        loop {
            let deadline = seq.poll_timeout();
            let gate_deadline = gate.poll_timeout();
            let cand_deadline = ret.candidate.as_ref().and_then(|c| c.seq.poll_timeout());
            let got = tokio::select! {
                _ = keyframe_signal.wanted() => {
                    if gate.request(Instant::now()) {
                        metrics.keyframe_requests_to_upstream.inc();
                        let _ = up.commands.send(LinkCommand::KeyframeRequest(up.id)).await;
                    }
                    continue;
                }
                _ = sleep_until(gate_deadline), if gate_deadline.is_some() => {
                    if gate.poll(Instant::now()) {
                        metrics.keyframe_requests_to_upstream.inc();
                        let _ = up.commands.send(LinkCommand::KeyframeRequest(up.id)).await;
                    }
                    continue;
                }
                item = up.feed.recv() => match sequence(&mut seq, item) {
                    Ok(items) => Got::Current(items),
                    Err(end) => return end,
                },
                _ = sleep_until(deadline), if deadline.is_some() => {
                    Got::Current(seq.handle_timeout(Instant::now()))
                }
                _ = return_tick.tick(), if returns && configured => {
                    self.maybe_return(&mut ret, &up.node, relay.key());
                    continue;
                }
                r = recv_pending(&mut ret.pending) => {
                    ret.pending = None;
                    match r {
                        Ok(f) if Some(f.1.session) == splice.session() => {
                            let (feed, accepted) = f;
                            info!(node = %feed.node, "returning: subscribed to the preferred origin");
                            ret.candidate = Some(Candidate::new(feed, accepted.feed));
                        }
                        Ok((feed, accepted)) => {
                            // Another publish there: not the same stream to splice into.
                            let _ = feed.commands.try_send(LinkCommand::Unsubscribe(accepted.id));
                            ret.later(self.return_after);
                        }
                        Err(e) => {
                            debug!("cannot return to the preferred origin yet: {e}");
                            ret.later(self.return_after);
                        }
                    }
                    continue;
                }
                item = recv_candidate(&mut ret.candidate) => {
                    let c = ret.candidate.as_mut().expect("branch runs with a candidate");
                    match sequence(&mut c.seq, item) {
                        Ok(items) => Got::Candidate(items),
                        Err(_) => {
                            debug!("the preferred origin's feed ended before the move");
                            ret.candidate = None;
                            ret.later(self.return_after);
                            continue;
                        }
                    }
                }
                _ = sleep_until(cand_deadline), if cand_deadline.is_some() => {
                    let c = ret.candidate.as_mut().expect("deadline comes from a candidate");
                    Got::Candidate(c.seq.handle_timeout(Instant::now()))
                }
                _ = idle.as_mut() => return PullEnd::Idle,
            };
            let items = match got {
                Got::Current(items) => items,
                Got::Candidate(items) => {
                    let c = ret.candidate.as_mut().expect("candidate items");
                    if !c.offer(items, splice) {
                        continue;
                    }
                    // It touches: move over, then let the old subscription go.
                    let c = ret.candidate.take().expect("candidate");
                    let (feed, cseq, held) = c.into_parts();
                    let _ = up.commands.try_send(LinkCommand::Unsubscribe(up.id));
                    info!(from = %up.node, to = %feed.node, "returned to the preferred origin");
                    metrics.backbone_returns.inc();
                    relay.set_live(&feed.node);
                    splice.switch();
                    *up = feed;
                    seq = cseq;
                    dropped = seq.dropped_groups();
                    held
                }
            };
            if seq.dropped_groups() > dropped {
                metrics
                    .backbone_groups_dropped
                    .inc_by(seq.dropped_groups() - dropped);
                dropped = seq.dropped_groups();
            }
            for item in items {
                match item {
                    MediaItem::Config(c) => {
                        relay.set_config(c);
                        if !configured {
                            // Named before consumers can subscribe (they wait for live).
                            served = splice.timeline();
                            relay.set_session(served.unwrap_or_default());
                            relay.set_live(&up.node);
                            configured = true;
                        }
                    }
                    MediaItem::Frame(f) if configured => {
                        let Some(f) = splice.frame(f) else { continue };
                        if splice.timeline() != served {
                            // A new session's shift is fixed at its first keyframe.
                            served = splice.timeline();
                            relay.set_session(served.unwrap_or_default());
                        }
                        if f.is_video_keyframe() {
                            gate.keyframe_seen();
                        }
                        frames_in.inc();
                        bytes_in.inc_by(f.payload.len() as u64);
                        relay.push(Packet::new(f));
                    }
                    MediaItem::Frame(_) => {}
                    MediaItem::Publishes(n) => relay.set_publishes(n),
                }
            }
        }
    }

    /// Starts subscribing on a more preferred origin, when one is ready and no attempt is
    /// under way. The answer arrives in `ret.pending`.
    fn maybe_return(&self, ret: &mut Return, current: &str, key: &StreamKey) {
        if ret.pending.is_some()
            || ret.candidate.is_some()
            || ret.not_before.is_some_and(|t| Instant::now() < t)
        {
            return;
        }
        let Some((node, commands)) = self.preferred_over(current) else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        ret.pending = Some(rx);
        let key = key.clone();
        tokio::spawn(
            async move {
                let r = subscribe_on(&node, &commands, &key).await;
                let feed_of = |a: &Accepted| Feed {
                    node: node.clone(),
                    commands: commands.clone(),
                    id: a.id,
                    feed: mpsc::channel(1).1,
                };
                let r = r.map(|a| (feed_of(&a), a));
                if let Err(Ok((feed, a))) = tx.send(r) {
                    // The pull ended meanwhile: nobody takes this subscription.
                    let _ = feed.commands.send(LinkCommand::Unsubscribe(a.id)).await;
                }
            }
            .instrument(tracing::Span::current()),
        );
    }
}

/// How often an edge on a less preferred origin looks for a better one.
const RETURN_CHECK: Duration = Duration::from_millis(250);
/// Candidate audio frames kept for the move (newer ones than sent are replayed).
const HELD_AUDIO: usize = 64;

/// One upstream subscription feeding a pull.
struct Feed {
    node: String,
    commands: mpsc::Sender<LinkCommand>,
    id: u64,
    feed: mpsc::Receiver<FeedItem>,
}

/// What one wait of a pull produced.
enum Got {
    Current(Vec<MediaItem>),
    Candidate(Vec<MediaItem>),
}

/// An edge's move back to its preferred origin.
#[derive(Default)]
struct Return {
    pending: Option<oneshot::Receiver<Result<(Feed, Accepted), String>>>,
    candidate: Option<Candidate>,
    /// No new attempt before this (after a failed one).
    not_before: Option<Instant>,
}

impl Return {
    fn later(&mut self, after: Duration) {
        self.not_before = Some(Instant::now() + after);
    }
}

/// The preferred origin's feed, read alongside the current one until it touches.
struct Candidate {
    feed: Option<Feed>,
    seq: GroupSequencer,
    /// Its latest audio frames, and its configuration.
    held: std::collections::VecDeque<MediaItem>,
    /// From the touching frame on, everything is kept.
    from_touch: Vec<MediaItem>,
}

impl Candidate {
    fn new(mut feed: Feed, rx: mpsc::Receiver<FeedItem>) -> Candidate {
        feed.feed = rx;
        Candidate {
            feed: Some(feed),
            seq: GroupSequencer::new(GROUP_STALL),
            held: Default::default(),
            from_touch: Vec::new(),
        }
    }

    /// Takes the candidate's items; `true` once it touches what was sent.
    fn offer(&mut self, items: Vec<MediaItem>, splice: &Splicer) -> bool {
        for item in items {
            if !self.from_touch.is_empty() {
                self.from_touch.push(item);
                continue;
            }
            match &item {
                MediaItem::Frame(f) if splice.touches(f) => self.from_touch.push(item),
                MediaItem::Frame(f) if f.track() == TrackKind::Audio => {
                    if self.held.len() == HELD_AUDIO {
                        self.held.pop_front();
                    }
                    self.held.push_back(item);
                }
                MediaItem::Config(_) | MediaItem::Publishes(_) => self.held.push_back(item),
                MediaItem::Frame(_) => {}
            }
        }
        !self.from_touch.is_empty()
    }

    /// The feed, its sequencer, and the items to replay (held audio, then from the touch).
    fn into_parts(mut self) -> (Feed, GroupSequencer, Vec<MediaItem>) {
        let feed = self.feed.take().expect("candidate feed");
        let mut items: Vec<MediaItem> = self.held.drain(..).collect();
        items.append(&mut self.from_touch);
        let seq = std::mem::replace(&mut self.seq, GroupSequencer::new(GROUP_STALL));
        (feed, seq, items)
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        if let Some(f) = &self.feed {
            let _ = f.commands.try_send(LinkCommand::Unsubscribe(f.id));
        }
    }
}

/// Puts one feed item in order; the end of the subscription as an error.
fn sequence(seq: &mut GroupSequencer, item: Option<FeedItem>) -> Result<Vec<MediaItem>, PullEnd> {
    Ok(match item {
        Some(FeedItem::Media { group, item }) => seq.push(group, item, Instant::now()),
        Some(FeedItem::GroupEnd { group }) => seq.end(group, Instant::now()),
        Some(FeedItem::Done { code, reason }) if code == code::ENDED => {
            return Err(PullEnd::Ended(reason))
        }
        Some(FeedItem::Done { reason, .. }) => return Err(PullEnd::Lost(reason)),
        None => return Err(PullEnd::Lost("link lost".into())),
    })
}

async fn recv_pending(
    pending: &mut Option<oneshot::Receiver<Result<(Feed, Accepted), String>>>,
) -> Result<(Feed, Accepted), String> {
    match pending {
        Some(rx) => rx
            .await
            .unwrap_or_else(|_| Err("subscribe abandoned".into())),
        None => std::future::pending().await,
    }
}

async fn recv_candidate(candidate: &mut Option<Candidate>) -> Option<FeedItem> {
    match candidate.as_mut().and_then(|c| c.feed.as_mut()) {
        Some(f) => f.feed.recv().await,
        None => std::future::pending().await,
    }
}

/// Why one upstream subscription of a pull ended.
enum PullEnd {
    /// The publisher ended the stream.
    Ended(String),
    /// No consumer is left.
    Idle,
    /// The upstream went away with the stream still live (maybe elsewhere).
    Lost(String),
}

impl Upstream for Backbone {
    fn can_pull(&self, stream: &StreamKey) -> bool {
        self.choose_link(stream).is_some()
    }

    fn pull(&self, relay: Publisher) {
        let span = tracing::info_span!("pull", stream = %relay.key());
        tokio::spawn(self.arc().run_pull(relay).instrument(span));
    }

    fn published_elsewhere(&self, key: &StreamKey) -> BoxFuture<Option<String>> {
        let me = self.arc();
        let key = key.clone();
        Box::pin(async move { me.owner_alive(&key).await })
    }
}

struct PendingSubscribe {
    reply: oneshot::Sender<Result<Accepted, String>>,
    feed: mpsc::Receiver<FeedItem>,
}

enum Internal {
    Subscribed {
        id: u64,
        stream: StreamKey,
        result: Result<Subscription, crate::hub::SubscribeError>,
    },
    SenderDone {
        id: u64,
        code: u16,
        reason: String,
    },
}

fn link_info(peer: &PeerInfo, conn: &quinn::Connection, direction: &'static str) -> LinkInfo {
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
async fn say_last_words(session: &mut ControlSession, send: &mut quinn::SendStream) {
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
fn fresh_nonce() -> Result<Nonce, LinkError> {
    use ring::rand::SecureRandom;
    let mut nonce = [0u8; auth::NONCE_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| LinkError::Random)?;
    Ok(nonce)
}

/// This process's CPU use, 0-1 of all cores, from `/proc/self/stat` between samples.
struct CpuSampler {
    last: Option<(u64, Instant)>,
    cores: f64,
}

impl CpuSampler {
    fn new() -> CpuSampler {
        CpuSampler {
            last: None,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
        }
    }

    fn sample(&mut self) -> f64 {
        let Some(ticks) = process_cpu_ticks() else {
            return 0.0;
        };
        let now = Instant::now();
        let used = match self.last {
            Some((t, at)) => {
                let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                // Linux counts CPU time in USER_HZ ticks, 100 per second.
                ticks.saturating_sub(t) as f64 / 100.0 / secs / self.cores
            }
            None => 0.0,
        };
        self.last = Some((ticks, now));
        used.clamp(0.0, 1.0)
    }
}

/// utime + stime of this process, in clock ticks.
fn process_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

async fn flush(
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
async fn read_until_ready(
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

/// Accepts the group streams of a dialed link and hands each to a reader task.
async fn accept_groups(
    conn: quinn::Connection,
    feeds: Arc<Mutex<HashMap<u64, mpsc::Sender<FeedItem>>>>,
    hub: Arc<Hub>,
) {
    while let Ok(stream) = conn.accept_uni().await {
        hub.metrics().backbone_groups_received.inc();
        tokio::spawn(read_group(stream, feeds.clone()).instrument(tracing::Span::current()));
    }
}

/// Reads one group stream into its subscription's feed.
async fn read_group(
    mut stream: quinn::RecvStream,
    feeds: Arc<Mutex<HashMap<u64, mpsc::Sender<FeedItem>>>>,
) {
    let mut header = [0u8; GROUP_HEADER_LEN];
    let header = match tokio::time::timeout(HELLO_TIMEOUT, stream.read_exact(&mut header)).await {
        Ok(Ok(())) => match GroupHeader::decode(&header) {
            Ok(h) => h,
            Err(e) => {
                warn!("bad group stream: {e}");
                let _ = stream.stop(1u32.into());
                return;
            }
        },
        _ => return,
    };
    let Some(tx) = feeds.lock().get(&header.subscription).cloned() else {
        // Unsubscribed meanwhile.
        let _ = stream.stop(0u32.into());
        return;
    };
    let group = header.sequence;
    loop {
        match read_item(&mut stream).await {
            Ok(Some(item)) => {
                if tx.send(FeedItem::Media { group, item }).await.is_err() {
                    let _ = stream.stop(0u32.into());
                    return;
                }
            }
            Ok(None) => break,
            Err(e) => {
                debug!(group, "group stream ended early: {e}");
                if matches!(e, ItemError::Wire(_)) {
                    warn!(group, "malformed media item: {e}");
                    let _ = stream.stop(1u32.into());
                }
                break;
            }
        }
    }
    let _ = tx.send(FeedItem::GroupEnd { group }).await;
}

#[derive(Debug, thiserror::Error)]
enum ItemError {
    #[error("{0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("{0}")]
    ReadChunk(#[from] quinn::ReadError),
    #[error("stream ended inside an item")]
    FinishedEarly,
    #[error("{0}")]
    Wire(#[from] wire::WireError),
}

/// Reads one length-prefixed media item; `None` at a clean end of stream. The body buffer
/// grows as its bytes arrive: an announced length (up to [`wire::MAX_MESSAGE`]) reserves
/// nothing by itself.
async fn read_item(stream: &mut quinn::RecvStream) -> Result<Option<MediaItem>, ItemError> {
    let mut prefix = [0u8; 4];
    match stream.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = wire::frame_len(prefix)?;
    let mut body = BytesMut::new();
    while body.len() < len {
        let chunk = stream
            .read_chunk(len - body.len(), true)
            .await?
            .ok_or(ItemError::FinishedEarly)?;
        body.extend_from_slice(&chunk.bytes);
    }
    let mut body = body.freeze();
    let kind = bytes::Buf::get_u8(&mut body);
    Ok(Some(MediaItem::decode(kind, body)?))
}

/// Writes a served subscription as one QUIC stream per group.
async fn send_media(
    conn: quinn::Connection,
    id: u64,
    mut sub: Subscription,
    cancel: CancellationToken,
    done: mpsc::Sender<Internal>,
    write_timeout: Duration,
    hub: Arc<Hub>,
) {
    let metrics = hub.metrics().clone();
    let counters = metrics.proto(crate::metrics::Proto::Backbone);
    counters.viewers.inc();
    let mut config = Arc::new(StreamConfig::default());
    let mut group: Option<quinn::SendStream> = None;
    let mut next_sequence = 0u64;
    let mut audio_frames = 0u32;
    let mut buf = BytesMut::new();
    let (code, reason) = loop {
        let ev = tokio::select! {
            ev = sub.next() => ev,
            _ = cancel.cancelled() => break (0, "unsubscribed".to_string()),
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(SubscriptionEnd::Ended) => match sub.evicted() {
                Some(why) => break (code::MOVED, why),
                None => break (code::ENDED, "stream ended".into()),
            },
            Err(SubscriptionEnd::TooSlow) => {
                counters.slow_disconnects.inc();
                break (code::TOO_SLOW, "subscriber too far behind".into());
            }
            // Other nodes' pulls hold no viewer ticket, so they are never kicked.
            Err(SubscriptionEnd::Kicked) => break (code::ENDED, "disconnected".into()),
        };
        buf.clear();
        match ev {
            StreamEvent::Config(c) => {
                config = c;
                if group.is_some() {
                    MediaItem::Config((*config).clone()).encode(&mut buf);
                }
            }
            StreamEvent::Discontinuity => {
                counters.lag_skips.inc();
                if let Some(mut g) = group.take() {
                    let _ = g.reset(1u32.into());
                }
                continue;
            }
            StreamEvent::Frame(p) => {
                let f = &p.frame;
                let has_video = config.video.is_some();
                let starts_group = if has_video {
                    f.is_video_keyframe()
                } else {
                    f.track() == TrackKind::Audio
                        && (group.is_none() || audio_frames >= AUDIO_GROUP_FRAMES)
                };
                if starts_group {
                    if let Some(mut g) = group.take() {
                        let _ = g.finish();
                    }
                    let s = match conn.open_uni().await {
                        Ok(s) => s,
                        Err(e) => break (0, format!("link lost: {e}")),
                    };
                    // Newer groups win the bandwidth.
                    let _ = s.set_priority(next_sequence.min(i32::MAX as u64) as i32);
                    GroupHeader {
                        subscription: id,
                        sequence: next_sequence,
                    }
                    .encode(&mut buf);
                    next_sequence += 1;
                    audio_frames = 0;
                    metrics.backbone_groups_sent.inc();
                    // In band, so a downstream egress sees a returning publisher where
                    // its frames start (`egress` `on_reconnect`); first, so a relay knows
                    // it before it goes live.
                    MediaItem::Publishes(sub.publishes()).encode(&mut buf);
                    MediaItem::Config((*config).clone()).encode(&mut buf);
                    group = Some(s);
                }
                if group.is_none() {
                    // Before the first keyframe: nothing decodable to send yet.
                    continue;
                }
                if f.track() == TrackKind::Audio {
                    audio_frames += 1;
                }
                MediaItem::Frame(f.clone()).encode(&mut buf);
                counters.frames_out.inc();
            }
        }
        if buf.is_empty() {
            continue;
        }
        let Some(g) = group.as_mut() else { continue };
        match tokio::time::timeout(write_timeout, g.write_all(&buf)).await {
            Ok(Ok(())) => {
                counters.bytes_out.inc_by(buf.len() as u64);
            }
            Ok(Err(e)) => {
                debug!("group write failed: {e}");
                group = None;
            }
            Err(_) => {
                counters.slow_disconnects.inc();
                break (code::TOO_SLOW, "peer stopped reading".into());
            }
        }
    };
    if let Some(mut g) = group.take() {
        let _ = g.finish();
    }
    counters.viewers.dec();
    debug!("subscription over: {reason}");
    let _ = done.send(Internal::SenderDone { id, code, reason }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_measured_from_the_last_datagram() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut s = Silence {
            datagrams: 10,
            since: t0,
            timeout: Duration::from_millis(700),
        };
        assert_eq!(s.observe(10, ms(500)), None);
        // A keep-alive answer arrives: the clock restarts.
        assert_eq!(s.observe(11, ms(600)), None);
        assert_eq!(s.observe(11, ms(1250)), None);
        assert_eq!(s.observe(11, ms(1300)), Some(Duration::from_millis(700)));
    }
}
