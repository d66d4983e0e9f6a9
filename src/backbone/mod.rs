//! The backbone: QUIC links between nodes (quinn), the protocol they speak, and the
//! per-stream decisions of pulling over them. This file is only the [`Backbone`] facade.
//!
//! * Every node dials the addresses in its config (origins: the other origins; edges: their
//!   origins) and keeps redialing. The dialer of a connection subscribes; the acceptor
//!   announces its local streams (to origins) and sends media. Two origins that list each
//!   other hold one connection per direction.
//! * A subscription's media travels one QUIC unidirectional stream per group (GOP), written
//!   by `media.rs` and put back in order by [`group::GroupSequencer`].
//! * [`Backbone`] implements the hub's [`Upstream`]: an edge pulls from the first origin of
//!   its list that is connected; an origin pulls from the origin whose announce it holds,
//!   and never passes on another origin's stream to a third origin (one hop).
//!
//! The folder, by job. **Sans-IO** (no sockets, no clock of their own; unit-tested):
//! [`wire`] (the bytes), [`session`] (the control-stream state machine), [`auth`] (the
//! hello's proofs), [`directory`] (who publishes what), [`nodes`] (the gossip of node
//! records), [`select`] (which link a pull uses), [`rehome`] (what a pull does when its
//! upstream is lost), [`handover`] (an edge's make-before-break return to its preferred
//! origin), [`race`] (one name published on two origins), [`liveness`] (is a peer alive),
//! [`group`] (putting group streams back in order), [`intake`] (what a relay is told of
//! its upstream's items). **Drivers** (IO and timers only):
//! `link.rs` (the link registry, dial and accept loops, the hello), `upstream_link.rs` (a
//! link this node dialed), `downstream_link.rs` (a link a peer dialed), `announce.rs`,
//! `report.rs` (this node's record), `pull.rs` and `feed.rs` (feeding a relay from
//! upstream), `media.rs` (group streams), [`tls`] and [`pki`]. To change a decision, change
//! its sans-IO type; the drivers only carry out what it answers.
//!
//! What it may not touch: anything above the drivers. It never imports `cluster`, `api` or
//! `node`; what it needs from above (this node's load) is handed down by `node` as a
//! closure ([`LoadProbe`]), and it takes its own settings ([`BackboneSettings`]), never the
//! whole config.
//!
//! One task per connection owns its control stream; one task per served subscription writes
//! its groups; one task per received group stream reads it. Queues are bounded: a served
//! subscription that cannot keep up skips to the next keyframe via the hub's ring.
//!
//! Nothing a peer sends makes a node grow without bound: at most [`MAX_INBOUND_LINKS`]
//! inbound connections, QUIC stream limits per connection ([`tls`]), a hello that must
//! complete within five seconds and [`wire::HANDSHAKE_MESSAGE`] bytes per message, and
//! media items read into buffers that grow as their bytes arrive (never to an announced
//! length). The nonces of the hello come from the OS generator here, not in the session.
//! Without a `backbone.token` the node refuses every incoming connection (said once in the
//! log): an empty token authenticates nobody.

// Sans-IO: protocol and decisions (no sockets, no clock of their own).
pub mod auth;
pub mod directory;
pub mod group;
pub mod handover;
pub mod intake;
pub mod liveness;
pub mod nodes;
pub mod race;
pub mod rehome;
pub mod select;
pub mod session;
pub mod wire;

// Drivers: QUIC IO and timers.
mod announce;
mod bus;
mod downstream_link;
mod feed;
mod link;
mod media;
pub mod pki;
mod pull;
mod report;
pub mod tls;
mod upstream_link;

pub use bus::BusHandler;
pub use link::{channel_binding, LinkError, LinkInfo, MAX_INBOUND_LINKS};
use link::{link_info, InboundLink, OutboundLink};
pub use pull::PullError;
pub use report::{LoadProbe, NodeLoad};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::config::{BackboneConfig, Role};
use crate::hub::{BoxFuture, Hub, Publisher, Upstream};
use crate::media::StreamKey;
use directory::Directory;
use nodes::NodeTable;
use select::PullSelection;
use session::PeerInfo;
use wire::NodeRecord;

/// Who this node is, as the backbone tells its peers and the cluster.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub id: String,
    pub role: Role,
    pub region: String,
    /// Base URLs clients are sent to (the route API).
    pub http_url: String,
    pub rtmp_url: String,
}

/// What the backbone needs to start, handed down by `node`.
pub struct BackboneSettings {
    /// The `[backbone]` section.
    pub config: BackboneConfig,
    pub node: NodeIdentity,
    /// How long a peer may take to accept a media write (`limits.viewer_write_timeout`).
    pub write_timeout: Duration,
    /// This node's load, for its record.
    pub load: LoadProbe,
}

/// How long an origin waits for all its peers before one link up makes it ready.
pub const READY_GRACE: Duration = Duration::from_secs(10);

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
    /// Addresses to dial, in preference order (an edge's may change on a reload).
    upstreams: Mutex<Vec<SocketAddr>>,
    /// The dial loop of each upstream, to end one that leaves the list.
    dialers: Mutex<HashMap<SocketAddr, CancellationToken>>,
    /// Which of them a pull subscribes over.
    selection: PullSelection,
    outbound: Mutex<HashMap<SocketAddr, OutboundLink>>,
    inbound: Mutex<HashMap<usize, InboundLink>>,
    /// Inbound connections held now, authenticated or not (at most [`MAX_INBOUND_LINKS`]).
    inbound_slots: Arc<tokio::sync::Semaphore>,
    /// Which origin publishes each stream (from announces).
    directory: Mutex<Directory>,
    /// The other nodes' records; this node's own.
    nodes: Mutex<NodeTable>,
    me_record: Mutex<NodeRecord>,
    idle_grace: Duration,
    link_timeout: Duration,
    rehome_window: Duration,
    return_after: Duration,
    write_timeout: Duration,
    /// The room bus: each live link's queue, and the handler (`bus.rs`).
    bus: Mutex<bus::BusLinks>,
    /// When the backbone started (readiness waits a little for every peer).
    started: std::time::Instant,
    shutdown: CancellationToken,
}

impl Backbone {
    /// Binds the QUIC endpoint and starts accepting and dialing.
    pub fn start(
        settings: BackboneSettings,
        hub: Arc<Hub>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Backbone>> {
        let BackboneSettings {
            config: bb,
            node,
            write_timeout,
            load,
        } = settings;
        let client_config = tls::client_config(&bb)?;
        let endpoint = match bb.listen {
            Some(addr) => quinn::Endpoint::server(tls::server_config(&bb)?, addr)?,
            None => {
                let ip = bb.bind.unwrap_or(match bb.origins.first() {
                    Some(SocketAddr::V6(_)) => IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
                    _ => IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
                });
                quinn::Endpoint::client(SocketAddr::new(ip, 0))?
            }
        };
        let role = node.role;
        let upstreams = match role {
            Role::Edge => bb.origins.clone(),
            _ => bb.peers.clone(),
        };
        let backbone = Arc::new_cyclic(|me| Backbone {
            me: me.clone(),
            hub,
            local: PeerInfo {
                node_id: node.id.clone(),
                role,
                region: node.region.clone(),
            },
            role,
            token: bb.token.clone(),
            node_certs: tls::node_certificates(&bb),
            endpoint,
            client_config,
            upstreams: Mutex::new(upstreams),
            dialers: Mutex::new(HashMap::new()),
            selection: PullSelection::new(role, bb.return_after),
            outbound: Mutex::new(HashMap::new()),
            inbound: Mutex::new(HashMap::new()),
            bus: Mutex::new(bus::BusLinks::default()),
            started: std::time::Instant::now(),
            inbound_slots: Arc::new(tokio::sync::Semaphore::new(MAX_INBOUND_LINKS)),
            directory: Mutex::new(Directory::default()),
            nodes: Mutex::new(NodeTable::new(&node.id)),
            me_record: Mutex::new(NodeRecord::idle(
                &node.id,
                role,
                &node.region,
                &node.http_url,
                &node.rtmp_url,
                crate::clock::unix_ms(),
            )),
            idle_grace: bb.idle_grace,
            link_timeout: bb.link_timeout,
            rehome_window: bb.rehome_window,
            return_after: bb.return_after,
            write_timeout,
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
        tokio::spawn(backbone.clone().state_loop(load));
        let upstreams = backbone.upstreams.lock().clone();
        for addr in upstreams {
            backbone.start_dialing(addr);
        }
        Ok(backbone)
    }

    fn start_dialing(self: &Arc<Self>, addr: SocketAddr) {
        let token = self.shutdown.child_token();
        self.dialers.lock().insert(addr, token.clone());
        tokio::spawn(self.clone().dial_loop(addr, token));
    }

    /// An edge's new origin list (a reload), nearest first: origins that left it are
    /// unlinked (their pulls move to the others, as when an origin fails), new ones are
    /// dialled, and pulls prefer the new order from now on. `false` on an origin, whose
    /// peers do not change live.
    pub fn set_origins(self: &Arc<Self>, origins: Vec<SocketAddr>) -> bool {
        if self.role != Role::Edge {
            return false;
        }
        let old = std::mem::replace(&mut *self.upstreams.lock(), origins.clone());
        for gone in old.iter().filter(|a| !origins.contains(a)) {
            if let Some(token) = self.dialers.lock().remove(gone) {
                token.cancel();
            }
            info!(origin = %gone, "origin left the list: unlinking");
        }
        for new in origins.iter().filter(|a| !old.contains(a)) {
            info!(origin = %new, "origin joined the list: dialling");
            self.start_dialing(*new);
        }
        true
    }

    /// The UDP address the endpoint is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    fn arc(&self) -> Arc<Backbone> {
        // `self` is alive, so is its Arc.
        self.me.upgrade().expect("backbone alive while in use")
    }

    /// Whether this node has joined its mesh (`/readyz`): an edge has a link up to one of
    /// its origins; an origin to every one of its peers, or to one once [`READY_GRACE`] has
    /// passed (a peer that is down must not keep it out for ever); a node that dials nobody
    /// is ready. `Err` says what it waits for.
    pub fn ready(&self) -> Result<(), String> {
        let want = self.upstreams.lock().len();
        let up = self.outbound.lock().len();
        let enough = match self.role {
            Role::Edge => up >= 1,
            _ => up >= want || (up >= 1 && self.started.elapsed() >= READY_GRACE),
        };
        if want == 0 || enough {
            Ok(())
        } else {
            Err(format!(
                "not ready: {up} of {want} backbone links up ({})",
                if self.role == Role::Edge {
                    "an edge needs one of its origins"
                } else {
                    "an origin needs its peers"
                }
            ))
        }
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
        self.endpoint
            .close(wire::code::CLOSE_SHUTDOWN.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
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
