//! Recordings to object storage (`[recording.s3]`, with the `object_store` crate): every
//! file a recording finishes is uploaded to the bucket under `prefix` + its path below its
//! recording root, then (by default) deleted locally, only once the upload succeeded. A
//! failed upload is retried with exponential backoff (1 s doubling to 60 s) for as long as
//! the node runs; the file waits on disk meanwhile. When local files are deleted after
//! upload, a file found under a recording root at start is one whose upload did not finish
//! (a restart, a crash): it is uploaded then.
//!
//! One upload runs at a time (recordings are written in real time; a segment uploads in a
//! fraction of its length), a file over [`SINGLE_PUT_MAX`] goes up in parts without being
//! read whole into memory, and the queue is bounded ([`MAX_QUEUED`]): past it a file stays
//! on disk, said in the log. Outcomes show in the job's status (`uploads`) and in metrics.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, ObjectStoreExt, RetryConfig, WriteMultipart};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::SharedStatus;
use crate::config::S3Config;
use crate::metrics::Metrics;

/// Files larger than this go up as a multipart upload.
pub const SINGLE_PUT_MAX: u64 = 16 << 20;
/// Uploads waiting at most (a file more stays on disk).
pub const MAX_QUEUED: usize = 10_000;
const PART_BYTES: usize = 8 << 20;
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// One file to upload.
struct Upload {
    path: PathBuf,
    key: String,
    /// The job that wrote it (none: found at start).
    status: Option<Arc<SharedStatus>>,
    failures: u32,
}

/// The node's uploader: a queue and the task draining it.
pub struct Uploader {
    config: S3Config,
    tx: mpsc::Sender<Upload>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploader")
            .field("config", &self.config)
            .finish()
    }
}

impl Uploader {
    /// Connects nothing yet: builds the client and starts the upload task.
    pub fn start(
        config: &S3Config,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Uploader>, String> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            // A few quick retries inside a request; the backoff here does the rest.
            .with_retry(RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(30),
                ..Default::default()
            });
        if let Some(e) = &config.endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        if let (Some(k), Some(s)) = (&config.access_key_id, &config.secret_access_key) {
            b = b.with_access_key_id(k).with_secret_access_key(s);
        }
        let store: Arc<dyn ObjectStore> = Arc::new(b.build().map_err(|e| e.to_string())?);
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        let uploader = Arc::new(Uploader {
            config: config.clone(),
            tx,
            metrics,
        });
        tokio::spawn(uploader.clone().run(store, rx, shutdown));
        Ok(uploader)
    }

    /// Queues `root/relative`, just finished by the job `status` (if any).
    pub fn enqueue(&self, root: &Path, relative: &str, status: Option<Arc<SharedStatus>>) {
        let upload = Upload {
            path: root.join(relative),
            key: format!("{}{relative}", self.config.prefix),
            status,
            failures: 0,
        };
        if let Some(s) = &upload.status {
            s.upload_queued();
        }
        self.metrics.recording_uploads_pending.inc();
        if let Err(e) = self.tx.try_send(upload) {
            let upload = e.into_inner();
            warn!(file = %upload.path.display(), "upload queue full: the file stays on disk");
            self.settle(&upload, Err("the upload queue is full".into()));
        }
    }

    /// Queues every recording under `root` (a recording root at start, when local files
    /// are deleted after upload: what is there was not uploaded).
    pub fn enqueue_leftovers(&self, root: &Path) {
        if !self.config.delete_local {
            return;
        }
        let mut files = match super::retention::recording_files(root) {
            Ok(f) => f,
            Err(e) => {
                warn!(root = %root.display(), "recordings left from before not listed: {e}");
                return;
            }
        };
        files.sort();
        for (path, _, _) in files {
            let Ok(relative) = path.strip_prefix(root) else {
                continue;
            };
            let relative = relative.to_string_lossy();
            info!(file = %relative, "uploading a recording left from before the restart");
            self.enqueue(root, &relative, None);
        }
    }

    async fn run(
        self: Arc<Self>,
        store: Arc<dyn ObjectStore>,
        mut rx: mpsc::Receiver<Upload>,
        shutdown: CancellationToken,
    ) {
        loop {
            let mut upload = tokio::select! {
                _ = shutdown.cancelled() => return,
                u = rx.recv() => match u { Some(u) => u, None => return },
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = put_file(&*store, &upload.path, &upload.key) => r,
            };
            match result {
                Ok(bytes) => {
                    info!(file = %upload.path.display(), key = %upload.key, bytes, "recording uploaded");
                    self.metrics.recording_upload_bytes.inc_by(bytes);
                    if self.config.delete_local {
                        if let Err(e) = std::fs::remove_file(&upload.path) {
                            warn!(file = %upload.path.display(), "uploaded, not deleted: {e}");
                        }
                    }
                    self.settle(&upload, Ok(()));
                }
                Err(UploadError::Gone(e)) => {
                    warn!(file = %upload.path.display(), "not uploaded, the file is gone: {e}");
                    self.settle(&upload, Err(format!("the file is gone: {e}")));
                }
                Err(UploadError::Failed(e)) => {
                    upload.failures += 1;
                    let wait = BACKOFF_MIN
                        .saturating_mul(1 << upload.failures.min(6))
                        .min(BACKOFF_MAX);
                    warn!(file = %upload.path.display(), failures = upload.failures, "upload failed, retrying in {wait:?}: {e}");
                    self.metrics.recording_upload_failures.inc();
                    if let Some(s) = &upload.status {
                        s.upload_failed(&e);
                    }
                    let tx = self.tx.clone();
                    let stop = shutdown.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => { let _ = tx.send(upload).await; }
                            _ = stop.cancelled() => {}
                        }
                    });
                }
            }
        }
    }

    /// An upload is over: uploaded (`Ok`) or given up (`Err`).
    fn settle(&self, upload: &Upload, outcome: Result<(), String>) {
        self.metrics.recording_uploads_pending.dec();
        if outcome.is_ok() {
            self.metrics.recording_uploads.inc();
        }
        if let Some(s) = &upload.status {
            s.upload_settled(&upload.key, outcome);
        }
    }
}

enum UploadError {
    /// The file cannot be read (retention deleted it, ...): not retried.
    Gone(String),
    /// The store refused or could not be reached: retried.
    Failed(String),
}

/// Uploads one file; its size on success.
async fn put_file(store: &dyn ObjectStore, path: &Path, key: &str) -> Result<u64, UploadError> {
    let gone = |e: std::io::Error| UploadError::Gone(e.to_string());
    let failed = |e: object_store::Error| UploadError::Failed(e.to_string());
    let location = object_store::path::Path::from(key);
    let size = tokio::fs::metadata(path).await.map_err(gone)?.len();
    if size <= SINGLE_PUT_MAX {
        let bytes = tokio::fs::read(path).await.map_err(gone)?;
        store.put(&location, bytes.into()).await.map_err(failed)?;
        return Ok(size);
    }
    let mut file = tokio::fs::File::open(path).await.map_err(gone)?;
    let mut writer = WriteMultipart::new_with_chunk_size(
        store.put_multipart(&location).await.map_err(failed)?,
        PART_BYTES,
    );
    let mut buf = vec![0u8; PART_BYTES];
    loop {
        let n = match file.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(gone(e));
            }
        };
        if n == 0 {
            break;
        }
        // At most two parts in flight: memory stays a few parts, whatever the file.
        writer.wait_for_capacity(2).await.map_err(failed)?;
        writer.write(&buf[..n]);
    }
    writer.finish().await.map_err(failed)?;
    Ok(size)
}
