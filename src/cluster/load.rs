//! Node load reporting: the figures a node puts in its record for routing ([`NodeLoad`]).
//!
//! * **viewers**: players of the consumer protocols (RTMP, FLV, WebRTC), from the metrics'
//!   `viewers` gauges. Never the hub's subscriber counts: those include audio bridges and
//!   backbone relays, so a WHEP viewer of an RTMP stream would count twice.
//! * **out_bps**: what the node sends, every protocol and egress
//!   ([`Metrics::bytes_out_total`]), as a rate between samples.
//! * **load**: the larger of viewers against `node.max_viewers` and the process's CPU use
//!   (from `/proc/self/stat`).
//!
//! The backbone carries the figures and never computes them: `node` hands it a
//! [`LoadMeter`] as a [`LoadProbe`].

use std::sync::Arc;
use std::time::Instant;

use crate::backbone::{LoadProbe, NodeLoad};
use crate::metrics::{Metrics, Proto};

/// The protocols whose `viewers` gauge counts players (the backbone's counts other nodes).
pub const CONSUMER_PROTOCOLS: [Proto; 3] = [Proto::Rtmp, Proto::Flv, Proto::WebRtc];

/// Samples this node's load from its metrics and its CPU use.
pub struct LoadMeter {
    metrics: Arc<Metrics>,
    max_viewers: u32,
    cpu: CpuSampler,
    out: Rate,
}

impl LoadMeter {
    pub fn new(metrics: Arc<Metrics>, max_viewers: u32, now: Instant) -> LoadMeter {
        let out = Rate::new(metrics.bytes_out_total(), now);
        LoadMeter {
            metrics,
            max_viewers,
            cpu: CpuSampler::new(),
            out,
        }
    }

    /// The figures now.
    pub fn sample(&mut self, now: Instant) -> NodeLoad {
        let viewers = CONSUMER_PROTOCOLS
            .into_iter()
            .map(|p| self.metrics.viewers_of(p))
            .sum::<i64>()
            .clamp(0, u32::MAX as i64) as u32;
        let cpu = self.cpu.sample(now);
        NodeLoad {
            viewers,
            load_permille: load_permille(viewers, self.max_viewers, cpu),
            egress: self.metrics.egress_active.get().max(0) as u32,
            out_bps: self.out.per_second(self.metrics.bytes_out_total(), now) * 8,
        }
    }

    /// The meter as the backbone takes it.
    pub fn into_probe(mut self) -> LoadProbe {
        Box::new(move |now| self.sample(now))
    }
}

/// Load, 0-1000: the larger of viewers against `max_viewers` and `cpu` (0-1).
pub fn load_permille(viewers: u32, max_viewers: u32, cpu: f64) -> u16 {
    let by_viewers = (viewers as f64 / max_viewers.max(1) as f64).min(1.0);
    (by_viewers.max(cpu.clamp(0.0, 1.0)) * 1000.0).round() as u16
}

/// A counter's growth per second between samples.
struct Rate {
    last: u64,
    at: Instant,
}

impl Rate {
    fn new(total: u64, now: Instant) -> Rate {
        Rate {
            last: total,
            at: now,
        }
    }

    fn per_second(&mut self, total: u64, now: Instant) -> u64 {
        let secs = now
            .saturating_duration_since(self.at)
            .as_secs_f64()
            .max(1e-3);
        let rate = (total.saturating_sub(self.last) as f64 / secs) as u64;
        self.last = total;
        self.at = now;
        rate
    }
}

/// This process's CPU use, 0-1 of all cores, from `/proc/self/stat` between samples.
struct CpuSampler {
    last: Option<(u64, Instant)>,
    cores: f64,
}

impl CpuSampler {
    fn new() -> CpuSampler {
        CpuSampler {
            last: None,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
        }
    }

    fn sample(&mut self, now: Instant) -> f64 {
        let Some(ticks) = process_cpu_ticks() else {
            return 0.0;
        };
        self.used(ticks, now)
    }

    /// The share of all cores used since the last sample, given the ticks now.
    fn used(&mut self, ticks: u64, now: Instant) -> f64 {
        let used = match self.last {
            Some((t, at)) => {
                let secs = now.saturating_duration_since(at).as_secs_f64().max(1e-3);
                // Linux counts CPU time in USER_HZ ticks, 100 per second.
                ticks.saturating_sub(t) as f64 / 100.0 / secs / self.cores
            }
            None => 0.0,
        };
        self.last = Some((ticks, now));
        used.clamp(0.0, 1.0)
    }
}

/// utime + stime of this process, in clock ticks.
fn process_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn load_is_the_larger_of_viewers_and_cpu() {
        assert_eq!(load_permille(5, 10, 0.2), 500);
        assert_eq!(load_permille(1, 10, 0.73), 730);
        assert_eq!(load_permille(50, 10, 0.0), 1000, "capped");
        assert_eq!(load_permille(0, 0, 0.0), 0, "no division by zero");
    }

    #[test]
    fn out_rate_is_per_second_between_samples() {
        let t = Instant::now();
        let mut r = Rate::new(1000, t);
        assert_eq!(r.per_second(3000, t + Duration::from_secs(2)), 1000);
        assert_eq!(r.per_second(3000, t + Duration::from_secs(3)), 0);
        // A counter that went backwards (never should) reads as no traffic.
        assert_eq!(r.per_second(10, t + Duration::from_secs(4)), 0);
    }

    #[test]
    fn cpu_use_is_shared_over_the_cores() {
        let t = Instant::now();
        let mut cpu = CpuSampler {
            last: None,
            cores: 2.0,
        };
        assert_eq!(cpu.used(500, t), 0.0, "first sample");
        // 100 ticks (1 s of CPU) in 1 s on 2 cores: half.
        assert_eq!(cpu.used(600, t + Duration::from_secs(1)), 0.5);
        assert!(
            process_cpu_ticks().is_some(),
            "this process has a /proc/self/stat"
        );
    }

    #[test]
    fn viewers_are_the_consumer_protocols_gauges_only() {
        let metrics = Arc::new(Metrics::new());
        metrics.proto(Proto::Flv).viewers.inc();
        metrics.proto(Proto::WebRtc).viewers.inc();
        metrics.proto(Proto::Rtmp).viewers.inc();
        // Another node's pull of a stream is no viewer.
        metrics.proto(Proto::Backbone).viewers.inc();
        let mut meter = LoadMeter::new(metrics, 10, Instant::now());
        let load = meter.sample(Instant::now());
        assert_eq!(load.viewers, 3);
        assert!(load.load_permille >= 300);
    }
}
