//! Which simulcast layer a WHEP viewer gets, and when it switches (sans-IO, explicit `now`).
//!
//! Two plain state machines; the viewer's peer (`whep.rs`) drives them and does the
//! subscribing and sending:
//!
//! * [`LayerChooser`] picks the layer the viewer's bandwidth fits.
//! * [`LayerSwitch`] follows that choice with subscriptions: it says which layer to
//!   subscribe to, when to ask the layer being joined for a keyframe again, and at which of
//!   its frames the viewer switches to it.
//!
//! **Choosing.** Input: the stream's layers (smallest first), the viewer's bandwidth
//! estimate from its TWCC feedback (str0m's send-side estimator), and the bytes actually
//! sent on the current layer. Output: the layer to send, and the bitrate str0m should probe
//! toward.
//!
//! A layer's bitrate is only measured while it is sent, so the others are *expected*: a
//! nominal rate for the picture size (0.08 bit per pixel at 30 fps, about what browsers
//! give 180p/360p/720p simulcast), scaled by how the current layer's measured rate compares
//! with its own nominal rate (simple scenes code smaller at every size).
//!
//! * **Down** as soon as the estimate falls below what the current layer sends: to the
//!   largest layer that fits 90% of the estimate. Congestion is not waited out; str0m's pacer
//!   would otherwise queue video behind the estimate.
//! * **Up** one layer when the estimate has covered the next layer's expected rate with 15%
//!   headroom for [`UP_AFTER`], and not within [`SWITCH_SPACING`] of the last switch.
//!
//! **Switching.** The viewer keeps receiving its current layer while it subscribes to the
//! chosen one, and switches at that layer's first keyframe that does not go back in time
//! (layers share one timeline, aligned at ingest): the picture changes cleanly and the
//! viewer's RTP time runs on.

use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::media::SimulcastLayer;

/// How long the estimate must cover the next layer before going up.
pub const UP_AFTER: Duration = Duration::from_secs(1);
/// Minimum time between a switch and the next upward one.
pub const SWITCH_SPACING: Duration = Duration::from_secs(3);
/// The measurement window of the sent rate.
const METER_WINDOW: Duration = Duration::from_millis(500);
const BITS_PER_PIXEL_FRAME: f64 = 0.08;
const NOMINAL_FPS: f64 = 30.0;
/// A simulcast viewer's bandwidth estimate before its first feedback.
pub(crate) const INITIAL_ESTIMATE_BPS: u64 = 1_000_000;
/// How soon a viewer tries again to join a layer it could not subscribe to.
pub const LAYER_RETRY: Duration = Duration::from_secs(1);
/// How far (90 kHz ticks, 5 ms) a layer's keyframe may be behind the last frame sent and
/// still be joined, as a picture of the same capture instant.
pub const SAME_CAPTURE_TICKS: i64 = 450;
/// How often a layer being joined is asked again for the keyframe the join waits for (a
/// request can be lost on the way; every hop's gate merges the repeats).
pub const JOIN_KEYFRAME_REPEAT: Duration = Duration::from_secs(1);

/// Bits per second, smoothed over [`METER_WINDOW`] steps.
#[derive(Debug, Default)]
struct RateMeter {
    since: Option<Instant>,
    bytes: u64,
    rate: Option<f64>,
}

impl RateMeter {
    fn add(&mut self, now: Instant, bytes: usize) {
        let since = *self.since.get_or_insert(now);
        self.bytes += bytes as u64;
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= METER_WINDOW {
            let r = self.bytes as f64 * 8.0 / elapsed.as_secs_f64();
            self.rate = Some(self.rate.map_or(r, |old| 0.5 * old + 0.5 * r));
            self.since = Some(now);
            self.bytes = 0;
        }
    }
}

#[derive(Debug)]
pub struct LayerChooser {
    layers: Vec<SimulcastLayer>,
    /// The layer being sent (index into `layers`), once one is.
    current: Option<usize>,
    target: usize,
    estimate: Option<f64>,
    meter: RateMeter,
    /// Measured over nominal rate, from the last layer measured (kept across switches).
    scale: f64,
    up_since: Option<Instant>,
    last_switch: Option<Instant>,
}

impl LayerChooser {
    /// Starts with the largest layer whose nominal rate fits `initial_bps`.
    pub fn new(layers: Vec<SimulcastLayer>, initial_bps: u64) -> Self {
        let mut c = LayerChooser {
            layers,
            current: None,
            target: 0,
            estimate: None,
            meter: RateMeter::default(),
            scale: 1.0,
            up_since: None,
            last_switch: None,
        };
        c.target = c.largest_fitting(initial_bps as f64);
        c
    }

    pub fn layers(&self) -> &[SimulcastLayer] {
        &self.layers
    }

    /// The layer to send (its rid).
    pub fn target(&self) -> &SimulcastLayer {
        &self.layers[self.target]
    }

    pub fn current(&self) -> Option<&SimulcastLayer> {
        self.current.map(|i| &self.layers[i])
    }

    /// The stream's layer list changed (a layer started or changed size).
    pub fn set_layers(&mut self, layers: Vec<SimulcastLayer>) {
        let rid_of = |i: Option<usize>| i.map(|i| self.layers[i].rid.clone());
        let (current, target) = (rid_of(self.current), rid_of(Some(self.target)));
        let find = |rid: Option<String>| layers.iter().position(|l| Some(&l.rid) == rid.as_ref());
        self.current = find(current);
        self.target = find(target).unwrap_or(layers.len().saturating_sub(1) / 2);
        self.layers = layers;
    }

    /// The caller now sends layer `rid` (it reached a keyframe of it).
    pub fn switched(&mut self, now: Instant, rid: &str) {
        self.current = self.layers.iter().position(|l| l.rid == rid);
        self.meter = RateMeter::default();
        self.up_since = None;
        self.last_switch = Some(now);
    }

    /// Video bytes sent on the current layer.
    pub fn on_sent(&mut self, now: Instant, bytes: usize) {
        self.meter.add(now, bytes);
        if let (Some(c), Some(r)) = (self.current, self.meter.rate) {
            self.scale = (r / self.nominal(c)).clamp(0.3, 3.0);
        }
        self.decide(now);
    }

    /// A new bandwidth estimate for this viewer.
    pub fn on_estimate(&mut self, now: Instant, bps: u64) {
        self.estimate = Some(bps as f64);
        self.decide(now);
    }

    /// What str0m should probe toward: the next layer up (with headroom), or the top one.
    pub fn desired_bps(&self) -> u64 {
        let next = self
            .current
            .map_or(self.target, |c| (c + 1).min(self.layers.len() - 1));
        (self.expected(next) * 1.2) as u64
    }

    fn nominal(&self, i: usize) -> f64 {
        self.layers[i].pixels() as f64 * NOMINAL_FPS * BITS_PER_PIXEL_FRAME
    }

    /// The rate layer `i` is expected to need (see the module notes).
    fn expected(&self, i: usize) -> f64 {
        self.nominal(i) * self.scale
    }

    fn largest_fitting(&self, bps: f64) -> usize {
        (0..self.layers.len())
            .rev()
            .find(|&i| self.expected(i) <= bps)
            .unwrap_or(0)
    }

    fn decide(&mut self, now: Instant) {
        let (Some(current), Some(estimate)) = (self.current, self.estimate) else {
            return;
        };
        if self.target != current {
            return; // a switch is under way
        }
        let sending = self.meter.rate.unwrap_or_else(|| self.expected(current));
        if estimate < sending && current > 0 {
            self.target = self.largest_fitting(estimate * 0.9).min(current - 1);
            self.up_since = None;
            return;
        }
        let next = current + 1;
        if next >= self.layers.len() || estimate < self.expected(next) * 1.15 {
            self.up_since = None;
            return;
        }
        let since = *self.up_since.get_or_insert(now);
        let spaced = self
            .last_switch
            .is_none_or(|t| now.duration_since(t) >= SWITCH_SPACING);
        if now.duration_since(since) >= UP_AFTER && spaced {
            self.target = next;
            self.up_since = None;
        }
    }
}

/// A layer subscription the switch holds for its driver: the layer's id and the driver's
/// handle on it (a hub subscription; `F` keeps this module free of IO).
#[derive(Debug)]
pub struct HeldLayer<F> {
    pub rid: String,
    pub feed: F,
    /// When a keyframe was last asked of this layer (joining it waits for one).
    asked: Instant,
}

/// What the driver of a [`LayerSwitch`] must do.
#[derive(Debug, PartialEq, Eq)]
pub enum LayerAction {
    /// Have the viewer's bandwidth probed up to this rate (bits per second).
    Probe(u64),
    /// Ask the layer being joined for a keyframe (again).
    RequestJoinKeyframe,
    /// Subscribe to this layer, and hand the outcome to [`LayerSwitch::opened`].
    Open(String),
}

/// A WHEP viewer's simulcast state: the layer it is sent, the one it switches to at that
/// layer's next keyframe, and the one being subscribed to. Idle for streams without
/// simulcast. See the module notes.
#[derive(Debug)]
pub struct LayerSwitch<F> {
    chooser: Option<LayerChooser>,
    current: Option<HeldLayer<F>>,
    joining: Option<HeldLayer<F>>,
    /// A layer subscription being made (on an edge it may pull the layer first).
    opening: Option<String>,
    /// When a layer subscription last failed (retried after [`LAYER_RETRY`]).
    open_failed: Option<Instant>,
    /// The last video frame sent (90 kHz): a layer is joined at a keyframe after it.
    last_video_pts: Option<i64>,
    probe_bps: u64,
}

impl<F> Default for LayerSwitch<F> {
    fn default() -> Self {
        LayerSwitch {
            chooser: None,
            current: None,
            joining: None,
            opening: None,
            open_failed: None,
            last_video_pts: None,
            probe_bps: 0,
        }
    }
}

impl<F> LayerSwitch<F> {
    /// Whether the stream has layers: then the viewer's video comes from them.
    pub fn is_layered(&self) -> bool {
        self.chooser.is_some()
    }

    /// The layer being sent.
    pub fn current(&self) -> Option<&HeldLayer<F>> {
        self.current.as_ref()
    }

    pub fn current_mut(&mut self) -> Option<&mut HeldLayer<F>> {
        self.current.as_mut()
    }

    /// The layer being joined.
    pub fn joining(&self) -> Option<&HeldLayer<F>> {
        self.joining.as_ref()
    }

    pub fn joining_mut(&mut self) -> Option<&mut HeldLayer<F>> {
        self.joining.as_mut()
    }

    /// The current and the joining layer's feeds, to wait on both at once.
    pub fn feeds_mut(&mut self) -> (Option<&mut F>, Option<&mut F>) {
        (
            self.current.as_mut().map(|l| &mut l.feed),
            self.joining.as_mut().map(|l| &mut l.feed),
        )
    }

    /// The stream's layer list arrived or changed (empty: no simulcast).
    pub fn set_layers(&mut self, layers: &[SimulcastLayer]) {
        if layers.is_empty() {
            return;
        }
        match &mut self.chooser {
            Some(c) if c.layers() == layers => {}
            Some(c) => c.set_layers(layers.to_vec()),
            None => {
                let c = LayerChooser::new(layers.to_vec(), INITIAL_ESTIMATE_BPS);
                info!(layers = layers.len(), first = %c.target().rid, "simulcast viewer");
                self.chooser = Some(c);
            }
        }
    }

    /// The next thing to do; call until `None`. Each action is returned once: the switch
    /// counts it as done.
    pub fn poll(&mut self, now: Instant) -> Option<LayerAction> {
        let chooser = self.chooser.as_ref()?;
        let desired = chooser.desired_bps();
        if desired != self.probe_bps {
            self.probe_bps = desired;
            return Some(LayerAction::Probe(desired));
        }
        // A join waits for the layer's next keyframe: ask again while it has not come.
        if let (Some(joining), Some(_)) = (&mut self.joining, &self.current) {
            if now.saturating_duration_since(joining.asked) >= JOIN_KEYFRAME_REPEAT {
                joining.asked = now;
                return Some(LayerAction::RequestJoinKeyframe);
            }
        }
        let target = chooser.target().rid.as_str();
        let held = |l: &Option<HeldLayer<F>>| l.as_ref().is_some_and(|l| l.rid == target);
        let opening = self.opening.as_deref() == Some(target);
        let failed_lately = self
            .open_failed
            .is_some_and(|t| now.saturating_duration_since(t) < LAYER_RETRY);
        if held(&self.current) || held(&self.joining) || opening || failed_lately {
            return None;
        }
        let target = target.to_string();
        self.joining = None;
        self.opening = Some(target.clone());
        Some(LayerAction::Open(target))
    }

    /// The subscription asked for by [`LayerAction::Open`] is made (`Some`) or failed.
    /// Returns true when the new layer must be asked for a keyframe now: a switch waits
    /// for one (the first layer starts from its cached keyframe).
    pub fn opened(&mut self, now: Instant, feed: Option<F>) -> bool {
        let Some(rid) = self.opening.take() else {
            return false;
        };
        let Some(feed) = feed else {
            self.open_failed = Some(now);
            return false;
        };
        self.joining = Some(HeldLayer {
            rid,
            feed,
            asked: now,
        });
        self.current.is_some()
    }

    /// A video frame of the layer being joined, at `pts` (90 kHz). At a keyframe that does
    /// not go back in time, once the layer is `configured`, the viewer switches to it:
    /// returns by how many ticks the viewer's RTP time must step forward (a keyframe of the
    /// same capture as the last frame sent replaces that picture one tick later). The
    /// driver then sends this frame as the new current layer's.
    pub fn joining_frame(
        &mut self,
        now: Instant,
        pts: i64,
        keyframe: bool,
        configured: bool,
    ) -> Option<u32> {
        let joining = self.joining.as_ref()?;
        let step = self.last_video_pts.map_or(0, |last| last + 1 - pts);
        if keyframe {
            debug!(rid = %joining.rid, pts, last = ?self.last_video_pts, configured, "keyframe on the layer being joined");
        }
        if !keyframe || !configured || step > SAME_CAPTURE_TICKS {
            return None;
        }
        let joining = self.joining.take()?;
        info!(from = ?self.current.as_ref().map(|c| &c.rid), to = %joining.rid, "simulcast layer switch");
        if let Some(chooser) = &mut self.chooser {
            chooser.switched(now, &joining.rid);
        }
        self.current = Some(joining);
        Some(step.max(0) as u32)
    }

    /// A video frame of the current layer, at `pts` (90 kHz), went out as `bytes`.
    pub fn sent(&mut self, now: Instant, pts: i64, bytes: usize) {
        self.last_video_pts = Some(pts);
        if let Some(chooser) = &mut self.chooser {
            chooser.on_sent(now, bytes);
        }
    }

    /// A new bandwidth estimate for the viewer.
    pub fn estimate(&mut self, now: Instant, bps: u64) {
        if let Some(chooser) = &mut self.chooser {
            chooser.on_estimate(now, bps);
        }
    }

    /// The current layer stopped (its publisher dropped it): the chooser's target is
    /// joined again, or another one once the layer list changes.
    pub fn current_ended(&mut self) {
        self.current = None;
    }

    /// The layer being joined stopped.
    pub fn joining_ended(&mut self) {
        self.joining = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Vec<SimulcastLayer> {
        [("q", 320, 180), ("h", 640, 360), ("f", 1280, 720)]
            .into_iter()
            .map(|(rid, width, height)| SimulcastLayer {
                rid: rid.into(),
                width,
                height,
            })
            .collect()
    }

    /// Sends `bps` on the current layer for `secs`, 30 frames a second, with `estimate`.
    fn run(c: &mut LayerChooser, t: &mut Instant, secs: u64, bps: u64, estimate: u64) {
        for _ in 0..secs * 30 {
            *t += Duration::from_millis(33);
            c.on_sent(*t, (bps / 8 / 30) as usize);
            c.on_estimate(*t, estimate);
            if c.current().map(|l| &l.rid) != Some(&c.target().rid) {
                let rid = c.target().rid.clone();
                c.switched(*t, &rid);
            }
        }
    }

    #[test]
    fn starts_with_the_largest_layer_the_initial_estimate_fits() {
        assert_eq!(LayerChooser::new(layers(), 1_000_000).target().rid, "h");
        assert_eq!(LayerChooser::new(layers(), 100_000).target().rid, "q");
        assert_eq!(LayerChooser::new(layers(), 5_000_000).target().rid, "f");
    }

    #[test]
    fn goes_down_at_once_and_up_only_after_the_estimate_holds() {
        let mut t = Instant::now();
        let mut c = LayerChooser::new(layers(), 1_000_000);
        c.switched(t, "h");
        // 360p sends 500 kb/s; the link gives 300 kb/s.
        run(&mut c, &mut t, 1, 500_000, 300_000);
        assert_eq!(c.current().unwrap().rid, "q");
        // Plenty again: up one layer at a time, spaced.
        let start = t;
        run(&mut c, &mut t, 2, 130_000, 5_000_000);
        assert_eq!(
            c.current().unwrap().rid,
            "q",
            "spaced after the last switch"
        );
        run(&mut c, &mut t, 2, 130_000, 5_000_000);
        assert_eq!(c.current().unwrap().rid, "h");
        run(&mut c, &mut t, 4, 500_000, 5_000_000);
        assert_eq!(c.current().unwrap().rid, "f");
        assert!(t.duration_since(start) >= SWITCH_SPACING * 2);
    }

    #[test]
    fn expected_rates_follow_what_the_scene_really_costs() {
        let mut t = Instant::now();
        let mut c = LayerChooser::new(layers(), 1_000_000);
        c.switched(t, "h");
        // A simple scene: 360p needs only 150 kb/s, so 720p is expected near 600 kb/s and a
        // 900 kb/s link carries it.
        run(&mut c, &mut t, 6, 150_000, 900_000);
        assert_eq!(c.current().unwrap().rid, "f");
        // A link that cannot carry the next layer keeps the viewer where it is.
        let mut c = LayerChooser::new(layers(), 1_000_000);
        c.switched(t, "h");
        run(&mut c, &mut t, 6, 500_000, 1_200_000);
        assert_eq!(c.current().unwrap().rid, "h");
        assert!(c.desired_bps() > 2_000_000, "probes toward 720p");
    }

    #[test]
    fn a_changed_layer_list_keeps_the_current_layer() {
        let mut c = LayerChooser::new(layers()[..2].to_vec(), 1_000_000);
        c.switched(Instant::now(), "h");
        c.set_layers(layers());
        assert_eq!(c.current().unwrap().rid, "h");
        assert_eq!(c.target().rid, "h");
    }

    fn switch() -> (LayerSwitch<u32>, Instant) {
        let mut s = LayerSwitch::default();
        s.set_layers(&layers());
        (s, Instant::now())
    }

    /// Polls until nothing is left to do.
    fn actions(s: &mut LayerSwitch<u32>, now: Instant) -> Vec<LayerAction> {
        std::iter::from_fn(|| s.poll(now)).collect()
    }

    #[test]
    fn a_stream_without_layers_needs_nothing() {
        let mut s = LayerSwitch::<u32>::default();
        s.set_layers(&[]);
        assert!(!s.is_layered());
        assert_eq!(s.poll(Instant::now()), None);
    }

    #[test]
    fn the_first_layer_is_opened_and_joined_at_its_first_keyframe() {
        let (mut s, t) = switch();
        let a = actions(&mut s, t);
        assert!(matches!(a[0], LayerAction::Probe(_)), "{a:?}");
        assert_eq!(a[1..], [LayerAction::Open("h".into())]);
        assert!(
            !s.opened(t, Some(1)),
            "the first layer starts from its cached keyframe"
        );
        assert_eq!(actions(&mut s, t), [], "no repeat without a current layer");
        assert_eq!(
            s.joining_frame(t, 9_000, false, true),
            None,
            "not a keyframe"
        );
        assert_eq!(
            s.joining_frame(t, 9_000, true, false),
            None,
            "not configured"
        );
        assert_eq!(s.joining_frame(t, 9_000, true, true), Some(0));
        assert_eq!(s.current().unwrap().rid, "h");
        assert_eq!(s.current().unwrap().feed, 1);
        // Sending h, the probe reaches for the next layer up.
        let LayerAction::Probe(first) = a[0] else {
            unreachable!()
        };
        let after = actions(&mut s, t);
        assert!(
            matches!(after[..], [LayerAction::Probe(bps)] if bps > first),
            "{after:?}"
        );
    }

    /// A switch holding "h" and sending it, at 360p's rate, up to pts 90_000.
    fn sending_h() -> (LayerSwitch<u32>, Instant) {
        let (mut s, mut t) = switch();
        actions(&mut s, t);
        s.opened(t, Some(1));
        s.joining_frame(t, 0, true, true).unwrap();
        for i in 0..=30 {
            t += Duration::from_millis(33);
            s.sent(t, i * 3_000, 2_000);
        }
        actions(&mut s, t);
        (s, t)
    }

    #[test]
    fn a_switch_waits_for_a_keyframe_that_does_not_go_back_in_time() {
        let (mut s, mut t) = sending_h();
        // The link narrows: down to q.
        s.estimate(t, 100_000);
        assert_eq!(actions(&mut s, t), [LayerAction::Open("q".into())]);
        assert!(
            s.opened(t, Some(2)),
            "a switch asks the new layer for a keyframe"
        );
        // Until it comes, the request is repeated every second.
        t += JOIN_KEYFRAME_REPEAT / 2;
        assert_eq!(actions(&mut s, t), []);
        t += JOIN_KEYFRAME_REPEAT / 2;
        assert_eq!(actions(&mut s, t), [LayerAction::RequestJoinKeyframe]);
        assert_eq!(actions(&mut s, t), []);
        // A keyframe 10 ms behind the last frame sent (pts 90_000) would go back in time.
        assert_eq!(s.joining_frame(t, 90_000 - 900, true, true), None);
        // One of the same capture replaces that picture one tick later.
        assert_eq!(s.joining_frame(t, 90_000, true, true), Some(1));
        assert_eq!(s.current().unwrap().rid, "q");
        assert_eq!(s.current().unwrap().feed, 2);
    }

    #[test]
    fn a_layer_that_ends_or_fails_to_open_is_tried_again() {
        let (mut s, mut t) = sending_h();
        s.current_ended();
        assert_eq!(actions(&mut s, t), [LayerAction::Open("h".into())]);
        assert!(!s.opened(t, None));
        assert_eq!(actions(&mut s, t), [], "not again at once");
        t += LAYER_RETRY;
        assert_eq!(actions(&mut s, t), [LayerAction::Open("h".into())]);
        s.opened(t, Some(3));
        s.joining_ended();
        assert_eq!(actions(&mut s, t), [LayerAction::Open("h".into())]);
    }

    #[test]
    fn both_layers_are_fed_during_a_switch() {
        let (mut s, t) = sending_h();
        s.estimate(t, 100_000);
        actions(&mut s, t);
        s.opened(t, Some(2));
        assert_eq!(s.feeds_mut(), (Some(&mut 1), Some(&mut 2)));
    }
}
