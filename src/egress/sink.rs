//! What passes between an egress task and its sink: the queued [`Item`]s, the
//! [`SinkHandle`] the task holds, and how a sink ends ([`SinkError`], which says whether the
//! task may try again).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::media::{Packet, StreamConfig};
use crate::rtmp::client::PlayError;

/// Items queued between an egress and its sink.
const SINK_QUEUE: usize = 512;
/// How long a sink being closed (or an egress being stopped) is waited for to finish its
/// file or unpublish.
pub(super) const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What a sink receives.
#[derive(Clone, Debug)]
pub enum Item {
    /// Codec configuration; always before the frames it applies to.
    Config(Arc<StreamConfig>),
    /// A frame with output timestamps (milliseconds from the egress's start).
    Frame {
        packet: Arc<Packet>,
        dts_ms: i64,
        pts_ms: i64,
    },
    /// The publisher came back and the policy is `new_segment`: finish the file/publish.
    NewSegment,
}

/// Why a sink stopped. Every kind but [`SinkError::DiskFull`] is worth another attempt
/// after a pause ([`SinkError::is_permanent`]).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The destination policy refused the address the destination resolved to.
    #[error("{destination}: refused: {reason}")]
    Refused {
        destination: String,
        reason: super::policy::PolicyError,
    },
    #[error("{destination}: no answer within {timeout:?}")]
    ConnectTimeout {
        destination: String,
        timeout: Duration,
    },
    /// Connecting, the handshake or the publish request failed.
    #[error("{destination}: {source}")]
    Connect {
        destination: String,
        source: PlayError,
    },
    #[error("reading from the destination: {0}")]
    Read(std::io::Error),
    #[error("the destination closed the connection")]
    Closed,
    #[error("bad RTMP from the destination: {0}")]
    BadInput(PlayError),
    /// The destination sent an error status.
    #[error("the destination said {0}")]
    Status(String),
    #[error("writing to the destination: {0}")]
    Write(std::io::Error),
    #[error("the destination did not read for {0:?}")]
    WriteTimeout(Duration),
    #[error("the destination did not accept a new publish")]
    RepublishTimeout,
    #[error("{0}")]
    Republish(PlayError),
    /// rml_rtmp's client session refused an operation.
    #[error("{0}")]
    Session(String),
    /// A recording's file could not be opened or written.
    #[error("{0}")]
    File(String),
    /// The disk holding the recordings reached its floor: the egress fails for good.
    #[error("{0}")]
    DiskFull(String),
    /// The sink went away without saying why.
    #[error("the destination closed")]
    Gone,
}

impl SinkError {
    /// Whether a new sink would fail the same way: the egress turns `Failed` instead of
    /// retrying.
    pub fn is_permanent(&self) -> bool {
        matches!(self, SinkError::DiskFull(_))
    }

    /// From an rml_rtmp client session error.
    pub(super) fn session(e: rml_rtmp::sessions::ClientSessionError) -> SinkError {
        SinkError::Session(format!("{e:?}"))
    }
}

/// A running sink: its queue and how it ended.
pub struct SinkHandle {
    pub(super) tx: mpsc::Sender<Item>,
    pub(super) done: tokio::sync::oneshot::Receiver<Result<(), SinkError>>,
}

impl SinkHandle {
    pub fn new() -> (
        SinkHandle,
        mpsc::Receiver<Item>,
        tokio::sync::oneshot::Sender<Result<(), SinkError>>,
    ) {
        let (tx, rx) = mpsc::channel(SINK_QUEUE);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        (SinkHandle { tx, done }, rx, done_tx)
    }
}

/// Closes a sink cleanly (its queue ends; it finishes the file or unpublishes).
pub(super) async fn close(sink: SinkHandle) {
    let SinkHandle { tx, done } = sink;
    drop(tx);
    let _ = tokio::time::timeout(CLOSE_WAIT, done).await;
}
