//! A link a peer dialed: this node announces its streams and serves subscriptions.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, Instrument};

use super::announce::AnnouncedSet;
use super::link::{
    channel_binding, flush, fresh_nonce, read_until_ready, say_last_words, InboundLink, LinkError,
    HELLO_TIMEOUT,
};
use super::media::send_media;
use super::nodes::NODE_STATE_INTERVAL;
use super::session::{ControlSession, SessionEvent};
use super::wire::code;
use super::Backbone;
use crate::hub::{HubEvent, KeyframeRequester, Scope, Subscription};
use crate::media::StreamKey;

impl Backbone {
    /// Drives a link a peer dialed: hello, announces out, subscriptions in, media out.
    pub(super) async fn run_inbound(
        self: Arc<Self>,
        conn: quinn::Connection,
    ) -> Result<(), LinkError> {
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
                    conn.close(code::CLOSE_ERROR.into(), e.to_string().as_bytes());
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
        let mut announced = AnnouncedSet::default();
        // A namespace kept to its region (`relay = false`) is neither announced nor served
        // to a node of another region.
        let relayed = |key: &StreamKey| self.hub.may_relay(key, &self.local.region, &peer.region);
        if announce {
            for a in self
                .local_announcements()
                .into_iter()
                .filter(|a| relayed(&a.stream))
            {
                announced.announced(&a.stream);
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
        let mut bus_rx = self.bus_attach(link_id, &peer, false);

        let result = async {
            let mut events = early;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                for ev in events.drain(..) {
                    match ev {
                        SessionEvent::SubscribeRequested { id, stream } if !relayed(&stream) => {
                            info!(%stream, node = %peer.node_id, "subscribe refused: its namespace is not relayed to region {}", peer.region);
                            session.reject(
                                id,
                                code::NOT_FOUND,
                                &format!("namespace {} is not relayed to other regions", stream.namespace()),
                            )?;
                        }
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
                        SessionEvent::Bus(bytes) => self.bus_received(&peer, bytes),
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
                    Some(bytes) = bus_rx.recv() => session.bus(bytes),
                    msg = internal_rx.recv() => match msg {
                        Some(Internal::Subscribed { id, stream, result: Ok(sub) }) => {
                            if session.accept(id, sub.timeline())? {
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
                        Ok(HubEvent::Published(s)) if relayed(&s) => {
                            if let Some(a) = self.announcement(s) {
                                announced.announced(&a.stream);
                                session.announce(a)?;
                            }
                        }
                        Ok(HubEvent::Unpublished(s)) => {
                            announced.withdrawn(&s);
                            session.withdraw(s)?;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            // Events were missed: announce what is published now and
                            // withdraw what was announced and has ended since.
                            let mut now = self.local_announcements();
                            now.retain(|a| relayed(&a.stream));
                            for gone in announced.resync(&now) {
                                session.withdraw(gone)?;
                            }
                            for a in now {
                                session.announce(a)?;
                            }
                        }
                        Ok(HubEvent::Published(_)) | Err(_) => {}
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
        self.bus_detach(link_id, &peer);
        self.inbound.lock().remove(&link_id);
        self.nodes.lock().forget_link(link_id);
        self.hub.metrics().backbone_links.dec();
        result
    }
}
pub(super) enum Internal {
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
