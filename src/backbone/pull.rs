//! Pulls: the async driver that feeds a relay from upstream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn, Instrument};

use super::group::GroupSequencer;
use super::link::*;
use super::media::*;
use super::wire::{code, MediaItem};
use super::Backbone;
use crate::config::Role;
use crate::hub::{Publisher, Scope, StreamEvent};
use crate::media::keyframe::{KeyframeRequestGate, KEYFRAME_REQUEST_INTERVAL};
use crate::media::splice::Splicer;
use crate::media::Packet;
use crate::media::{StreamKey, TrackKind};

/// Time for an upstream to answer a subscribe.
pub(super) const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A group that makes no progress this long while a newer one waits is abandoned.
pub(super) const GROUP_STALL: Duration = Duration::from_millis(500);
/// Items buffered between group readers and a pull.
pub(super) const FEED_QUEUE: usize = 512;
/// How often a pull that lost its upstream looks for another.
pub(super) const REHOME_RETRY: Duration = Duration::from_millis(100);

/// An accepted upstream subscription: its id, timeline and media.
pub(super) struct Accepted {
    pub(super) id: u64,
    pub(super) session: u64,
    pub(super) feed: mpsc::Receiver<FeedItem>,
}
impl Backbone {
    /// The link to pull `stream` over, and the node at its end.
    pub(super) fn choose_link(
        &self,
        stream: &StreamKey,
    ) -> Option<(String, mpsc::Sender<LinkCommand>)> {
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
    pub(super) async fn subscribe_upstream(
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
    pub(super) fn preferred_over(
        &self,
        current: &str,
    ) -> Option<(String, mpsc::Sender<LinkCommand>)> {
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
pub(super) async fn subscribe_on(
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
    pub(super) async fn run_pull(self: Arc<Self>, mut relay: Publisher) {
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
    pub(super) fn local_takeover(&self, relay: &Publisher) -> Option<Arc<crate::hub::Stream>> {
        self.hub
            .get(relay.key())
            .filter(|s| s.is_local() && !Arc::ptr_eq(s, relay.stream()))
    }

    /// Feeds `relay` from this node's own publish of the name, through the splicer (a new
    /// session: it resumes at a keyframe, timestamps continuing), until that publish ends
    /// or the relay goes idle.
    pub(super) async fn pump_local(
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

    pub(super) fn released(&self, key: &StreamKey) {
        info!(stream = %key, "no consumers for {:?}; releasing", self.idle_grace);
    }

    /// Pushes upstream media into `relay` until the subscription ends.
    ///
    /// An edge pulling from a less preferred origin meanwhile returns to a more preferred
    /// one that has been linked for `return_after` (make-before-break): it subscribes there
    /// as well, and moves over once that feed provably continues what was sent
    /// ([`Splicer::touches`]); then it drops the old subscription. Viewers see no gap.
    pub(super) async fn pump_feed(
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
    pub(super) fn maybe_return(&self, ret: &mut Return, current: &str, key: &StreamKey) {
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
pub(super) const RETURN_CHECK: Duration = Duration::from_millis(250);
/// Candidate audio frames kept for the move (newer ones than sent are replayed).
pub(super) const HELD_AUDIO: usize = 64;

/// One upstream subscription feeding a pull.
pub(super) struct Feed {
    pub(super) node: String,
    pub(super) commands: mpsc::Sender<LinkCommand>,
    pub(super) id: u64,
    pub(super) feed: mpsc::Receiver<FeedItem>,
}

/// What one wait of a pull produced.
pub(super) enum Got {
    Current(Vec<MediaItem>),
    Candidate(Vec<MediaItem>),
}

/// An edge's move back to its preferred origin.
#[derive(Default)]
pub(super) struct Return {
    pub(super) pending: Option<oneshot::Receiver<Result<(Feed, Accepted), String>>>,
    pub(super) candidate: Option<Candidate>,
    /// No new attempt before this (after a failed one).
    pub(super) not_before: Option<Instant>,
}

impl Return {
    pub(super) fn later(&mut self, after: Duration) {
        self.not_before = Some(Instant::now() + after);
    }
}

/// The preferred origin's feed, read alongside the current one until it touches.
pub(super) struct Candidate {
    pub(super) feed: Option<Feed>,
    pub(super) seq: GroupSequencer,
    /// Its latest audio frames, and its configuration.
    pub(super) held: std::collections::VecDeque<MediaItem>,
    /// From the touching frame on, everything is kept.
    pub(super) from_touch: Vec<MediaItem>,
}

impl Candidate {
    pub(super) fn new(mut feed: Feed, rx: mpsc::Receiver<FeedItem>) -> Candidate {
        feed.feed = rx;
        Candidate {
            feed: Some(feed),
            seq: GroupSequencer::new(GROUP_STALL),
            held: Default::default(),
            from_touch: Vec::new(),
        }
    }

    /// Takes the candidate's items; `true` once it touches what was sent.
    pub(super) fn offer(&mut self, items: Vec<MediaItem>, splice: &Splicer) -> bool {
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
    pub(super) fn into_parts(mut self) -> (Feed, GroupSequencer, Vec<MediaItem>) {
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
pub(super) fn sequence(
    seq: &mut GroupSequencer,
    item: Option<FeedItem>,
) -> Result<Vec<MediaItem>, PullEnd> {
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

pub(super) async fn recv_pending(
    pending: &mut Option<oneshot::Receiver<Result<(Feed, Accepted), String>>>,
) -> Result<(Feed, Accepted), String> {
    match pending {
        Some(rx) => rx
            .await
            .unwrap_or_else(|_| Err("subscribe abandoned".into())),
        None => std::future::pending().await,
    }
}

pub(super) async fn recv_candidate(candidate: &mut Option<Candidate>) -> Option<FeedItem> {
    match candidate.as_mut().and_then(|c| c.feed.as_mut()) {
        Some(f) => f.feed.recv().await,
        None => std::future::pending().await,
    }
}

/// Why one upstream subscription of a pull ended.
pub(super) enum PullEnd {
    /// The publisher ended the stream.
    Ended(String),
    /// No consumer is left.
    Idle,
    /// The upstream went away with the stream still live (maybe elsewhere).
    Lost(String),
}

pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
