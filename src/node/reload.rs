//! Reloading the config without a drop (`SIGHUP`, `POST /api/v1/reload`): the file is read
//! and validated again; an invalid one changes nothing. What can change live is applied in
//! place: auth keys and webhook, limits, namespaces, egress rules and policy, the event
//! hook, the log level, and an edge's origin list. Connections (publishers, viewers,
//! backbone links) are not touched, except an edge's link to an origin that left its list.
//! What needs a restart (listeners, the node's identity, ...) is reported and keeps its
//! running value, so it is reported again until the node restarts.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::reload::{Reload, ReloadFailed, ReloadReport};
use crate::auth::Auth;
use crate::backbone::Backbone;
use crate::config::{Config, Role};
use crate::egress::Egress;
use crate::hub::Hub;

/// Sets the log filter (`log.level`); `Err` says why it was not.
pub type LogLevelSetter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What a reload acts on.
pub struct Reloader {
    pub(super) path: PathBuf,
    /// The config in force: the file's last valid version, with what needs a restart
    /// still at its running value.
    pub(super) running: Mutex<Config>,
    pub(super) hub: Arc<Hub>,
    pub(super) auth: Arc<Auth>,
    pub(super) egress: Arc<Egress>,
    pub(super) backbone: Option<Arc<Backbone>>,
    pub(super) log_level: Option<LogLevelSetter>,
    pub(super) shutdown: CancellationToken,
}

impl Reload for Reloader {
    fn reload(&self) -> Result<ReloadReport, ReloadFailed> {
        let new = Config::load(&self.path).map_err(|e| {
            let problems: Vec<String> = e.to_string().lines().map(str::to_string).collect();
            warn!("reload refused, the running config is kept:\n{e}");
            ReloadFailed {
                error: "the config file is invalid: nothing was applied".into(),
                problems,
            }
        })?;
        let mut running = self.running.lock();
        let (mut next, report) = plan(&running, new);
        self.apply(&running, &mut next, &report)
            .map_err(|e| ReloadFailed {
                error: e,
                problems: vec![],
            })?;
        *running = next;
        info!(
            applied = ?report.applied,
            restart_required = ?report.restart_required,
            "config reloaded"
        );
        Ok(report)
    }
}

impl Reloader {
    /// Applies `next` (already planned against `old`). Auth first: it is the one part that
    /// can still fail (a key file), and then nothing else has changed.
    fn apply(&self, old: &Config, next: &mut Config, report: &ReloadReport) -> Result<(), String> {
        let namespaces = Arc::new(next.namespaces.clone());
        self.auth.reconfigure(&next.auth, &namespaces)?;
        self.hub.reconfigure(next.limits.clone(), namespaces);
        self.egress
            .reconfigure(super::egress_settings(next, self.auth.clone()));
        if old.hooks.events != next.hooks.events {
            let hook = match &next.hooks.events {
                Some(url) => Some(crate::auth::hooks::EventHook::start(
                    url,
                    &next.node.id,
                    self.hub.metrics().hook_counters(),
                    self.shutdown.clone(),
                )?),
                None => None,
            };
            self.auth.set_events(hook);
        }
        if old.backbone.origins != next.backbone.origins {
            if let Some(bb) = &self.backbone {
                bb.set_origins(next.backbone.origins.clone());
            }
        }
        if report.applied.iter().any(|k| k == "log.level") {
            if let Some(set) = &self.log_level {
                if let Err(e) = set(&next.log.level) {
                    warn!("log.level not applied: {e}");
                    next.log.level = old.log.level.clone();
                }
            }
        }
        Ok(())
    }
}

/// What `new` changes against `running`: the config to run (with what needs a restart
/// kept at its running value) and the report. Sans-IO.
pub(super) fn plan(running: &Config, new: Config) -> (Config, ReloadReport) {
    let mut next = new;
    let mut report = ReloadReport::default();
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    // Live: applied in place.
    for (key, changed) in [
        ("auth", differs(&running.auth, &next.auth)),
        ("hooks", differs(&running.hooks, &next.hooks)),
        ("namespaces", differs(&running.namespaces, &next.namespaces)),
        ("egress", differs(&running.egress, &next.egress)),
    ] {
        if changed {
            report.applied.push(key.into());
        }
    }
    // Limits: the hub's apply live; the ones listeners took at start do not.
    let (old_l, new_l) = (&running.limits, &mut next.limits);
    macro_rules! restart_only {
        ($($field:ident),*) => {$(
            if old_l.$field != new_l.$field {
                report.restart_required.push(concat!("limits.", stringify!($field)).into());
                new_l.$field = old_l.$field.clone();
            }
        )*};
    }
    restart_only!(
        max_rtmp_connections,
        viewer_write_timeout,
        viewer_send_buffer_bytes,
        max_webrtc_sessions
    );
    if differs(old_l, new_l) {
        report.applied.push("limits".into());
    }
    if running.log.level != next.log.level {
        if std::env::var_os("RUST_LOG").is_some() {
            report
                .restart_required
                .push("log.level (RUST_LOG is set and overrides it)".into());
            next.log.level = running.log.level.clone();
        } else {
            report.applied.push("log.level".into());
        }
    }
    if running.log.format != next.log.format {
        report.restart_required.push("log.format".into());
        next.log.format = running.log.format;
    }
    // An edge's origins change live; the rest of [backbone] does not.
    let mut backbone = next.backbone.clone();
    backbone.origins = running.backbone.origins.clone();
    if differs(&running.backbone, &backbone) {
        report.restart_required.push("backbone".into());
        let origins = next.backbone.origins.clone();
        next.backbone = running.backbone.clone();
        next.backbone.origins = origins;
    }
    if running.backbone.origins != next.backbone.origins {
        if running.node.role == Role::Edge {
            report.applied.push("backbone.origins".into());
        } else {
            report.restart_required.push("backbone.origins".into());
            next.backbone.origins = running.backbone.origins.clone();
        }
    }
    // Restart only: the node's identity and role, the listeners, WebRTC, recording, rooms.
    macro_rules! restart_section {
        ($($section:ident),*) => {$(
            if differs(&running.$section, &next.$section) {
                report.restart_required.push(stringify!($section).into());
                next.$section = running.$section.clone();
            }
        )*};
    }
    restart_section!(node, rtmp, http, webrtc, recording, rooms);
    (next, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, "t.toml", std::path::Path::new(".")).unwrap()
    }

    #[test]
    fn a_reload_applies_what_is_live_and_keeps_the_rest_running() {
        let edge = "[node]\nrole = \"edge\"\n[backbone]\ntoken = \"0123456789abcdef\"\n";
        let running = parse(&format!(
            "{edge}origins = [\"10.0.0.1:4433\"]\n[limits]\nmax_streams = 10\n"
        ));
        let new = parse(&format!(
            "{edge}origins = [\"10.0.0.2:4433\", \"10.0.0.1:4433\"]\n\
             [limits]\nmax_streams = 20\nmax_rtmp_connections = 7\n\
             [auth]\nsecrets = [\"a-secret-of-some-length\"]\n\
             [rtmp]\nlisten = \"0.0.0.0:1936\"\n\
             [[namespace]]\nname = \"x\"\n"
        ));
        let (next, report) = plan(&running, new);
        assert_eq!(
            report.applied,
            ["auth", "namespaces", "limits", "backbone.origins"]
        );
        assert_eq!(
            report.restart_required,
            ["limits.max_rtmp_connections", "rtmp"]
        );
        // What needs a restart keeps its running value (and is reported again next time).
        assert_eq!(next.rtmp.listen, running.rtmp.listen);
        assert_eq!(
            next.limits.max_rtmp_connections,
            running.limits.max_rtmp_connections
        );
        assert_eq!(next.limits.max_streams, 20);
        assert_eq!(next.backbone.origins.len(), 2);
        // Nothing changed: nothing to say.
        let (_, again) = plan(&next, next.clone());
        assert_eq!(again, ReloadReport::default());
    }

    #[test]
    fn an_origin_keeps_its_peers_and_its_identity_until_restarted() {
        let origin = "[node]\nrole = \"origin\"\nid = \"o1\"\n[backbone]\ntoken = \"0123456789abcdef\"\nlisten = \"127.0.0.1:4433\"\n";
        let running = parse(&format!("{origin}peers = [\"10.0.0.1:4433\"]\n"));
        let new = parse(&format!(
            "{}peers = [\"10.0.0.9:4433\"]\n",
            origin.replace("o1", "o2")
        ));
        let (next, report) = plan(&running, new);
        assert!(report.applied.is_empty(), "{report:?}");
        assert_eq!(report.restart_required, ["backbone", "node"]);
        assert_eq!(next.node.id, "o1");
        assert_eq!(next.backbone.peers, running.backbone.peers);
    }
}
