//! A link this node dialed: it subscribes, and receives announces and media.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, Instrument};

use super::link::{
    channel_binding, flush, fresh_nonce, read_until_ready, say_last_words, LinkError, OutboundLink,
    HELLO_TIMEOUT,
};
use super::liveness::Silence;
use super::media::{accept_groups, FeedItem};
use super::nodes::NODE_STATE_INTERVAL;
use super::pull::Refusal;
use super::session::{ControlSession, PeerInfo, SessionEvent};
use super::wire::code;
use super::Backbone;
use crate::media::StreamKey;

/// How often a link's liveness is checked.
const LIVENESS_TICK: Duration = Duration::from_millis(50);
/// Items buffered between group readers and a pull.
const FEED_QUEUE: usize = 512;

/// What a pull asks of the link it subscribes over.
pub(super) enum LinkCommand {
    Subscribe {
        stream: StreamKey,
        reply: oneshot::Sender<Result<Accepted, Refusal>>,
    },
    Unsubscribe(u64),
    KeyframeRequest(u64),
}

/// An accepted upstream subscription: its id, timeline and media.
pub(super) struct Accepted {
    pub(super) id: u64,
    pub(super) timeline: u64,
    pub(super) feed: mpsc::Receiver<FeedItem>,
}

/// A subscribe sent, waiting for its answer.
struct PendingSubscribe {
    reply: oneshot::Sender<Result<Accepted, Refusal>>,
    feed: mpsc::Receiver<FeedItem>,
}

impl Backbone {
    /// Drives a link this node dialed: hello, announces in, subscriptions out, media in.
    pub(super) async fn run_outbound(
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
                conn.close(code::CLOSE_ERROR.into(), e.to_string().as_bytes());
                return Err(e);
            }
        };
        if let Err(e) = self.check_certificate(&conn, &peer) {
            conn.close(code::CLOSE_ERROR.into(), e.to_string().as_bytes());
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

        let mut bus_rx = self.bus_attach(link_id, &peer, true);
        let result = async {
            for ev in early {
                self.on_dialer_event(&peer, link_id, ev, &feeds, &mut pending)?;
            }
            let mut buf = vec![0u8; 16 * 1024];
            let mut watchdog =
                Silence::new(conn.stats().udp_rx.datagrams, Instant::now(), self.link_timeout);
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
                        if let Some(silent) = watchdog.observe(conn.stats().udp_rx.datagrams, Instant::now()) {
                            self.hub.metrics().backbone_links_timed_out.inc();
                            let e = LinkError::Silent(silent);
                            conn.close(code::CLOSE_SILENT.into(), e.to_string().as_bytes());
                            return Err(e);
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
                    Some(bytes) = bus_rx.recv() => session.bus(bytes),
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
        self.bus_detach(link_id, &peer);
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
            SessionEvent::Bus(bytes) => self.bus_received(peer, bytes),
            SessionEvent::Withdrawn(stream) => {
                debug!(%stream, "withdrawn");
                self.directory.lock().withdraw(&peer.node_id, &stream);
            }
            SessionEvent::SubscribeAccepted { id, timeline } => {
                if let Some(p) = pending.remove(&id) {
                    let _ = p.reply.send(Ok(Accepted {
                        id,
                        timeline,
                        feed: p.feed,
                    }));
                }
            }
            SessionEvent::SubscribeRejected { id, code, reason } => {
                feeds.lock().remove(&id);
                if let Some(p) = pending.remove(&id) {
                    let _ = p.reply.send(Err(Refusal { code, reason }));
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
}
