//! What one egress is doing, as the API shows it: its [`State`], counters and files
//! ([`EgressStatus`]), kept in [`SharedStatus`] between the egress task, its sink and the API.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

use crate::metrics::Metrics;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for the stream to be live.
    Waiting,
    /// Opening the destination (connecting, handshaking, opening a file).
    Connecting,
    /// Sending.
    Live,
    /// The destination failed; retrying after a pause.
    Backoff,
    /// The stream cannot go to this destination (e.g. VP8 into RTMP); waiting for a new publish.
    Refused,
    /// The stream stayed away longer than the rule's `wait_seconds`.
    Finished,
    /// Deleted through the API or the node shut down.
    Stopped,
    /// The destination can take no more (the disk reached `recording.min_free_mb`); nothing
    /// more is written until the egress is created again. `last_error` says why.
    Failed,
}

/// What the API shows of one egress.
#[derive(Clone, Debug, Serialize)]
pub struct EgressStatus {
    pub id: String,
    pub stream: String,
    pub kind: &'static str,
    /// The RTMP URL (stream key hidden) or the recording format.
    pub destination: String,
    /// `api` or `config`.
    pub created_by: &'static str,
    pub state: State,
    pub started_unix_ms: u64,
    pub bytes: u64,
    pub frames: u64,
    /// Frames dropped because the destination could not keep up (or was down).
    pub dropped_frames: u64,
    /// Destination (re)connections after the first.
    pub reconnects: u64,
    /// Times the publisher came back while this egress ran.
    pub publisher_reconnects: u64,
    pub last_error: Option<String>,
    /// Recordings: the file being written (relative to the recording root) and all files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_file: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// Recordings with `[recording.s3]`: how their uploads went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploads: Option<UploadStatus>,
}

/// A recording's uploads to object storage.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UploadStatus {
    /// Files uploaded, and their object keys (the last [`KEYS_SHOWN`]).
    pub uploaded: u64,
    pub keys: Vec<String>,
    /// Files finished and not uploaded yet.
    pub pending: u64,
    /// Attempts that failed (each retried) and files given up on (gone from disk).
    pub failed_attempts: u64,
    pub given_up: u64,
    pub last_error: Option<String>,
}

/// Object keys an [`UploadStatus`] lists at most.
pub const KEYS_SHOWN: usize = 100;

/// One egress's status, shared between its task, its sink and the API; sinks report
/// through it (state, bytes and frames sent, files).
pub struct SharedStatus {
    pub(super) status: Mutex<EgressStatus>,
    live_since: Mutex<Option<std::time::Instant>>,
    metrics: Arc<Metrics>,
}

impl SharedStatus {
    pub(super) fn new(status: EgressStatus, metrics: Arc<Metrics>) -> SharedStatus {
        SharedStatus {
            status: Mutex::new(status),
            live_since: Mutex::new(None),
            metrics,
        }
    }

    pub fn set_state(&self, state: State) {
        self.status.lock().state = state;
        *self.live_since.lock() = (state == State::Live).then(std::time::Instant::now);
    }

    /// How long the current sink has been live.
    pub(super) fn live_for(&self) -> Duration {
        self.live_since
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    /// Counts what a sink wrote.
    pub fn sent(&self, bytes: u64, frames: u64) {
        let mut s = self.status.lock();
        s.bytes += bytes;
        s.frames += frames;
        self.metrics.egress_bytes.inc_by(bytes);
    }

    pub(super) fn error(&self, e: &str) {
        self.status.lock().last_error = Some(e.to_string());
    }

    pub fn file_opened(&self, relative: String) {
        let mut s = self.status.lock();
        s.current_file = Some(relative.clone());
        s.files.push(relative);
    }

    pub fn file_closed(&self) {
        self.status.lock().current_file = None;
    }

    fn uploads(&self) -> parking_lot::MappedMutexGuard<'_, UploadStatus> {
        parking_lot::MutexGuard::map(self.status.lock(), |s| {
            s.uploads.get_or_insert_with(UploadStatus::default)
        })
    }

    /// A finished file was queued for upload.
    pub fn upload_queued(&self) {
        self.uploads().pending += 1;
    }

    /// An upload attempt failed (it will be retried).
    pub fn upload_failed(&self, e: &str) {
        let mut u = self.uploads();
        u.failed_attempts += 1;
        u.last_error = Some(e.to_string());
    }

    /// An upload is over: the object `key` is stored, or the file was given up on.
    pub fn upload_settled(&self, key: &str, outcome: Result<(), String>) {
        let mut u = self.uploads();
        u.pending = u.pending.saturating_sub(1);
        match outcome {
            Ok(()) => {
                u.uploaded += 1;
                if u.keys.len() == KEYS_SHOWN {
                    u.keys.remove(0);
                }
                u.keys.push(key.to_string());
            }
            Err(e) => {
                u.given_up += 1;
                u.last_error = Some(e);
            }
        }
    }

    pub(super) fn snapshot(&self) -> EgressStatus {
        self.status.lock().clone()
    }
}
