//! Attaching consumers: finding, deriving or pulling a stream, then the [`Subscription`]
//! that reads its GOP cache and live ring with the overflow policy.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::{
    Hub, HubEvent, Publisher, Scope, Source, Status, Stream, StreamEvent, SubscribeError,
    SubscriptionEnd, Upstream, ViewerTicket, LAG_WINDOW, PLAY_WAIT_POLL, PULL_TIMEOUT,
};
use crate::media::{StreamConfig, StreamKey};

impl Hub {
    /// Attaches a consumer to `key`, pulling it from upstream first if allowed and needed.
    pub async fn subscribe(
        self: &Arc<Self>,
        key: &StreamKey,
        scope: Scope,
    ) -> Result<Subscription, SubscribeError> {
        self.attach(key, scope, None).await
    }

    /// Subscribes to a stream this node derives from another (e.g. with its audio
    /// transcoded). If it does not exist yet it is created with `source` and `start` is
    /// handed its [`Publisher`]; like a relay, it is shared by every consumer and its owner
    /// drops it when idle ([`Publisher::idle_waiter`]).
    pub async fn subscribe_derived(
        self: &Arc<Self>,
        key: &StreamKey,
        source: Source,
        start: impl FnOnce(Publisher) + Send + 'static,
    ) -> Result<Subscription, SubscribeError> {
        self.attach(key, Scope::Any, Some((source, Box::new(start))))
            .await
    }

    /// The stream `key` for a new consumer: the existing one, or one created to be derived
    /// or pulled from upstream. `None` if there is no such stream and no way to get it.
    #[allow(clippy::type_complexity)]
    fn find_or_create(
        self: &Arc<Self>,
        key: &StreamKey,
        scope: Scope,
        derive: &mut Option<(Source, DeriveStart)>,
    ) -> Result<
        Option<(
            Arc<Stream>,
            SubscriberGuard,
            Option<(Producer, Arc<Stream>)>,
        )>,
        SubscribeError,
    > {
        let mut map = self.streams.lock();
        // A stream derived from one published here counts as published here: other origins
        // may pull it in one hop.
        let base_is_local = key.is_derived() && map.get(&key.base()).is_some_and(|b| b.is_local());
        match map.get(key) {
            Some(s) if scope == Scope::LocalOnly && !s.is_local() && !base_is_local => {
                Err(SubscribeError::NotFound(key.clone()))
            }
            Some(s) => Ok(Some((s.clone(), SubscriberGuard::new(s.clone()), None))),
            None => {
                if derive.is_none() && key.is_derived() {
                    if let Some(deriver) = self.deriver.get() {
                        if let Some(source) = deriver.derives(key, base_is_local) {
                            let (deriver, hub) = (deriver.clone(), self.clone());
                            let start: DeriveStart = Box::new(move |p| deriver.start(hub, p));
                            *derive = Some((source, start));
                        }
                    }
                }
                let (source, producer) = match (derive.take(), scope, self.upstream.get()) {
                    (Some((source, start)), _, _) => (source, Producer::Derived(start)),
                    (None, Scope::Any, Some(u)) if u.can_pull(key) => (
                        Source::Relay {
                            node: String::new(),
                        },
                        Producer::Upstream(u.clone()),
                    ),
                    _ => return Ok(None),
                };
                let s = self.new_stream(key.clone(), source, Status::Pending);
                map.insert(key.clone(), s.clone());
                let guard = SubscriberGuard::new(s.clone());
                Ok(Some((s.clone(), guard, Some((producer, s)))))
            }
        }
    }

    async fn attach(
        self: &Arc<Self>,
        key: &StreamKey,
        scope: Scope,
        derive: Option<(Source, DeriveStart)>,
    ) -> Result<Subscription, SubscribeError> {
        let mut derive = derive;
        // A name nobody publishes yet is waited for a little (`limits.play_wait`): a player
        // started just before its publisher, or a viewer whose node has not yet heard the
        // origin's announce, then plays instead of getting a 404. Origins asking each other
        // (`LocalOnly`) are answered at once: they chose from their directory and re-home
        // on a refusal.
        let deadline = tokio::time::Instant::now() + self.limits().play_wait;
        let mut events: Option<broadcast::Receiver<HubEvent>> = None;
        let (stream, guard, created) = loop {
            if let Some(found) = self.find_or_create(key, scope, &mut derive)? {
                break found;
            }
            let now = tokio::time::Instant::now();
            if scope != Scope::Any || now >= deadline {
                return Err(SubscribeError::NotFound(key.clone()));
            }
            let events = events.get_or_insert_with(|| self.events.subscribe());
            // A local publish wakes it at once; an announce heard from another node is
            // noticed by the next look.
            tokio::select! {
                _ = events.recv() => {}
                _ = tokio::time::sleep_until(deadline.min(now + PLAY_WAIT_POLL)) => {}
            }
        };
        match created {
            Some((Producer::Upstream(upstream), s)) => {
                self.metrics.relayed_streams.inc();
                upstream.pull(Publisher::new(self.clone(), s));
            }
            Some((Producer::Derived(start), s)) => start(Publisher::new(self.clone(), s)),
            None => {}
        }
        let mut status = stream.status.subscribe();
        match tokio::time::timeout(PULL_TIMEOUT, status.wait_for(|s| *s != Status::Pending)).await {
            Ok(Ok(s)) if *s == Status::Live => {}
            Ok(_) => return Err(SubscribeError::NotFound(key.clone())),
            Err(_) => return Err(SubscribeError::UpstreamTimeout(key.clone())),
        }
        let st = stream.state.lock();
        let Some(tx) = st.tx.as_ref() else {
            return Err(SubscribeError::NotFound(key.clone()));
        };
        let mut backlog = VecDeque::with_capacity(st.gop.len() + 1);
        backlog.push_back(StreamEvent::Config(st.config.clone()));
        backlog.extend(st.gop.snapshot().into_iter().map(StreamEvent::Frame));
        let rx = tx.subscribe();
        drop(st);
        Ok(Subscription {
            rx,
            backlog,
            skipping: false,
            has_video: false,
            lag_events: VecDeque::new(),
            max_lag_events: self.limits().max_lag_events,
            _guard: guard,
            _ticket: None,
        })
    }
}

type DeriveStart = Box<dyn FnOnce(Publisher) + Send>;

/// Who feeds a stream created on demand.
enum Producer {
    Upstream(Arc<dyn Upstream>),
    Derived(DeriveStart),
}

/// Counts a stream's consumers; the count reaching zero wakes the relay's idle timer.
struct SubscriberGuard(Arc<Stream>);

impl SubscriberGuard {
    /// Must be created under the hub's map lock (see [`Hub::remove_if_idle`]).
    fn new(stream: Arc<Stream>) -> Self {
        stream.subscribers.fetch_add(1, Ordering::AcqRel);
        SubscriberGuard(stream)
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        if self.0.subscribers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_one();
        }
    }
}

/// Lets a consumer (or a downstream node's request arriving over the backbone) ask the
/// stream's owner for a keyframe. Requests merge until the owner looks.
#[derive(Clone)]
pub struct KeyframeRequester(Arc<Stream>);

impl KeyframeRequester {
    pub fn request(&self) {
        self.0.want_keyframe();
    }
}

/// A consumer's view of a stream: the cached GOP, then the live ring.
pub struct Subscription {
    rx: broadcast::Receiver<StreamEvent>,
    backlog: VecDeque<StreamEvent>,
    skipping: bool,
    has_video: bool,
    lag_events: VecDeque<Instant>,
    max_lag_events: u32,
    _guard: SubscriberGuard,
    /// A viewer's place under the viewer limits, given back with the subscription.
    _ticket: Option<Box<ViewerTicket>>,
}

impl Subscription {
    /// Keeps `ticket` for as long as this subscription lives.
    pub fn hold(&mut self, ticket: ViewerTicket) {
        self._ticket = Some(Box::new(ticket));
    }

    /// Ends a viewer the operator kicked (one atomic load per frame).
    fn check_kicked(&self) -> Result<(), SubscriptionEnd> {
        match &self._ticket {
            Some(t) if t.kicked.load(Ordering::Acquire) => Err(SubscriptionEnd::Kicked),
            _ => Ok(()),
        }
    }

    /// Why the stream's publisher was evicted, if it was: the stream lives on elsewhere.
    pub fn evicted(&self) -> Option<String> {
        self._guard.0.evicted()
    }

    /// The timeline this subscription's frames are on (see [`Stream::timeline`]).
    pub fn timeline(&self) -> u64 {
        self._guard.0.timeline()
    }

    /// How many publishers the stream has had: it grows when one comes back to the
    /// stream held for it (the timeline goes on; an egress may start a new segment).
    pub fn publishes(&self) -> u64 {
        self._guard.0.publishes()
    }

    /// The stream's configuration as of subscribing (before any event is taken).
    pub fn initial_config(&self) -> Option<Arc<StreamConfig>> {
        match self.backlog.front() {
            Some(StreamEvent::Config(c)) => Some(c.clone()),
            _ => None,
        }
    }

    /// The stream's configuration; when it has none yet (a relay whose upstream has not
    /// sent it), waits up to `within` for it. Whatever arrives stays queued for `next`.
    pub async fn wait_config(&mut self, within: Duration) -> Option<Arc<StreamConfig>> {
        if let Some(c) = self.initial_config() {
            return Some(c);
        }
        if !self.backlog.is_empty() {
            return None;
        }
        match tokio::time::timeout(within, self.rx.recv()).await {
            Ok(Ok(ev)) => {
                let config = match &ev {
                    StreamEvent::Config(c) => Some(c.clone()),
                    _ => None,
                };
                self.backlog.push_back(ev);
                config
            }
            _ => None,
        }
    }

    /// Whether the stream's video has B-frames (frames presented out of decode order, which
    /// browsers' WebRTC decoders do not reorder): known if the hub has seen one, else read
    /// from the first video frames queued for this subscription. A relay that has just
    /// started may have none yet: up to `within` is spent waiting for a few. Whatever
    /// arrives stays queued for `next`.
    pub async fn wait_bframes(&mut self, within: Duration) -> bool {
        /// Video frames that settle it (as the hub's `ORDER_SETTLED_AFTER`).
        const ENOUGH: usize = 3;
        let reordered = |ev: &StreamEvent| match ev {
            StreamEvent::Frame(p) if p.frame.track() == crate::media::TrackKind::Video => {
                Some(p.frame.pts != p.frame.dts)
            }
            _ => None,
        };
        let stream = &self._guard.0;
        if stream.bframes.load(Ordering::Relaxed) {
            return true;
        }
        if stream.order_settled.load(Ordering::Relaxed) {
            return false;
        }
        let mut seen = 0;
        for ev in &self.backlog {
            match reordered(ev) {
                Some(true) => return true,
                Some(false) => seen += 1,
                None => {}
            }
        }
        let deadline = tokio::time::Instant::now() + within;
        while seen < ENOUGH && self.backlog.len() < 256 {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Ok(ev)) => {
                    let r = reordered(&ev);
                    self.backlog.push_back(ev);
                    match r {
                        Some(true) => return true,
                        Some(false) => seen += 1,
                        None => {}
                    }
                }
                _ => break,
            }
        }
        false
    }

    /// Asks the stream's owner for a keyframe (merged with other requests).
    pub fn request_keyframe(&self) {
        self._guard.0.want_keyframe();
    }

    /// A handle that can ask for keyframes for this subscription from another task.
    pub fn keyframe_requester(&self) -> KeyframeRequester {
        KeyframeRequester(self._guard.0.clone())
    }

    /// Identifies the stream this subscription reads: equal for every subscription of one
    /// stream (and its [`FrameSignal`]s) while they live.
    pub fn stream_id(&self) -> usize {
        Arc::as_ptr(&self._guard.0) as usize
    }

    /// A signal that wakes one waiter when this subscription's stream has a new event: a
    /// driver serving many subscriptions of a stream waits on one signal and reads each of
    /// them with [`Subscription::try_next`].
    pub fn signal(&self) -> FrameSignal {
        FrameSignal {
            rx: self.rx.resubscribe(),
            stream: self._guard.0.clone(),
        }
    }

    /// The next event. Cancel-safe.
    pub async fn next(&mut self) -> Result<StreamEvent, SubscriptionEnd> {
        self.check_kicked()?;
        if let Some(ev) = self.backlog.pop_front() {
            return Ok(self.observe(ev));
        }
        loop {
            match self.rx.recv().await {
                Ok(ev) => {
                    if let Some(ev) = self.filter(ev) {
                        return Ok(ev);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.on_lag()?;
                    return Ok(StreamEvent::Discontinuity);
                }
                Err(broadcast::error::RecvError::Closed) => return Err(SubscriptionEnd::Ended),
            }
        }
    }

    /// The next event if one is ready now, without waiting (to batch writes).
    pub fn try_next(&mut self) -> Option<Result<StreamEvent, SubscriptionEnd>> {
        if let Err(e) = self.check_kicked() {
            return Some(Err(e));
        }
        if let Some(ev) = self.backlog.pop_front() {
            return Some(Ok(self.observe(ev)));
        }
        loop {
            match self.rx.try_recv() {
                Ok(ev) => {
                    if let Some(ev) = self.filter(ev) {
                        return Some(Ok(ev));
                    }
                }
                Err(broadcast::error::TryRecvError::Empty) => return None,
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    return Some(self.on_lag().map(|_| StreamEvent::Discontinuity));
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    return Some(Err(SubscriptionEnd::Ended))
                }
            }
        }
    }

    fn observe(&mut self, ev: StreamEvent) -> StreamEvent {
        if let StreamEvent::Config(c) = &ev {
            self.has_video = c.video.is_some();
        }
        ev
    }

    /// Drops frames while skipping to the next keyframe.
    fn filter(&mut self, ev: StreamEvent) -> Option<StreamEvent> {
        if self.skipping {
            if let StreamEvent::Frame(p) = &ev {
                if !p.frame.resumes_at(self.has_video) {
                    return None;
                }
                self.skipping = false;
            }
        }
        Some(self.observe(ev))
    }

    fn on_lag(&mut self) -> Result<(), SubscriptionEnd> {
        let now = Instant::now();
        while self
            .lag_events
            .front()
            .is_some_and(|t| now.duration_since(*t) > LAG_WINDOW)
        {
            self.lag_events.pop_front();
        }
        self.lag_events.push_back(now);
        self.skipping = true;
        if self.lag_events.len() > self.max_lag_events as usize {
            return Err(SubscriptionEnd::TooSlow);
        }
        Ok(())
    }
}

/// Rings when a stream has new events (see [`Subscription::signal`]). It reads the stream's
/// ring like a subscription but keeps nothing, holds no place under the viewer limits and
/// does not keep the stream from going idle.
pub struct FrameSignal {
    rx: broadcast::Receiver<StreamEvent>,
    stream: Arc<Stream>,
}

impl FrameSignal {
    /// The stream's id, as [`Subscription::stream_id`] gives it.
    pub fn stream_id(&self) -> usize {
        Arc::as_ptr(&self.stream) as usize
    }

    /// Waits until the stream has events that were not there at the last call (those that
    /// arrived meanwhile are taken together); false once the stream has ended.
    pub async fn wait(&mut self) -> bool {
        match self.rx.recv().await {
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return false,
        }
        loop {
            match self.rx.try_recv() {
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(broadcast::error::TryRecvError::Empty) => return true,
                Err(broadcast::error::TryRecvError::Closed) => return false,
            }
        }
    }
}
