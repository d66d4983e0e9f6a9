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

pub mod group;
pub mod session;
pub mod tls;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
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
    Hub, HubEvent, KeyframeRequester, Packet, Publisher, Scope, StreamEvent, Subscription,
    SubscriptionEnd, Upstream,
};
use crate::media::keyframe::{KeyframeRequestGate, KEYFRAME_REQUEST_INTERVAL};
use crate::media::splice::Splicer;
use crate::media::{StreamConfig, StreamKey, TrackKind};
use group::GroupSequencer;
use session::{ControlSession, PeerInfo, SessionError, SessionEvent};
use wire::{code, Announcement, GroupHeader, MediaItem, PeerRole, GROUP_HEADER_LEN};

/// Time for a peer to complete the hello exchange.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
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
}

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
}

/// An established link a peer dialed.
struct InboundLink {
    peer: PeerInfo,
    conn: quinn::Connection,
}

/// A stream's publisher in the directory: the node and its announce.
#[derive(Clone, Debug)]
struct Owner {
    node: String,
    announcement: Announcement,
}

impl Owner {
    fn rank(&self) -> (u64, &str) {
        self.announcement.rank(&self.node)
    }
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
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    /// Addresses to dial, in preference order.
    upstreams: Vec<SocketAddr>,
    outbound: Mutex<HashMap<SocketAddr, OutboundLink>>,
    inbound: Mutex<HashMap<usize, InboundLink>>,
    /// Which origin publishes each stream (from announces).
    directory: Mutex<HashMap<StreamKey, Owner>>,
    idle_grace: Duration,
    link_timeout: Duration,
    rehome_window: Duration,
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
            None => quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))?,
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
            endpoint,
            client_config,
            upstreams,
            outbound: Mutex::new(HashMap::new()),
            inbound: Mutex::new(HashMap::new()),
            directory: Mutex::new(HashMap::new()),
            idle_grace: bb.idle_grace,
            link_timeout: bb.link_timeout,
            rehome_window: bb.rehome_window,
            write_timeout: config.limits.viewer_write_timeout,
            shutdown,
        });
        let me = Arc::downgrade(&backbone);
        backbone
            .hub
            .metrics()
            .links
            .set_reader(move || me.upgrade().map(|b| b.links()).unwrap_or_default());
        if bb.listen.is_some() {
            tokio::spawn(backbone.clone().accept_loop());
        }
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
    pub fn directory(&self) -> Vec<(StreamKey, String)> {
        let mut out: Vec<(StreamKey, String)> = self
            .directory
            .lock()
            .iter()
            .map(|(k, o)| (k.clone(), o.node.clone()))
            .collect();
        out.sort_by_key(|(k, _)| k.to_string());
        out
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
            let me = self.clone();
            tokio::spawn(async move {
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
                        .count_connection(crate::api::metrics::Proto::Backbone);
                    if let Err(e) = me.clone().run_inbound(conn.clone()).await {
                        me.hub
                            .metrics()
                            .count_session_error(crate::api::metrics::Proto::Backbone);
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

    /// Drives a link this node dialed: hello, announces in, subscriptions out, media in.
    async fn run_outbound(
        self: Arc<Self>,
        addr: SocketAddr,
        conn: quinn::Connection,
    ) -> Result<(), LinkError> {
        let (mut send, mut recv) = conn.open_bi().await?;
        let mut session = ControlSession::dialer(self.local.clone(), &self.token);
        flush(&mut session, &mut send).await?;
        let (peer, early) =
            tokio::time::timeout(HELLO_TIMEOUT, read_until_ready(&mut session, &mut recv))
                .await
                .map_err(|_| LinkError::HelloTimeout)??;
        info!(node = %peer.node_id, role = ?peer.role, region = %peer.region, "link up");
        let (cmd_tx, mut cmd_rx) = mpsc::channel(64);
        self.outbound.lock().insert(
            addr,
            OutboundLink {
                peer: peer.clone(),
                conn: conn.clone(),
                commands: cmd_tx,
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
                self.on_dialer_event(&peer, ev, &feeds, &mut pending)?;
            }
            let mut buf = vec![0u8; 16 * 1024];
            let mut watchdog = Silence::new(&conn, self.link_timeout);
            let mut tick = tokio::time::interval(LIVENESS_TICK);
            loop {
                tokio::select! {
                    n = recv.read(&mut buf) => {
                        let n = n?.ok_or(LinkError::ControlClosed)?;
                        for ev in session.handle_input(&buf[..n])? {
                            self.on_dialer_event(&peer, ev, &feeds, &mut pending)?;
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
        self.directory
            .lock()
            .retain(|_, owner| owner.node != peer.node_id);
        // Dropping the feeds ends every pull over this link.
        feeds.lock().clear();
        result
    }

    fn on_dialer_event(
        &self,
        peer: &PeerInfo,
        ev: SessionEvent,
        feeds: &Mutex<HashMap<u64, mpsc::Sender<FeedItem>>>,
        pending: &mut HashMap<u64, PendingSubscribe>,
    ) -> Result<(), LinkError> {
        match ev {
            SessionEvent::Announced(a) => self.on_announce(peer, a),
            SessionEvent::Withdrawn(stream) => {
                debug!(%stream, "withdrawn");
                let mut dir = self.directory.lock();
                if dir.get(&stream).is_some_and(|o| o.node == peer.node_id) {
                    dir.remove(&stream);
                }
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
    /// or a partition healed) goes to the publish that ranks first
    /// ([`Announcement::rank`]): every node computes the same winner, the directory keeps
    /// it, and the origin holding the loser evicts its publisher, telling it why. Viewers
    /// pulling the loser's copy re-home to the winner ([`code::MOVED`]).
    fn on_announce(&self, peer: &PeerInfo, a: Announcement) {
        debug!(stream = %a.stream, session = a.session, "announced");
        let owner = Owner {
            node: peer.node_id.clone(),
            announcement: a,
        };
        let key = owner.announcement.stream.clone();
        {
            let mut dir = self.directory.lock();
            match dir.get(&key) {
                Some(cur) if cur.node != owner.node && cur.rank() < owner.rank() => {
                    info!(stream = %key, loser = %owner.node, winner = %cur.node,
                        "two origins publish one name; keeping the earlier");
                }
                _ => {
                    dir.insert(key.clone(), owner.clone());
                }
            }
        }
        let Some(local) = self.hub.get(&key).filter(|s| s.is_local()) else {
            return;
        };
        let mine = (local.started_ms(), self.local.node_id.as_str());
        if owner.rank() < mine {
            let reason = format!(
                "lost the publish race for {key} to {} (published {} ms earlier)",
                owner.node,
                mine.0.saturating_sub(owner.announcement.started_ms)
            );
            warn!("{reason}");
            self.hub.evict(&key, &reason);
        } else {
            info!(stream = %key, rival = %owner.node,
                "{key} is also published on {}; this node's publish came first and stays",
                owner.node);
        }
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
        let (mut send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
            .await
            .map_err(|_| LinkError::HelloTimeout)??;
        let mut session = ControlSession::acceptor(self.local.clone(), &self.token);
        let hello =
            tokio::time::timeout(HELLO_TIMEOUT, read_until_ready(&mut session, &mut recv)).await;
        // Send the welcome, or the refusal, before judging the outcome.
        let _ = flush(&mut session, &mut send).await;
        let (peer, early) = hello.map_err(|_| LinkError::HelloTimeout)??;
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
        if announce {
            for a in self.local_announcements() {
                session.announce(a)?;
            }
        }
        let scope = if peer.role.is_origin() {
            Scope::LocalOnly
        } else {
            Scope::Any
        };
        let (internal_tx, mut internal_rx) = mpsc::channel::<Internal>(256);
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
                        _ => {}
                    }
                }
                flush(&mut session, &mut send).await?;
                tokio::select! {
                    n = recv.read(&mut buf) => {
                        let n = n?.ok_or(LinkError::ControlClosed)?;
                        events = session.handle_input(&buf[..n])?;
                    }
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
                                session.announce(a)?;
                            }
                        }
                        Ok(HubEvent::Unpublished(s)) => session.withdraw(s)?,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            for a in self.local_announcements() {
                                session.announce(a)?;
                            }
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
                let node = self.directory.lock().get(stream)?.node.clone();
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
        let (reply_tx, reply_rx) = oneshot::channel();
        commands
            .send(LinkCommand::Subscribe {
                stream: stream.clone(),
                reply: reply_tx,
            })
            .await
            .map_err(|_| format!("link to {node} closed"))?;
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, reply_rx).await {
            Ok(Ok(Ok(accepted))) => Ok((node, commands, accepted)),
            Ok(Ok(Err(reason))) => Err(format!("{node} refused: {reason}")),
            Ok(Err(_)) => Err(format!("link to {node} closed")),
            Err(_) => Err(format!("{node} did not answer the subscribe")),
        }
    }

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
            let id = accepted.id;
            let end = self
                .pump_feed(
                    &mut relay,
                    &node,
                    &commands,
                    accepted,
                    &mut splice,
                    &mut idle,
                )
                .await;
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

    fn released(&self, key: &StreamKey) {
        info!(stream = %key, "no consumers for {:?}; releasing", self.idle_grace);
    }

    /// Pushes one upstream subscription's media into `relay` until it ends.
    async fn pump_feed(
        &self,
        relay: &mut Publisher,
        node: &str,
        commands: &mpsc::Sender<LinkCommand>,
        accepted: Accepted,
        splice: &mut Splicer,
        idle: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> PullEnd {
        let Accepted { id, mut feed, .. } = accepted;
        let metrics = self.hub.metrics().clone();
        let (frames_in, bytes_in) = metrics.ingest(crate::api::metrics::Proto::Backbone);
        let mut seq = GroupSequencer::new(GROUP_STALL);
        let keyframe_signal = relay.keyframe_signal();
        let mut gate = KeyframeRequestGate::new(KEYFRAME_REQUEST_INTERVAL);
        if splice.waiting_for_keyframe() && gate.request(Instant::now()) {
            let _ = commands.send(LinkCommand::KeyframeRequest(id)).await;
        }
        let mut configured = false;
        // The timeline the relay serves (see `Splicer::timeline`).
        let mut served = None;
        let mut dropped = 0;
        loop {
            let deadline = seq.poll_timeout();
            let gate_deadline = gate.poll_timeout();
            let items = tokio::select! {
                _ = keyframe_signal.wanted() => {
                    if gate.request(Instant::now()) {
                        let _ = commands.send(LinkCommand::KeyframeRequest(id)).await;
                    }
                    continue;
                }
                _ = sleep_until(gate_deadline), if gate_deadline.is_some() => {
                    if gate.poll(Instant::now()) {
                        let _ = commands.send(LinkCommand::KeyframeRequest(id)).await;
                    }
                    continue;
                }
                item = feed.recv() => match item {
                    Some(FeedItem::Media { group, item }) => seq.push(group, item, Instant::now()),
                    Some(FeedItem::GroupEnd { group }) => seq.end(group, Instant::now()),
                    Some(FeedItem::Done { code, reason }) if code == code::ENDED => {
                        return PullEnd::Ended(reason);
                    }
                    Some(FeedItem::Done { reason, .. }) => return PullEnd::Lost(reason),
                    None => return PullEnd::Lost("link lost".into()),
                },
                _ = sleep_until(deadline), if deadline.is_some() => seq.handle_timeout(Instant::now()),
                _ = idle.as_mut() => return PullEnd::Idle,
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
                            relay.set_live(node);
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
                }
            }
        }
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

    fn published_elsewhere(&self, key: &StreamKey) -> Option<String> {
        self.directory.lock().get(key).map(|o| o.node.clone())
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

/// Reads the control stream until the hello exchange completes; returns the peer and any
/// events that arrived with it.
async fn read_until_ready(
    session: &mut ControlSession,
    recv: &mut quinn::RecvStream,
) -> Result<(PeerInfo, Vec<SessionEvent>), LinkError> {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = recv.read(&mut buf).await?.ok_or(LinkError::ControlClosed)?;
        let mut events = session.handle_input(&buf[..n])?;
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
    Wire(#[from] wire::WireError),
}

/// Reads one length-prefixed media item; `None` at a clean end of stream.
async fn read_item(stream: &mut quinn::RecvStream) -> Result<Option<MediaItem>, ItemError> {
    let mut prefix = [0u8; 4];
    match stream.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = wire::frame_len(prefix)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    let mut body = bytes::Bytes::from(body);
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
    let counters = metrics.proto(crate::api::metrics::Proto::Backbone);
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
