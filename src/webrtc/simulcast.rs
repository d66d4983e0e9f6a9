//! Which simulcast layer a WHEP viewer gets (sans-IO, explicit `now`).
//!
//! Input: the stream's layers (smallest first), the viewer's bandwidth estimate from its
//! TWCC feedback (str0m's send-side estimator), and the bytes actually sent on the current
//! layer. Output: the layer to send, and the bitrate str0m should probe toward.
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
//! The switch itself happens at the new layer's next keyframe (the caller's job).

use std::time::{Duration, Instant};

use crate::media::SimulcastLayer;

/// How long the estimate must cover the next layer before going up.
pub const UP_AFTER: Duration = Duration::from_secs(1);
/// Minimum time between a switch and the next upward one.
pub const SWITCH_SPACING: Duration = Duration::from_secs(3);
/// The measurement window of the sent rate.
const METER_WINDOW: Duration = Duration::from_millis(500);
const BITS_PER_PIXEL_FRAME: f64 = 0.08;
const NOMINAL_FPS: f64 = 30.0;

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
}
