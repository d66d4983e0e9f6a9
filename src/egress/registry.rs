//! The node's egress jobs, as the API and the config see them: [`Egress`] creates them
//! (API requests under the destination policy and the job cap, config rules, an edge's
//! forwards), lists, stops, and starts one `EgressTask` ([`super::task`]) per job.
//!
//! API-created jobs outlive the process: each is written to a state file under the
//! recording root ([`STATE_FILE_PREFIX`]`NODE.json`, replaced atomically on every change) and started again,
//! with its id, when the node starts after a restart or a crash. A resumed recording begins
//! a new file. A job leaves the file when it is deleted or finishes, not when the node
//! shuts down.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::policy;
use super::sink::CLOSE_WAIT;
use super::spec::{self, EgressRequest, EgressSpec, FieldError, StreamMatch, Target};
use super::status::{EgressStatus, SharedStatus, State};
use super::task::EgressTask;
use crate::hub::{Hub, HubEvent};
use crate::media::StreamKey;

/// Where sinks write and how they start.
#[derive(Clone, Debug)]
pub struct EgressSettings {
    /// This node's id (it names the node's egress state file).
    pub node_id: String,
    /// Recordings go under this directory (and the API jobs' state file).
    pub recording_root: PathBuf,
    /// Namespaces whose recordings go elsewhere (`[[namespace]] recording_root`).
    pub namespace_roots: HashMap<String, PathBuf>,
    /// Static rules from the config file.
    pub rules: Vec<EgressSpec>,
    /// Where API-created pushes may go.
    pub policy: Arc<policy::DestinationPolicy>,
    /// API-created and rule egress at most.
    pub max_jobs: usize,
    /// Signs the tokens an edge's forwards present to origins.
    pub auth: Arc<crate::auth::Auth>,
    /// Recordings stop when the disk holding them has less free space than this.
    pub min_free_bytes: u64,
    /// Where finished recording files are uploaded (`[recording.s3]`); kept across reloads.
    pub uploader: Option<Arc<super::upload::Uploader>>,
}

impl EgressSettings {
    /// Where recordings of `namespace`'s streams go.
    pub fn root_for(&self, namespace: &str) -> &PathBuf {
        self.namespace_roots
            .get(namespace)
            .unwrap_or(&self.recording_root)
    }
}

/// The API jobs' state file, under the recording root: `.egress-state-NODE.json` (nodes
/// sharing a root keep theirs apart).
pub const STATE_FILE_PREFIX: &str = ".egress-state-";

/// Why an egress was not created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// Fields of the request are invalid (400).
    #[error("invalid request ({} fields)", .0.len())]
    Invalid(Vec<FieldError>),
    /// The destination policy refuses it (403).
    #[error("destination refused: {0}")]
    Forbidden(String),
    /// `max_jobs` egress already run (429).
    #[error("at most {0} egress jobs may run")]
    TooMany(usize),
}

struct Entry {
    shared: Arc<SharedStatus>,
    cancel: CancellationToken,
    done: tokio::sync::watch::Receiver<bool>,
}

/// Every egress of this node.
pub struct Egress {
    hub: Arc<Hub>,
    /// Replaced whole on a reload ([`Egress::reconfigure`]).
    settings: parking_lot::RwLock<Arc<EgressSettings>>,
    /// Wakes the rules task when the rules change.
    rules_changed: tokio::sync::Notify,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    /// The API jobs to resume after a restart, by id (what the state file holds).
    persisted: Mutex<std::collections::BTreeMap<String, EgressRequest>>,
    shutdown: CancellationToken,
}

impl Egress {
    /// Starts the manager and the config rules.
    pub fn start(
        hub: Arc<Hub>,
        settings: EgressSettings,
        shutdown: CancellationToken,
    ) -> Arc<Egress> {
        let egress = Arc::new(Egress {
            hub,
            settings: parking_lot::RwLock::new(Arc::new(settings)),
            rules_changed: tokio::sync::Notify::new(),
            entries: Mutex::new(HashMap::new()),
            persisted: Mutex::new(Default::default()),
            shutdown,
        });
        let settings = egress.settings();
        if let Some(u) = &settings.uploader {
            // Before any job writes: what is under a root now is left from before.
            let mut roots: Vec<&PathBuf> = settings.namespace_roots.values().collect();
            roots.push(&settings.recording_root);
            roots.sort();
            roots.dedup();
            for root in roots {
                u.enqueue_leftovers(root);
            }
        }
        tokio::spawn(egress.clone().run_rules());
        egress.resume();
        egress
    }

    fn settings(&self) -> Arc<EgressSettings> {
        self.settings.read().clone()
    }

    /// Applies new settings (a reload): rules, namespace roots, the destination policy and
    /// the job cap. Jobs of rules no longer configured stop; new rules start for the
    /// streams they match. Running API jobs carry on under the policy they were created
    /// with. The recording root of the state file stays the one the node started with.
    pub fn reconfigure(&self, mut settings: EgressSettings) {
        let mut current = self.settings.write();
        settings.recording_root = current.recording_root.clone();
        settings.node_id = current.node_id.clone();
        settings.uploader = current.uploader.clone();
        *current = Arc::new(settings);
        drop(current);
        self.rules_changed.notify_one();
    }

    fn state_path(&self) -> PathBuf {
        let settings = self.settings();
        settings
            .recording_root
            .join(format!("{STATE_FILE_PREFIX}{}.json", settings.node_id))
    }

    /// Starts the API jobs the state file lists again, with their ids.
    fn resume(self: &Arc<Self>) {
        let path = self.state_path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return;
        };
        let saved: std::collections::BTreeMap<String, EgressRequest> =
            match serde_json::from_str(&text) {
                Ok(s) => s,
                Err(e) => {
                    warn!(path = %path.display(), "egress state not read: {e}");
                    return;
                }
            };
        for (id, req) in saved {
            let valid = id.starts_with("eg_") && id.len() <= 32;
            match req.validate(false) {
                Ok(spec) if valid => {
                    info!(%id, stream = %req.stream, "egress resumed after a restart");
                    self.persisted.lock().insert(id.clone(), req);
                    self.spawn_as(id, spec, "api");
                }
                _ => warn!(%id, "egress in the state file not resumed: invalid"),
            }
        }
        self.save();
    }

    /// Writes the state file: to a temporary file first, then renamed over the old one,
    /// so a crash leaves one or the other whole.
    fn save(&self) {
        let text = match serde_json::to_string_pretty(&*self.persisted.lock()) {
            Ok(t) => t,
            Err(e) => {
                warn!("egress state not written: {e}");
                return;
            }
        };
        let path = self.state_path();
        let tmp = path.with_extension("json.tmp");
        let written = std::fs::create_dir_all(&self.settings().recording_root)
            .and_then(|_| {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            warn!(path = %path.display(), "egress state not written: {e}");
        }
    }

    /// A job is over for good (deleted, or finished): it is not resumed.
    fn forget(&self, id: &str) {
        if self.persisted.lock().remove(id).is_some() {
            self.save();
        }
    }

    /// Starts an egress from an API request, under the destination policy and the job cap.
    pub async fn create(
        self: &Arc<Self>,
        req: &EgressRequest,
    ) -> Result<EgressStatus, CreateError> {
        let spec = req.validate(false).map_err(CreateError::Invalid)?;
        let jobs = self
            .entries
            .lock()
            .values()
            .filter(|e| e.shared.status.lock().created_by != "forward")
            .count();
        let settings = self.settings();
        if jobs >= settings.max_jobs {
            return Err(CreateError::TooMany(settings.max_jobs));
        }
        if let Target::Rtmp(url) = &spec.target {
            let policy = &settings.policy;
            let refused = |e: policy::PolicyError| CreateError::Forbidden(e.to_string());
            policy.check_url(url).map_err(refused)?;
            let parsed = spec::RtmpUrl::parse(url).map_err(CreateError::Forbidden)?;
            policy
                .resolve(&parsed.host, parsed.port)
                .await
                .map_err(refused)?;
        }
        let status = self.spawn(spec, "api");
        self.persisted.lock().insert(status.id.clone(), req.clone());
        self.save();
        Ok(status)
    }

    /// Starts an edge's forward of a local publish to an origin: a cluster-internal push
    /// that the destination policy does not apply to (origins are often on private
    /// addresses) and that does not count against `max_jobs`.
    ///
    /// Under `[auth]` the push presents a publish token for exactly this stream, signed with
    /// the first secret of the stream's namespace, else of the node (a day long: a forward
    /// lives as long as its publish).
    pub fn create_forward(
        self: &Arc<Self>,
        req: &EgressRequest,
    ) -> Result<EgressStatus, Vec<FieldError>> {
        let mut req = req.clone();
        let namespace = req.stream.split_once('/').map_or("", |(ns, _)| ns);
        let keys = self.settings().auth.keys_for(namespace);
        if let (Some(keys), Some(url)) = (keys, req.url.as_mut()) {
            let claims = crate::auth::Claims {
                act: crate::auth::token::OneOrMany::One(crate::auth::Action::Publish),
                streams: vec![req.stream.clone()],
                exp: crate::auth::token::now_s() + 86_400,
                nbf: None,
                iat: Some(crate::auth::token::now_s()),
                sub: Some("edge-forward".into()),
                room: None,
                name: None,
                ns: None,
            };
            match keys.mint(&claims) {
                Ok(t) => url.push_str(&format!("?token={t}")),
                Err(e) => warn!("cannot sign a forward's token: {e}"),
            }
        }
        let spec = req.validate(false)?;
        Ok(self.spawn(spec, "forward"))
    }

    pub fn list(&self) -> Vec<EgressStatus> {
        let mut v: Vec<_> = self
            .entries
            .lock()
            .values()
            .map(|e| e.shared.snapshot())
            .collect();
        v.sort_by(|a, b| (a.started_unix_ms, &a.id).cmp(&(b.started_unix_ms, &b.id)));
        v
    }

    pub fn get(&self, id: &str) -> Option<EgressStatus> {
        self.entries.lock().get(id).map(|e| e.shared.snapshot())
    }

    /// Stops an egress, waits (briefly) for its sink to close cleanly, and returns its last
    /// status.
    pub async fn stop(&self, id: &str) -> Option<EgressStatus> {
        self.forget(id);
        self.end(id).await
    }

    async fn end(&self, id: &str) -> Option<EgressStatus> {
        let entry = self.entries.lock().remove(id)?;
        entry.cancel.cancel();
        let mut done = entry.done.clone();
        let _ = tokio::time::timeout(CLOSE_WAIT, done.wait_for(|d| *d)).await;
        Some(entry.shared.snapshot())
    }

    /// Stops every egress (files finished, publishes ended), waiting a few seconds at most.
    /// API jobs stay in the state file: they start again with the node.
    pub async fn stop_all(&self) {
        let ids: Vec<String> = self.entries.lock().keys().cloned().collect();
        futures_util::future::join_all(ids.iter().map(|id| self.end(id))).await;
    }

    fn spawn(self: &Arc<Self>, spec: EgressSpec, created_by: &'static str) -> EgressStatus {
        let id = format!("eg_{:012x}", rand::random::<u64>() >> 16);
        self.spawn_as(id, spec, created_by)
    }

    fn spawn_as(
        self: &Arc<Self>,
        id: String,
        spec: EgressSpec,
        created_by: &'static str,
    ) -> EgressStatus {
        let StreamMatch::Exact(key) = spec.stream.clone() else {
            unreachable!("egresses are spawned for one stream");
        };
        let destination = match &spec.target {
            Target::Rtmp(url) => spec::RtmpUrl::parse(url)
                .map(|u| u.redacted())
                .unwrap_or_default(),
            Target::Record { format, .. } => format.extension().to_string(),
        };
        let shared = Arc::new(SharedStatus::new(
            EgressStatus {
                id: id.clone(),
                stream: key.to_string(),
                kind: spec.kind(),
                destination,
                created_by,
                state: State::Waiting,
                started_unix_ms: crate::clock::unix_ms(),
                bytes: 0,
                frames: 0,
                dropped_frames: 0,
                reconnects: 0,
                publisher_reconnects: 0,
                last_error: None,
                current_file: None,
                files: vec![],
                uploads: None,
            },
            self.hub.metrics().clone(),
        ));
        let cancel = self.shutdown.child_token();
        let (done_tx, done) = tokio::sync::watch::channel(false);
        let entry = Arc::new(Entry {
            shared: shared.clone(),
            cancel: cancel.clone(),
            done,
        });
        self.entries.lock().insert(id.clone(), entry);
        let status = shared.snapshot();
        let me = self.clone();
        let task_ns = key.namespace().to_string();
        let span = tracing::info_span!("egress", %id, stream = %key, kind = spec.kind());
        tokio::spawn(
            async move {
                me.hub.metrics().egress_active.inc();
                let settings = me.settings();
                let task = EgressTask {
                    hub: me.hub.clone(),
                    key,
                    spec,
                    shared: shared.clone(),
                    cancel,
                    recording_root: settings.root_for(task_ns.as_str()).clone(),
                    min_free_bytes: settings.min_free_bytes,
                    uploader: settings.uploader.clone(),
                    policy: (created_by == "api").then(|| settings.policy.clone()),
                };
                let end = task.run().await;
                shared.set_state(end);
                me.hub.metrics().egress_active.dec();
                info!(state = ?end, "egress ended");
                let _ = done_tx.send(true);
                // Finished on its own (not ended from here): over for good. One ended by
                // `stop_all` at shutdown stays in the state file.
                if end == State::Finished && me.entries.lock().remove(&id).is_some() {
                    me.forget(&id);
                }
            }
            .instrument(span),
        );
        status
    }

    /// Starts rule egresses: exact-name rules at once (they wait for their stream, pulling
    /// it on an edge), pattern rules whenever a matching stream is published on this node.
    /// When the rules change (a reload), the jobs of rules that are gone stop and the new
    /// rules start.
    async fn run_rules(self: Arc<Self>) {
        let mut events = self.hub.events();
        // A rule is known by what it says; a job by its rule and its stream.
        let mut running: HashMap<(String, StreamKey), String> = HashMap::new();
        let mut rules: Vec<(String, EgressSpec)> = Vec::new();
        let mut pending: Vec<StreamKey> = Vec::new();
        let mut reread = true;
        loop {
            if std::mem::take(&mut reread) {
                rules = self
                    .settings()
                    .rules
                    .iter()
                    .map(|r| (format!("{r:?}"), r.clone()))
                    .collect();
                running.retain(|(rule, _), id| {
                    let kept = rules.iter().any(|(r, _)| r == rule);
                    if !kept {
                        let (me, id) = (self.clone(), id.clone());
                        info!(egress = %id, "its rule is gone: stopping");
                        tokio::spawn(async move { me.end(&id).await });
                    }
                    kept
                });
                for (rule, spec) in &rules {
                    if let StreamMatch::Exact(key) = &spec.stream {
                        self.start_rule(&mut running, rule, spec, key);
                    }
                }
                pending = self.hub.local_streams();
            }
            // Simulcast layers are parts of a stream, not streams a rule should take.
            for key in pending.drain(..).filter(|k| !k.is_derived()) {
                for (rule, spec) in &rules {
                    if matches!(spec.stream, StreamMatch::Pattern { .. })
                        && spec.stream.matches(&key)
                    {
                        self.start_rule(&mut running, rule, spec, &key);
                    }
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.rules_changed.notified() => reread = true,
                ev = events.recv() => match ev {
                    Ok(HubEvent::Published(key)) => pending.push(key),
                    Ok(HubEvent::Unpublished(_)) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => pending = self.hub.local_streams(),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    /// Starts rule `rule`'s job for `key` unless one runs (a job still running means the
    /// publisher came back within its wait). Finished jobs are forgotten first.
    fn start_rule(
        self: &Arc<Self>,
        running: &mut HashMap<(String, StreamKey), String>,
        rule: &str,
        spec: &EgressSpec,
        key: &StreamKey,
    ) {
        running.retain(|_, id| self.entries.lock().contains_key(id));
        let slot = (rule.to_string(), key.clone());
        if running.contains_key(&slot) {
            return;
        }
        let status = self.spawn(spec.for_stream(key), "config");
        running.insert(slot, status.id);
    }
}
