//! Prometheus metrics for every hop: frames and bytes in and out per protocol, viewers,
//! lag skips and slow-viewer disconnects, backbone links and groups.
//!
//! The bottom of the house beside `media`: this module imports nothing of ours. Subsystems
//! hold the counters they increment; what is read from elsewhere at scrape time (the
//! backbone's links) arrives through a reader of plain [`LinkSample`]s.
//!
//! Hot paths clone the counter handles they need once (per connection) and increment the
//! shared atomics directly; nothing here takes a lock per frame.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// The protocol label of a series. WHIP and WHEP share `webrtc` (like RTMP publish and
/// play share `rtmp`): ingest counters are publishers, output counters viewers.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Proto {
    Rtmp,
    Flv,
    Backbone,
    WebRtc,
}

impl Proto {
    /// Every protocol, for totals.
    pub const ALL: [Proto; 4] = [Proto::Rtmp, Proto::Flv, Proto::Backbone, Proto::WebRtc];

    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Rtmp => "rtmp",
            Proto::Flv => "flv",
            Proto::Backbone => "backbone",
            Proto::WebRtc => "webrtc",
        }
    }
}

/// One backbone link's transport figures, as the backbone reports them at each scrape.
#[derive(Clone, Debug, Default)]
pub struct LinkSample {
    /// The node at the other end.
    pub node: String,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    pub rtt_ms: f64,
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

/// The event hook's delivery counters (shared with its delivery task).
#[derive(Clone, Default, Debug)]
pub struct HookCounters {
    pub delivered: Counter,
    pub failed: Counter,
    pub dropped: Counter,
}

impl EncodeLabelValue for Proto {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Where a keyframe request goes: the next node upstream, or the publisher itself.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyframeTo {
    pub to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtoLabel {
    pub proto: Proto,
}

/// A refused request: which protocol, and the kind of reason (never the reason's text,
/// which may name streams).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    pub protocol: &'static str,
    pub why: &'static str,
}

/// Counters of one consumer-facing protocol, cloned once per connection.
#[derive(Clone, Default)]
pub struct ProtoCounters {
    pub frames_out: Counter,
    pub bytes_out: Counter,
    pub lag_skips: Counter,
    pub slow_disconnects: Counter,
    pub viewers: Gauge,
}

/// One place taken in a gauge (a viewer, a publisher): the gauge counts it while the seat
/// lives, so an early return or a panic cannot leave it counted.
#[derive(Debug)]
pub struct Seat(Gauge);

impl Seat {
    pub fn take(gauge: &Gauge) -> Seat {
        gauge.inc();
        Seat(gauge.clone())
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counters of one publisher-facing protocol, cloned once per publisher.
#[derive(Clone, Default)]
pub struct IngestCounters {
    pub frames_in: Counter,
    pub bytes_in: Counter,
    /// Packets received (RTP for WebRTC).
    pub packets_in: Counter,
    pub publishers: Gauge,
}

pub struct Metrics {
    registry: Registry,
    frames_in: Family<ProtoLabel, Counter>,
    bytes_in: Family<ProtoLabel, Counter>,
    packets_in: Family<ProtoLabel, Counter>,
    packets_out: Family<ProtoLabel, Counter>,
    publishers: Family<ProtoLabel, Gauge>,
    frames_out: Family<ProtoLabel, Counter>,
    bytes_out: Family<ProtoLabel, Counter>,
    lag_skips: Family<ProtoLabel, Counter>,
    slow_disconnects: Family<ProtoLabel, Counter>,
    viewers: Family<ProtoLabel, Gauge>,
    pub connections: Family<ProtoLabel, Counter>,
    pub session_errors: Family<ProtoLabel, Counter>,
    pub local_streams: Gauge,
    pub relayed_streams: Gauge,
    pub backbone_links: Gauge,
    pub backbone_groups_sent: Counter,
    pub backbone_groups_received: Counter,
    pub backbone_groups_dropped: Counter,
    pub backbone_rehomes: Counter,
    pub backbone_returns: Counter,
    pub backbone_links_timed_out: Counter,
    pub publishers_evicted: Counter,
    /// Keyframe requests from this node's consumers (viewers, downstream nodes, egress).
    pub keyframe_requests_received: Counter,
    /// Keyframe requests this node sent on, after merging and rate-limiting.
    pub keyframe_requests_to_upstream: Counter,
    pub keyframe_requests_to_publisher: Counter,
    pub egress_active: Gauge,
    /// WHEP viewers on the joining threads: answered, not yet connected and caught up.
    pub webrtc_viewers_joining: Gauge,
    pub egress_bytes: Counter,
    pub egress_reconnects: Counter,
    pub egress_dropped_frames: Counter,
    /// Recording files uploaded to object storage, failed upload attempts (each retried),
    /// files waiting for their upload, and the bytes uploaded.
    pub recording_uploads: Counter,
    pub recording_upload_failures: Counter,
    pub recording_uploads_pending: Gauge,
    pub recording_upload_bytes: Counter,
    /// Requests and connections refused, by protocol and kind of reason.
    pub refused: Family<RefusedLabel, Counter>,
    hook_counters: HookCounters,
    /// Per-link transport figures, read from the backbone at each scrape.
    pub links: LinkCollector,
}

type LinkValue = fn(&LinkSample) -> u64;
type LinkReader = Box<dyn Fn() -> Vec<LinkSample> + Send + Sync>;

/// The backbone's links as metric families labelled by peer node and direction. The
/// values are the QUIC connections' own counters, taken when Prometheus scrapes, so a
/// closed link's series simply disappear.
#[derive(Clone, Default)]
pub struct LinkCollector(Arc<std::sync::OnceLock<LinkReader>>);

impl LinkCollector {
    /// Where the links are read from (the backbone, once it runs; set once).
    pub fn set_reader(&self, read: impl Fn() -> Vec<LinkSample> + Send + Sync + 'static) {
        let _ = self.0.set(Box::new(read));
    }
}

impl std::fmt::Debug for LinkCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkCollector")
    }
}

impl Collector for LinkCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let links = self.0.get().map(|read| read()).unwrap_or_default();
        if links.is_empty() {
            return Ok(());
        }
        let labels = |l: &LinkSample| {
            [
                ("peer", l.node.clone()),
                ("direction", l.direction.to_string()),
            ]
        };
        let mut family = encoder.encode_descriptor(
            "backbone_link_rtt_seconds",
            "Smoothed round-trip time of a backbone link (QUIC)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for l in &links {
            ConstGauge::new(l.rtt_ms / 1000.0).encode(family.encode_family(&labels(l))?)?;
        }
        let counters: [(&str, &str, LinkValue); 4] = [
            (
                "backbone_link_sent_packets",
                "QUIC packets sent on a backbone link",
                |l| l.sent_packets,
            ),
            (
                "backbone_link_lost_packets",
                "QUIC packets a backbone link declared lost",
                |l| l.lost_packets,
            ),
            (
                "backbone_link_sent_bytes",
                "UDP bytes sent on a backbone link",
                |l| l.sent_bytes,
            ),
            (
                "backbone_link_received_bytes",
                "UDP bytes received on a backbone link",
                |l| l.received_bytes,
            ),
        ];
        for (name, help, value) in counters {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for l in &links {
                ConstCounter::new(value(l)).encode(family.encode_family(&labels(l))?)?;
            }
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("meshcast");
        let keyframes_forwarded = Family::<KeyframeTo, Counter>::default();
        let forwarded_to = |to| {
            keyframes_forwarded
                .get_or_create(&KeyframeTo { to })
                .clone()
        };
        let m = Metrics {
            frames_in: Family::default(),
            bytes_in: Family::default(),
            packets_in: Family::default(),
            packets_out: Family::default(),
            publishers: Family::default(),
            frames_out: Family::default(),
            bytes_out: Family::default(),
            lag_skips: Family::default(),
            slow_disconnects: Family::default(),
            viewers: Family::default(),
            connections: Family::default(),
            session_errors: Family::default(),
            local_streams: Gauge::default(),
            relayed_streams: Gauge::default(),
            backbone_links: Gauge::default(),
            backbone_groups_sent: Counter::default(),
            backbone_groups_received: Counter::default(),
            backbone_groups_dropped: Counter::default(),
            backbone_rehomes: Counter::default(),
            backbone_returns: Counter::default(),
            backbone_links_timed_out: Counter::default(),
            publishers_evicted: Counter::default(),
            keyframe_requests_received: Counter::default(),
            keyframe_requests_to_upstream: forwarded_to("upstream"),
            keyframe_requests_to_publisher: forwarded_to("publisher"),
            egress_active: Gauge::default(),
            webrtc_viewers_joining: Gauge::default(),
            egress_bytes: Counter::default(),
            egress_reconnects: Counter::default(),
            egress_dropped_frames: Counter::default(),
            recording_uploads: Counter::default(),
            recording_upload_failures: Counter::default(),
            recording_uploads_pending: Gauge::default(),
            recording_upload_bytes: Counter::default(),
            refused: Family::default(),
            hook_counters: Default::default(),
            links: LinkCollector::default(),
            registry: Registry::default(),
        };
        registry.register_collector(Box::new(m.links.clone()));
        registry.register(
            "frames_in",
            "Frames received from publishers or upstream",
            m.frames_in.clone(),
        );
        registry.register(
            "bytes_in",
            "Payload bytes received from publishers or upstream",
            m.bytes_in.clone(),
        );
        registry.register(
            "frames_out",
            "Frames sent to consumers",
            m.frames_out.clone(),
        );
        registry.register(
            "bytes_out",
            "Bytes written to consumers",
            m.bytes_out.clone(),
        );
        registry.register(
            "lag_skips",
            "Times a consumer fell behind and skipped to the next keyframe",
            m.lag_skips.clone(),
        );
        registry.register(
            "slow_disconnects",
            "Consumers disconnected for staying behind",
            m.slow_disconnects.clone(),
        );
        registry.register("viewers", "Consumers attached now", m.viewers.clone());
        registry.register(
            "packets_in",
            "Packets received from publishers (RTP for WebRTC)",
            m.packets_in.clone(),
        );
        registry.register(
            "packets_out",
            "Packets sent to consumers (RTP for WebRTC)",
            m.packets_out.clone(),
        );
        registry.register(
            "publishers",
            "Publishers attached now",
            m.publishers.clone(),
        );
        registry.register("connections", "Connections accepted", m.connections.clone());
        registry.register(
            "session_errors",
            "Sessions closed on a protocol error",
            m.session_errors.clone(),
        );
        registry.register(
            "local_streams",
            "Streams published on this node",
            m.local_streams.clone(),
        );
        registry.register(
            "relayed_streams",
            "Streams pulled from another node",
            m.relayed_streams.clone(),
        );
        registry.register(
            "backbone_links",
            "Backbone connections established",
            m.backbone_links.clone(),
        );
        registry.register(
            "backbone_groups_sent",
            "Groups (GOPs) sent over the backbone",
            m.backbone_groups_sent.clone(),
        );
        registry.register(
            "backbone_groups_received",
            "Groups (GOPs) received over the backbone",
            m.backbone_groups_received.clone(),
        );
        registry.register(
            "backbone_groups_dropped",
            "Stale groups skipped by a receiver",
            m.backbone_groups_dropped.clone(),
        );
        registry.register(
            "backbone_rehomes",
            "Pulls that lost their upstream and resumed from another one",
            m.backbone_rehomes.clone(),
        );
        registry.register(
            "backbone_returns",
            "Edge pulls moved back to a more preferred origin (make-before-break)",
            m.backbone_returns.clone(),
        );
        registry.register(
            "backbone_links_timed_out",
            "Links closed because nothing arrived within backbone.link_timeout_ms",
            m.backbone_links_timed_out.clone(),
        );
        registry.register(
            "publishers_evicted",
            "Local publishers stopped because another origin holds the name (publish races)",
            m.publishers_evicted.clone(),
        );
        registry.register(
            "keyframe_requests_received",
            "Keyframe requests from consumers of this node's streams (viewers, downstream nodes)",
            m.keyframe_requests_received.clone(),
        );
        registry.register(
            "keyframe_requests_forwarded",
            "Keyframe requests sent on after merging and rate-limiting: to the upstream node or the publisher",
            keyframes_forwarded,
        );
        registry.register(
            "webrtc_viewers_joining",
            "WHEP viewers still joining (ICE, DTLS, their first GOP) on the joining threads, \
             before they move to a media shard",
            m.webrtc_viewers_joining.clone(),
        );
        registry.register(
            "egress_active",
            "Egresses (RTMP pushes and recordings) running",
            m.egress_active.clone(),
        );
        registry.register(
            "egress_bytes",
            "Bytes written by egresses to destinations and files",
            m.egress_bytes.clone(),
        );
        registry.register(
            "recording_uploads",
            "Recording files uploaded to object storage ([recording.s3])",
            m.recording_uploads.clone(),
        );
        registry.register(
            "recording_upload_failures",
            "Recording upload attempts that failed (each is retried with backoff)",
            m.recording_upload_failures.clone(),
        );
        registry.register(
            "recording_uploads_pending",
            "Recording files finished and not yet uploaded",
            m.recording_uploads_pending.clone(),
        );
        registry.register(
            "recording_upload_bytes",
            "Bytes of recording files uploaded to object storage",
            m.recording_upload_bytes.clone(),
        );
        registry.register(
            "egress_reconnects",
            "Times an egress destination failed and was retried",
            m.egress_reconnects.clone(),
        );
        registry.register(
            "refused",
            "Requests and connections refused (auth, limits, bad input), by protocol and kind of reason",
            m.refused.clone(),
        );
        registry.register(
            "hook_events_delivered",
            "Events the event hook accepted",
            m.hook_counters.delivered.clone(),
        );
        registry.register(
            "hook_events_failed",
            "Events the event hook refused or did not answer",
            m.hook_counters.failed.clone(),
        );
        registry.register(
            "hook_events_dropped",
            "Events dropped because the event hook's queue was full",
            m.hook_counters.dropped.clone(),
        );
        registry.register(
            "egress_dropped_frames",
            "Frames an egress dropped because its destination fell behind",
            m.egress_dropped_frames.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn proto(&self, proto: Proto) -> ProtoCounters {
        let l = ProtoLabel { proto };
        ProtoCounters {
            frames_out: self.frames_out.get_or_create(&l).clone(),
            bytes_out: self.bytes_out.get_or_create(&l).clone(),
            lag_skips: self.lag_skips.get_or_create(&l).clone(),
            slow_disconnects: self.slow_disconnects.get_or_create(&l).clone(),
            viewers: self.viewers.get_or_create(&l).clone(),
        }
    }

    /// Counters for frames and bytes received over `proto`.
    pub fn ingest(&self, proto: Proto) -> (Counter, Counter) {
        let l = ProtoLabel { proto };
        (
            self.frames_in.get_or_create(&l).clone(),
            self.bytes_in.get_or_create(&l).clone(),
        )
    }

    /// Counters of a publisher over `proto` (frames, bytes and packets in, and the
    /// publishers gauge).
    pub fn publisher_counters(&self, proto: Proto) -> IngestCounters {
        let l = ProtoLabel { proto };
        IngestCounters {
            frames_in: self.frames_in.get_or_create(&l).clone(),
            bytes_in: self.bytes_in.get_or_create(&l).clone(),
            packets_in: self.packets_in.get_or_create(&l).clone(),
            publishers: self.publishers.get_or_create(&l).clone(),
        }
    }

    /// Packets sent to consumers over `proto` (RTP for WebRTC).
    pub fn packets_out(&self, proto: Proto) -> Counter {
        self.packets_out
            .get_or_create(&ProtoLabel { proto })
            .clone()
    }

    /// Bytes sent to consumers and egress destinations so far, all protocols.
    pub fn bytes_out_total(&self) -> u64 {
        Proto::ALL
            .into_iter()
            .map(|proto| self.bytes_out.get_or_create(&ProtoLabel { proto }).get())
            .sum::<u64>()
            + self.egress_bytes.get()
    }

    /// Consumers of `proto` attached now.
    pub fn viewers_of(&self, proto: Proto) -> i64 {
        self.viewers.get_or_create(&ProtoLabel { proto }).get()
    }

    pub fn count_connection(&self, proto: Proto) {
        self.connections.get_or_create(&ProtoLabel { proto }).inc();
    }

    /// Counts a refusal: `why` is a short kind (`unauthorized`, `forbidden`, `limit`,
    /// `bad_input`, `idle`...).
    pub fn count_refused(&self, protocol: &'static str, why: &'static str) {
        self.refused
            .get_or_create(&RefusedLabel { protocol, why })
            .inc();
    }

    /// The event hook's counters (shared with its delivery task).
    pub fn hook_counters(&self) -> HookCounters {
        self.hook_counters.clone()
    }

    pub fn count_session_error(&self, proto: Proto) {
        self.session_errors
            .get_or_create(&ProtoLabel { proto })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seat_counts_while_it_lives() {
        let m = Metrics::new();
        let webrtc = m.proto(Proto::WebRtc);
        let _viewer = Seat::take(&webrtc.viewers);
        {
            let _another = Seat::take(&webrtc.viewers);
            assert_eq!(m.viewers_of(Proto::WebRtc), 2);
        }
        assert_eq!(m.viewers_of(Proto::WebRtc), 1);
        assert_eq!(m.viewers_of(Proto::Rtmp), 0);
    }

    #[test]
    fn webrtc_bytes_reach_the_total_the_node_reports() {
        let m = Metrics::new();
        m.proto(Proto::WebRtc).bytes_out.inc_by(1200);
        m.proto(Proto::Rtmp).bytes_out.inc_by(800);
        assert_eq!(m.bytes_out_total(), 2000);
        let out = m.render();
        assert!(
            out.contains("meshcast_bytes_out_total{proto=\"webrtc\"} 1200"),
            "{out}"
        );
    }
}
