//! Builds a node from its config: binds the listeners its role needs, wires the hub to the
//! backbone, and runs until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::http::{AppState, NodeInfo};
use crate::backbone::{Backbone, BackboneSettings, NodeIdentity};
use crate::config::{Config, Role};
use crate::egress::{Egress, EgressSettings};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::rtmp::RtmpSettings;

mod reload;

pub use reload::{LogLevelSetter, Reloader};

/// How `meshcast run` starts a node beyond its config.
#[derive(Default)]
pub struct NodeOptions {
    /// The file the config came from: `SIGHUP` and `POST /api/v1/reload` re-read it.
    pub config_path: Option<std::path::PathBuf>,
    /// Changes the log filter on a reload of `log.level`.
    pub log_level: Option<LogLevelSetter>,
}

/// What the backbone takes from the config, and this node's load meter.
pub fn backbone_settings(config: &Config, metrics: Arc<Metrics>) -> BackboneSettings {
    let load = crate::cluster::load::LoadMeter::new(
        metrics,
        config.node.max_viewers,
        std::time::Instant::now(),
    );
    BackboneSettings {
        config: config.backbone.clone(),
        node: NodeIdentity {
            id: config.node.id.clone(),
            role: config.node.role,
            region: config.node.region.clone(),
            http_url: config.public_http_url(),
            rtmp_url: config.public_rtmp_url(),
        },
        write_timeout: config.limits.viewer_write_timeout,
        load: load.into_probe(),
    }
}

/// What egress takes from the config (at start, and on a reload).
fn egress_settings(config: &Config, auth: Arc<crate::auth::Auth>) -> EgressSettings {
    EgressSettings {
        node_id: config.node.id.clone(),
        recording_root: config.recording.root.clone(),
        namespace_roots: namespace_roots(config),
        rules: egress_rules(config),
        policy: Arc::new(crate::egress::policy::DestinationPolicy {
            patterns: config.egress.policy.destinations.clone(),
            public_only: config.auth.is_on()
                && config.egress.policy.destinations.is_empty()
                && !config.egress.policy.allow_private_destinations,
            own: own_addresses(config),
        }),
        max_jobs: config.egress.policy.max_jobs,
        auth,
        min_free_bytes: config.recording.min_free_bytes,
        uploader: None,
    }
}

/// The namespaces that record under a root of their own.
fn namespace_roots(config: &Config) -> std::collections::HashMap<String, std::path::PathBuf> {
    config
        .namespaces
        .declared
        .values()
        .filter_map(|n| Some((n.name.clone(), n.recording_root.clone()?)))
        .collect()
}

/// The egress rules: `[[egress]]`'s, then every namespace's.
fn egress_rules(config: &Config) -> Vec<crate::config::egress_spec::EgressSpec> {
    let mut rules = config.egress.rules.clone();
    rules.extend(config.namespaces.egress_rules().cloned());
    rules
}

/// This node's own addresses as the config names them (listeners and announced IPs).
fn own_addresses(config: &Config) -> Vec<std::net::IpAddr> {
    let mut ips: Vec<std::net::IpAddr> = [
        config.rtmp.listen,
        config.http.listen,
        config.backbone.listen,
        config.webrtc.listen,
    ]
    .into_iter()
    .flatten()
    .map(|a| a.ip())
    .chain(config.webrtc.announce_ips.iter().copied())
    .filter(|ip| !ip.is_unspecified())
    .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// A running node.
pub struct Node {
    pub hub: Arc<Hub>,
    pub rtmp_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub backbone_addr: Option<SocketAddr>,
    backbone: Option<Arc<Backbone>>,
    pub egress: Arc<Egress>,
    reloader: Option<Arc<Reloader>>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Node {
    /// Binds every listener and starts serving. Fails if a listener cannot be bound.
    pub async fn start(config: Config) -> anyhow::Result<Node> {
        Node::start_with(config, NodeOptions::default()).await
    }

    /// As [`Node::start`], able to reload its config file when `options` names it.
    pub async fn start_with(config: Config, options: NodeOptions) -> anyhow::Result<Node> {
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::new(config.limits.clone(), metrics);
        let namespaces = Arc::new(config.namespaces.clone());
        hub.reconfigure(config.limits.clone(), namespaces.clone());
        let rooms = crate::rooms::Rooms::new(&config.node.id, config.rooms.clone(), hub.clone());
        // WebRTC renditions are made where their stream is published; a room's mix where it
        // is asked for.
        hub.set_deriver(Arc::new(Derivers(vec![
            Arc::new(crate::bridge::Renditions),
            Arc::new(crate::rooms::mix::MixDeriver(Arc::downgrade(&rooms))),
        ])));
        let mut tasks = JoinSet::new();

        let events = match &config.hooks.events {
            Some(url) => Some(
                crate::auth::hooks::EventHook::start(
                    url,
                    &config.node.id,
                    hub.metrics().hook_counters(),
                    shutdown.clone(),
                )
                .map_err(anyhow::Error::msg)
                .context("starting the event hook")?,
            ),
            None => None,
        };
        let auth = crate::auth::Auth::open(&config.node.id);
        auth.reconfigure(&config.auth, &namespaces)
            .map_err(anyhow::Error::msg)
            .context("loading [auth] keys")?;
        auth.set_events(events);
        let auth = Arc::new(auth);
        if auth.is_on() {
            info!("auth is on: publish and play need a token or the webhook's allow; the admin API needs an admin token");
        } else {
            tracing::warn!("no [auth]: anyone who reaches this node may publish and play; the admin API answers loopback clients only");
        }

        let backbone = if config.backbone.listen.is_some()
            || !config.backbone.peers.is_empty()
            || !config.backbone.origins.is_empty()
        {
            let bb = Backbone::start(
                backbone_settings(&config, hub.metrics().clone()),
                hub.clone(),
                shutdown.clone(),
            )
            .context("starting the backbone")?;
            hub.set_upstream(bb.clone());
            Some(bb)
        } else {
            None
        };
        let backbone_addr = match (&backbone, config.backbone.listen) {
            (Some(bb), Some(_)) => Some(bb.local_addr()?),
            _ => None,
        };

        let mut settings = egress_settings(&config, auth.clone());
        if let Some(s3) = &config.recording.s3 {
            settings.uploader = Some(
                crate::egress::upload::Uploader::start(s3, hub.metrics().clone(), shutdown.clone())
                    .map_err(anyhow::Error::msg)
                    .context("starting the recording uploader ([recording.s3])")?,
            );
        }
        let egress = Egress::start(hub.clone(), settings, shutdown.clone());

        let retention = &config.recording.retention;
        if retention.max_age.is_some() || retention.max_total_bytes.is_some() {
            let mut roots: Vec<_> = namespace_roots(&config).into_values().collect();
            roots.push(config.recording.root.clone());
            roots.sort();
            roots.dedup();
            for root in roots {
                tasks.spawn(crate::egress::retention::run(
                    root,
                    retention.clone(),
                    egress.clone(),
                    shutdown.clone(),
                ));
            }
        }

        if config.node.role == Role::Edge {
            if let Some(bb) = &backbone {
                tasks.spawn(crate::cluster::forward::run(
                    hub.clone(),
                    bb.clone(),
                    egress.clone(),
                    config.node.region.clone(),
                    shutdown.clone(),
                ));
            }
        }

        let mut rtmp_addr = None;
        if let Some(addr) = config.rtmp.listen {
            let listener = crate::net::bind_listener(addr)
                .with_context(|| format!("binding RTMP listener {addr}"))?;
            rtmp_addr = Some(listener.local_addr()?);
            let settings = RtmpSettings {
                chunk_size: config.rtmp.chunk_size,
                write_timeout: config.limits.viewer_write_timeout,
                max_connections: config.limits.max_rtmp_connections,
                send_buffer: config.limits.viewer_send_buffer_bytes,
                merged_write: config.rtmp.merged_write,
                guard: crate::rtmp::guard::GuardLimits {
                    max_media_message: config.rtmp.max_message_bytes,
                    ..Default::default()
                },
                idle_timeout: config.rtmp.idle_timeout,
                auth: auth.clone(),
            };
            tasks.spawn(crate::rtmp::serve(
                listener,
                hub.clone(),
                settings,
                shutdown.clone(),
            ));
        }

        let webrtc = match config.webrtc.listen {
            Some(listen) => {
                let candidates = config
                    .webrtc
                    .announce_ips
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, listen.port()))
                    .collect();
                let settings = crate::webrtc::WebRtcSettings {
                    listen,
                    candidates,
                    ice_servers: config.webrtc.ice_servers.clone(),
                    tcp: config.webrtc.tcp,
                    max_sessions: config.limits.max_webrtc_sessions,
                    bframes: config.webrtc.bframes,
                };
                Some(
                    crate::webrtc::WebRtc::start(settings, hub.metrics(), shutdown.clone())
                        .await
                        .with_context(|| format!("binding WebRTC socket {listen} (UDP, TCP)"))?,
                )
            }
            None => None,
        };
        let webrtc_addr = webrtc.as_ref().map(|w| w.local_addr());

        if let Some(bb) = &backbone {
            rooms.attach(bb.clone(), config.node.role);
        }
        rooms.start(shutdown.clone());

        let reloader = options.config_path.map(|path| {
            Arc::new(Reloader {
                path,
                running: parking_lot::Mutex::new(config.clone()),
                hub: hub.clone(),
                auth: auth.clone(),
                egress: egress.clone(),
                backbone: backbone.clone(),
                log_level: options.log_level,
                shutdown: shutdown.clone(),
            })
        });

        let mut http_addr = None;
        if let Some(addr) = config.http.listen {
            let listener = crate::net::bind_listener(addr)
                .with_context(|| format!("binding HTTP listener {addr}"))?;
            http_addr = Some(listener.local_addr()?);
            let state = AppState {
                hub: hub.clone(),
                node: NodeInfo {
                    id: config.node.id.clone(),
                    region: config.node.region.clone(),
                    role: config.node.role,
                    version: env!("CARGO_PKG_VERSION"),
                },
                backbone: backbone.clone(),
                webrtc: webrtc.clone(),
                egress: egress.clone(),
                auth: auth.clone(),
                rooms: rooms.clone(),
                reload: reloader
                    .clone()
                    .map(|r| r as Arc<dyn crate::api::reload::Reload>),
            };
            let limits = crate::api::http::HttpLimits {
                max_connections: config.http.max_connections,
                header_timeout: config.http.header_timeout,
                idle_timeout: config.http.idle_timeout,
            };
            tasks.spawn(crate::api::http::serve(
                listener,
                state,
                limits,
                shutdown.clone(),
            ));
        }

        info!(
            id = %config.node.id,
            role = config.node.role.as_str(),
            region = %config.node.region,
            rtmp = ?rtmp_addr,
            http = ?http_addr,
            backbone = ?backbone_addr,
            webrtc = ?webrtc_addr,
            "meshcast node started"
        );
        Ok(Node {
            hub,
            rtmp_addr,
            http_addr,
            backbone_addr,
            backbone,
            egress,
            reloader,
            shutdown,
            tasks,
        })
    }

    /// Re-reads the config file and applies what can change live (`SIGHUP`); `None` when
    /// the node was started without a file.
    pub fn reload(
        &self,
    ) -> Option<Result<crate::api::reload::ReloadReport, crate::api::reload::ReloadFailed>> {
        use crate::api::reload::Reload;
        self.reloader.as_ref().map(|r| r.reload())
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, closes connections and links, and waits (briefly) for tasks to end.
    pub async fn shutdown(mut self) {
        // Recordings and pushes first, so files end cleanly while the stream still exists.
        self.egress.stop_all().await;
        self.shutdown.cancel();
        if let Some(bb) = &self.backbone {
            bb.close().await;
        }
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(3), drain)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
        info!("meshcast node stopped");
    }
}

/// The node's derivers, asked in turn: the first that makes a name makes it.
struct Derivers(Vec<Arc<dyn crate::hub::Deriver>>);

impl crate::hub::Deriver for Derivers {
    fn derives(
        &self,
        key: &crate::media::StreamKey,
        base_is_local: bool,
    ) -> Option<crate::hub::Source> {
        self.0.iter().find_map(|d| d.derives(key, base_is_local))
    }

    fn start(&self, hub: Arc<Hub>, publisher: crate::hub::Publisher) {
        // The one that claimed it: a mix claims only `room/...~mix.*`, a rendition only `~webrtc`.
        let key = publisher.key().clone();
        if let Some(d) = self.0.iter().find(|d| d.derives(&key, true).is_some()) {
            d.start(hub, publisher);
        }
    }
}
