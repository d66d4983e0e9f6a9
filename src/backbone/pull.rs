//! Pulls: the async driver that feeds a relay from upstream (IO and timers only).
//!
//! [`Backbone::run_pull`] owns one relay (a stream this node pulls for its consumers). It
//! asks [`PullSelection`] which link to subscribe over, feeds the relay from that
//! subscription ([`Backbone::pump_feed`], in `feed.rs`), and when the upstream is lost
//! asks [`Rehome`] whether to look again or give up. Every decision is in those sans-IO
//! types; this file only subscribes, waits and logs.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::link::OutboundLink;
use super::media::FeedItem;
use super::rehome::{NoUpstream, Rehome, UpstreamEnd};
use super::select::LinkedUpstream;
use super::upstream_link::{Accepted, LinkCommand};
use super::Backbone;
use crate::hub::{Publisher, Scope, StreamEvent};
use crate::media::splice::Splicer;
use crate::media::{Packet, StreamKey};

/// Time for an upstream to answer a subscribe.
const SUBSCRIBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a subscribe to an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("no upstream has this stream")]
    NoUpstream,
    #[error("link to {0} closed")]
    LinkClosed(String),
    #[error("{node} refused: {code} {reason}")]
    Refused {
        node: String,
        /// From [`super::wire::code`].
        code: u16,
        reason: String,
    },
    #[error("{0} did not answer the subscribe")]
    NoAnswer(String),
    #[error("subscribe abandoned")]
    Abandoned,
}

/// An upstream's refusal of a subscribe (SubscribeError).
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) code: u16,
    pub(super) reason: String,
}

/// A link chosen for a pull: the node at its end and its command queue.
#[derive(Clone)]
pub(super) struct UpstreamLink {
    pub(super) node: String,
    pub(super) commands: mpsc::Sender<LinkCommand>,
}

/// One upstream subscription feeding a pull.
pub(super) struct Feed {
    pub(super) node: String,
    pub(super) commands: mpsc::Sender<LinkCommand>,
    pub(super) id: u64,
    /// The timeline it serves (SubscribeOk's).
    pub(super) timeline: u64,
    pub(super) feed: mpsc::Receiver<FeedItem>,
}

impl Feed {
    /// Asks the upstream for a keyframe.
    pub(super) async fn request_keyframe(&self) {
        let _ = self
            .commands
            .send(LinkCommand::KeyframeRequest(self.id))
            .await;
    }

    /// Ends the subscription.
    pub(super) async fn unsubscribe(&self) {
        let _ = self.commands.send(LinkCommand::Unsubscribe(self.id)).await;
    }

    /// Ends the subscription without waiting for room in the link's queue.
    pub(super) fn unsubscribe_now(&self) {
        let _ = self.commands.try_send(LinkCommand::Unsubscribe(self.id));
    }
}

/// Why one upstream subscription of a pull ended.
pub(super) enum PullEnd {
    /// The upstream ended it ([`UpstreamEnd`] says whether the stream ended).
    Upstream(UpstreamEnd),
    /// No consumer is left.
    Idle,
}

impl Backbone {
    /// The configured upstreams in preference order, as [`PullSelection`] sees them; the
    /// link `pick` chooses.
    ///
    /// [`PullSelection`]: super::select::PullSelection
    fn pick_upstream(
        &self,
        pick: impl FnOnce(&[Option<LinkedUpstream>]) -> Option<usize>,
    ) -> Option<UpstreamLink> {
        let outbound = self.outbound.lock();
        let links: Vec<Option<&OutboundLink>> = self
            .upstreams
            .lock()
            .iter()
            .map(|a| outbound.get(a))
            .collect();
        let view: Vec<Option<LinkedUpstream>> = links
            .iter()
            .map(|l| {
                l.map(|l| LinkedUpstream {
                    node: &l.peer.node_id,
                    since: l.since,
                })
            })
            .collect();
        let link = (*links.get(pick(&view)?)?)?;
        Some(UpstreamLink {
            node: link.peer.node_id.clone(),
            commands: link.commands.clone(),
        })
    }

    /// The link to pull `stream` over.
    pub(super) fn choose_link(&self, stream: &StreamKey) -> Option<UpstreamLink> {
        // A rendition is not announced: it is made where its base stream is published.
        let owner = {
            let dir = self.directory.lock();
            dir.owner(stream)
                .or_else(|| dir.owner(&stream.base()))
                .map(|o| o.node.clone())
        };
        self.pick_upstream(|links| self.selection.choose(links, owner.as_deref()))
    }

    /// For an edge pulling from `current`: a more preferred origin to move back to.
    pub(super) fn preferred_over(&self, current: &str) -> Option<UpstreamLink> {
        let now = Instant::now();
        self.pick_upstream(|links| self.selection.preferred_over(links, current, now))
    }

    /// Feeds `relay` from upstream until the stream ends or goes idle.
    ///
    /// When the upstream is lost the pull subscribes again through the next upstream that
    /// can serve it, as [`Rehome`] says. The relay, and with it every viewer's connection,
    /// lives on; the [`Splicer`] keeps the viewers' timeline continuous.
    pub(super) async fn run_pull(self: Arc<Self>, mut relay: Publisher) {
        let key = relay.key().clone();
        let idle = relay.idle_waiter(self.idle_grace);
        tokio::pin!(idle);
        let mut splice = Splicer::new();
        let mut rehome = Rehome::new(self.rehome_window);
        loop {
            if let Some(local) = self.local_takeover(&relay) {
                // The publisher came back here: feed the relay's viewers from it.
                let lost_for = rehome.taken_over_locally(Instant::now());
                self.hub.metrics().backbone_rehomes.inc();
                info!(stream = %key, "re-homed to the local publisher after {lost_for:?}");
                return self.pump_local(relay, local, splice, idle).await;
            }
            let attempt = tokio::select! {
                a = self.subscribe_upstream(&key) => a,
                _ = &mut idle => return self.released(&key),
            };
            let mut up = match attempt {
                Ok(feed) => feed,
                Err(e) => match rehome.no_upstream(Instant::now()) {
                    NoUpstream::NeverPulled => {
                        info!(stream = %key, "cannot pull: {e}");
                        return;
                    }
                    NoUpstream::WindowOver(_) => {
                        warn!(stream = %key, "no upstream within {:?}: {e}", self.rehome_window);
                        return;
                    }
                    NoUpstream::RetryAt(at) => {
                        debug!(stream = %key, "looking for another upstream: {e}");
                        tokio::select! {
                            _ = tokio::time::sleep_until(at.into()) => continue,
                            _ = &mut idle => return self.released(&key),
                        }
                    }
                },
            };
            let has_video = relay.config().video.is_some();
            let join = splice.begin(up.timeline, has_video);
            if let Some(lost_for) = rehome.subscribed(Instant::now()) {
                self.hub.metrics().backbone_rehomes.inc();
                info!(stream = %key, node = %up.node, ?join, "re-homed after {lost_for:?}");
            } else {
                info!(stream = %key, node = %up.node, sub = up.id, "pulling from upstream");
            }
            let end = self
                .pump_feed(&mut relay, &mut up, &mut splice, &mut idle)
                .await;
            match end {
                PullEnd::Upstream(UpstreamEnd::Ended(reason)) => {
                    info!(stream = %key, "upstream ended the stream: {reason}");
                    return;
                }
                PullEnd::Idle => {
                    up.unsubscribe().await;
                    return self.released(&key);
                }
                PullEnd::Upstream(UpstreamEnd::Lost(reason)) => {
                    up.unsubscribe_now();
                    info!(stream = %key, node = %up.node, "upstream lost ({reason}); re-homing");
                    rehome.upstream_lost(Instant::now());
                }
            }
        }
    }

    /// Subscribes to `stream` on the link [`Self::choose_link`] picks.
    async fn subscribe_upstream(&self, stream: &StreamKey) -> Result<Feed, PullError> {
        let link = self.choose_link(stream).ok_or(PullError::NoUpstream)?;
        subscribe_on(link, stream).await
    }

    /// A local publish of the relay's name that replaced it in the hub ([`Hub::publish`]).
    ///
    /// [`Hub::publish`]: crate::hub::Hub::publish
    fn local_takeover(&self, relay: &Publisher) -> Option<Arc<crate::hub::Stream>> {
        self.hub
            .get(relay.key())
            .filter(|s| s.is_local() && !Arc::ptr_eq(s, relay.stream()))
    }

    /// Feeds `relay` from this node's own publish of the name, through the splicer (a new
    /// timeline: it resumes at a keyframe, timestamps continuing), until that publish ends
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
        splice.begin(local.timeline(), has_video);
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
                        relay.set_timeline(splice.timeline().unwrap_or_default());
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
}

/// Subscribes to `stream` over one link and waits for the answer.
pub(super) async fn subscribe_on(
    link: UpstreamLink,
    stream: &StreamKey,
) -> Result<Feed, PullError> {
    let UpstreamLink { node, commands } = link;
    let (reply_tx, reply_rx) = oneshot::channel();
    let sent = commands
        .send(LinkCommand::Subscribe {
            stream: stream.clone(),
            reply: reply_tx,
        })
        .await;
    if sent.is_err() {
        return Err(PullError::LinkClosed(node));
    }
    match tokio::time::timeout(SUBSCRIBE_TIMEOUT, reply_rx).await {
        Ok(Ok(Ok(Accepted { id, timeline, feed }))) => Ok(Feed {
            node,
            commands,
            id,
            timeline,
            feed,
        }),
        Ok(Ok(Err(Refusal { code, reason }))) => Err(PullError::Refused { node, code, reason }),
        Ok(Err(_)) => Err(PullError::LinkClosed(node)),
        Err(_) => Err(PullError::NoAnswer(node)),
    }
}
