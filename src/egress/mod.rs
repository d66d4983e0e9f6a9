//! Egress: pushing streams to RTMP destinations and recording them to files.
//!
//! Every egress is one task that owns a [`Subscription`](crate::hub::Subscription) to its stream and feeds a *sink*
//! through a bounded queue: an RTMP push connection ([`rtmp_push`]) or a file writer thread
//! ([`record`]). The queue decouples them, so a slow or dead destination never slows the
//! stream or the other egresses: when the queue is full the egress drops frames until the
//! next keyframe (counted), and when a sink fails it is restarted with exponential backoff
//! and jitter (counted, with the last error) while the stream goes on.
//!
//! Timestamps given to sinks are rewritten by a [`Retimer`]: they start near zero and stay
//! monotonic across publisher reconnects, with one offset per subscription applied to audio
//! and video alike, so their relation (A/V sync) is exactly the input's.
//!
//! Audio: RTMP, FLV and MP4 take AAC, so an Opus stream is consumed through the shared
//! `~aac` bridge ([`crate::bridge`]), transcoded once per stream per node while any consumer
//! needs it. Video is remuxed, never re-encoded — unless the egress asks for
//! `transcode_video` and the destination cannot carry the codec (VP8 → H.264, shared the
//! same way through a `~h264` bridge).
//!
//! The files: [`registry`] (the [`Egress`] jobs the API and config create), [`task`] (one
//! job's loop: wait, sink, pump, retry), [`sink`] (the queue between them and how a sink
//! fails), [`status`] (what the API shows), [`retimer`], the sinks [`rtmp_push`] and
//! [`record`], [`upload`] (finished recordings to object storage), [`spec`] (requests and rules, which `config` owns), [`policy`] (where pushes may go) and
//! [`retention`]. Egress consumes the hub like a viewer does; it never reaches the
//! cluster, the API or the node.

pub mod policy;
pub mod record;
pub mod registry;
pub mod retention;
pub mod retimer;
pub mod rtmp_push;
pub mod sink;
pub use crate::config::egress_spec as spec;
pub mod status;
pub mod task;
pub mod upload;

pub use registry::{CreateError, Egress, EgressSettings};
pub use retimer::Retimer;
pub use sink::{Item, SinkError, SinkHandle};
pub use spec::{EgressRequest, EgressSpec, FieldError, StreamMatch, Target};
pub use status::{EgressStatus, SharedStatus, State};
