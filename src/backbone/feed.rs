//! Pumping one upstream feed into a relay, and the make-before-break return to a preferred
//! origin alongside it (IO and timers only).
//!
//! [`Backbone::pump_feed`] waits on the current feed, the keyframe requests of the relay's
//! consumers, the group sequencer's and keyframe gate's timers, and (on an edge away from
//! its preferred origin) the [`Handover`] attempt. Each wake-up hands an event to one of
//! the sans-IO machines ([`GroupSequencer`], [`KeyframeRequestGate`], [`Handover`]) and
//! carries out what it answers.

use std::time::Instant;

use tokio::sync::oneshot;
use tracing::{debug, info, Instrument};

use super::group::GroupSequencer;
use super::handover::{Handover, RETURN_CHECK};
use super::intake::{Intake, Tell};
use super::media::FeedItem;
use super::pull::{subscribe_on, Feed, PullEnd, PullError};
use super::rehome::UpstreamEnd;
use super::wire::MediaItem;
use super::Backbone;
use crate::hub::Publisher;
use crate::media::keyframe::{KeyframeRequestGate, KEYFRAME_REQUEST_INTERVAL};
use crate::media::splice::Splicer;
use crate::media::{Packet, StreamKey};
use crate::metrics::Metrics;

/// A group that makes no progress this long while a newer one waits is abandoned.
pub(super) const GROUP_STALL: std::time::Duration = std::time::Duration::from_millis(500);

/// What one wait of a pull produced.
enum Got {
    Current(Vec<MediaItem>),
    Candidate(Vec<MediaItem>),
}

/// The answer to a subscribe on the preferred origin, while it is under way.
type Attempt = oneshot::Receiver<Result<Feed, PullError>>;

/// The preferred origin's feed, read alongside the current one until it touches; dropped,
/// it unsubscribes.
struct CandidateFeed(Option<Feed>);

impl CandidateFeed {
    fn into_feed(mut self) -> Option<Feed> {
        self.0.take()
    }
}

impl Drop for CandidateFeed {
    fn drop(&mut self) {
        if let Some(f) = &self.0 {
            f.unsubscribe_now();
        }
    }
}

/// Asks `up` for a keyframe when the gate lets a request through.
async fn ask_keyframe(allowed: bool, up: &Feed, metrics: &Metrics) {
    if allowed {
        metrics.keyframe_requests_to_upstream.inc();
        up.request_keyframe().await;
    }
}

impl Backbone {
    /// Pushes upstream media into `relay` until the subscription ends.
    ///
    /// An edge pulling from a less preferred origin meanwhile returns to a more preferred
    /// one, make-before-break, as [`Handover`] decides. Viewers see no gap.
    pub(super) async fn pump_feed(
        &self,
        relay: &mut Publisher,
        up: &mut Feed,
        splice: &mut Splicer,
        idle: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> PullEnd {
        let metrics = self.hub.metrics().clone();
        let (frames_in, bytes_in) = metrics.ingest(crate::metrics::Proto::Backbone);
        let mut intake = Intake::default();
        let mut seq = GroupSequencer::new(GROUP_STALL);
        let keyframe_signal = relay.keyframe_signal();
        let mut gate = KeyframeRequestGate::new(KEYFRAME_REQUEST_INTERVAL);
        if splice.waiting_for_keyframe() {
            ask_keyframe(gate.request(Instant::now()), up, &metrics).await;
        }
        let mut dropped = 0;
        let returns = self.selection.returns();
        let mut handover = Handover::new(self.return_after, GROUP_STALL);
        let mut attempt: Option<Attempt> = None;
        let mut candidate: Option<CandidateFeed> = None;
        let mut return_tick = tokio::time::interval(RETURN_CHECK);
        loop {
            let deadline = seq.poll_timeout();
            let gate_deadline = gate.poll_timeout();
            let cand_deadline = handover.poll_timeout();
            let got = tokio::select! {
                _ = keyframe_signal.wanted() => {
                    ask_keyframe(gate.request(Instant::now()), up, &metrics).await;
                    continue;
                }
                _ = sleep_until(gate_deadline), if gate_deadline.is_some() => {
                    ask_keyframe(gate.poll(Instant::now()), up, &metrics).await;
                    continue;
                }
                item = up.feed.recv() => match sequence(&mut seq, item) {
                    Ok(items) => Got::Current(items),
                    Err(end) => return PullEnd::Upstream(end),
                },
                _ = sleep_until(deadline), if deadline.is_some() => {
                    Got::Current(seq.handle_timeout(Instant::now()))
                }
                _ = return_tick.tick(), if returns && intake.configured() => {
                    if handover.may_try(Instant::now()) {
                        attempt = self.try_return(&up.node, relay.key());
                        if attempt.is_some() {
                            handover.trying();
                        }
                    }
                    continue;
                }
                r = recv_attempt(&mut attempt) => {
                    attempt = None;
                    let timeline = r.as_ref().ok().map(|f| f.timeline);
                    match r {
                        Ok(feed) if handover.answered(Instant::now(), timeline, splice.input_timeline()) => {
                            info!(node = %feed.node, "returning: subscribed to the preferred origin");
                            candidate = Some(CandidateFeed(Some(feed)));
                        }
                        // Another publish there: not the same stream to splice into.
                        Ok(feed) => feed.unsubscribe_now(),
                        Err(e) => {
                            handover.answered(Instant::now(), None, splice.input_timeline());
                            debug!("cannot return to the preferred origin yet: {e}");
                        }
                    }
                    continue;
                }
                item = recv_candidate(&mut candidate) => {
                    let sequenced = match handover.candidate_groups() {
                        Some(cseq) => sequence(cseq, item).ok(),
                        None => None,
                    };
                    match sequenced {
                        Some(items) => Got::Candidate(items),
                        None => {
                            debug!("the preferred origin's feed ended before the move");
                            candidate = None;
                            handover.candidate_ended(Instant::now());
                            continue;
                        }
                    }
                }
                _ = sleep_until(cand_deadline), if cand_deadline.is_some() => {
                    match handover.candidate_groups() {
                        Some(cseq) => Got::Candidate(cseq.handle_timeout(Instant::now())),
                        None => continue,
                    }
                }
                _ = idle.as_mut() => return PullEnd::Idle,
            };
            let items = match got {
                Got::Current(items) => items,
                Got::Candidate(items) => {
                    let Some(to) = handover.offer(items, splice) else {
                        continue;
                    };
                    let Some(feed) = candidate.take().and_then(CandidateFeed::into_feed) else {
                        continue;
                    };
                    // It touches: move over, then let the old subscription go.
                    up.unsubscribe_now();
                    info!(from = %up.node, to = %feed.node, "returned to the preferred origin");
                    metrics.backbone_returns.inc();
                    relay.set_live(&feed.node);
                    splice.switch();
                    *up = feed;
                    seq = to.seq;
                    dropped = seq.dropped_groups();
                    to.replay
                }
            };
            if seq.dropped_groups() > dropped {
                metrics
                    .backbone_groups_dropped
                    .inc_by(seq.dropped_groups() - dropped);
                dropped = seq.dropped_groups();
            }
            for item in items {
                match intake.item(item, splice) {
                    Tell::Config { config, go_live } => {
                        relay.set_config(config);
                        if let Some(timeline) = go_live {
                            relay.set_timeline(timeline);
                            relay.set_live(&up.node);
                        }
                    }
                    Tell::Frame { frame, timeline } => {
                        if let Some(timeline) = timeline {
                            relay.set_timeline(timeline);
                        }
                        if frame.is_video_keyframe() {
                            gate.keyframe_seen();
                        }
                        frames_in.inc();
                        bytes_in.inc_by(frame.payload.len() as u64);
                        relay.push(Packet::new(frame));
                    }
                    Tell::Publishes(n) => relay.set_publishes(n),
                    Tell::Nothing => {}
                }
            }
        }
    }

    /// Starts subscribing on a more preferred origin, when there is one; the answer
    /// arrives on the returned channel.
    fn try_return(&self, current: &str, key: &StreamKey) -> Option<Attempt> {
        let link = self.preferred_over(current)?;
        let (tx, rx) = oneshot::channel();
        let key = key.clone();
        tokio::spawn(
            async move {
                if let Err(Ok(feed)) = tx.send(subscribe_on(link, &key).await) {
                    // The pull ended meanwhile: nobody takes this subscription.
                    feed.unsubscribe().await;
                }
            }
            .instrument(tracing::Span::current()),
        );
        Some(rx)
    }
}

/// Puts one feed item in order; the end of the subscription as an error.
fn sequence(
    seq: &mut GroupSequencer,
    item: Option<FeedItem>,
) -> Result<Vec<MediaItem>, UpstreamEnd> {
    Ok(match item {
        Some(FeedItem::Media { group, item }) => seq.push(group, item, Instant::now()),
        Some(FeedItem::GroupEnd { group }) => seq.end(group, Instant::now()),
        Some(FeedItem::Done { code, reason }) => return Err(UpstreamEnd::of(code, reason)),
        None => return Err(UpstreamEnd::Lost("link lost".into())),
    })
}

async fn recv_attempt(attempt: &mut Option<Attempt>) -> Result<Feed, PullError> {
    match attempt {
        Some(rx) => rx.await.unwrap_or(Err(PullError::Abandoned)),
        None => std::future::pending().await,
    }
}

async fn recv_candidate(candidate: &mut Option<CandidateFeed>) -> Option<FeedItem> {
    match candidate.as_mut().and_then(|c| c.0.as_mut()) {
        Some(f) => f.feed.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
