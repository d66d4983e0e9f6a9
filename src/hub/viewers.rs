//! Viewer admission under the viewer limits, and the list the admin API shows and kicks
//! from.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;

use super::Hub;
use crate::media::StreamKey;

impl Hub {
    /// Admits a viewer of `key` (RTMP, HTTP-FLV, WHEP) under `limits.max_viewers` and
    /// `limits.max_viewers_per_stream`, or says which limit is reached. Derived streams
    /// (`demo~opus`) count as their original. Internal consumers (egress, bridges, other
    /// nodes' pulls) are not viewers.
    pub fn admit_viewer(
        self: &Arc<Self>,
        key: &StreamKey,
        protocol: &'static str,
        client: std::net::SocketAddr,
    ) -> Result<ViewerTicket, String> {
        let base = key.base();
        let limits = self.limits();
        let ns_max = self
            .namespaces()
            .get(key.namespace())
            .and_then(|n| n.limits.max_viewers);
        let mut v = self.viewers.lock();
        if v.total >= limits.max_viewers {
            return Err(format!(
                "this node is at its viewer limit ({})",
                limits.max_viewers
            ));
        }
        let n = v.per_stream.get(&base).copied().unwrap_or(0);
        if n >= limits.max_viewers_per_stream {
            return Err(format!(
                "{base} is at its viewer limit ({})",
                limits.max_viewers_per_stream
            ));
        }
        let in_ns = v.per_namespace.get(key.namespace()).copied().unwrap_or(0);
        if let Some(max) = ns_max.filter(|max| in_ns >= *max) {
            return Err(format!(
                "namespace {} is at its viewer limit ({max})",
                key.namespace()
            ));
        }
        v.total += 1;
        *v.per_stream.entry(base.clone()).or_insert(0) += 1;
        *v.per_namespace
            .entry(key.namespace().to_string())
            .or_insert(0) += 1;
        let id = rand::random::<u64>() >> 12;
        let kicked = Arc::new(AtomicBool::new(false));
        v.listed.insert(
            id,
            ViewerInfo {
                id: format!("v_{id:013x}"),
                stream: base.to_string(),
                protocol,
                client: client.to_string(),
                since_unix_ms: crate::clock::unix_ms(),
                kicked: kicked.clone(),
            },
        );
        Ok(ViewerTicket {
            hub: Arc::downgrade(self),
            base,
            id,
            kicked,
            on_release: None,
        })
    }

    /// The viewers (RTMP, HTTP-FLV, WHEP) watching now.
    pub fn viewers(&self) -> Vec<ViewerInfo> {
        let mut out: Vec<ViewerInfo> = self.viewers.lock().listed.values().cloned().collect();
        out.sort_by(|a, b| (a.since_unix_ms, &a.id).cmp(&(b.since_unix_ms, &b.id)));
        out
    }

    /// Disconnects viewer `id` (as [`viewers`](Self::viewers) names it): its subscription
    /// ends at its next frame. `false` if there is no such viewer.
    /// Only a viewer whose stream (`ns/name`) `reachable` accepts is kicked.
    pub fn kick_viewer(&self, id: &str, reachable: impl Fn(&str) -> bool) -> bool {
        let v = self.viewers.lock();
        match v
            .listed
            .values()
            .find(|i| i.id == id && reachable(&i.stream))
        {
            Some(info) => {
                info.kicked.store(true, Ordering::Release);
                true
            }
            None => false,
        }
    }
}

/// A viewer admitted under `limits.max_viewers` and `max_viewers_per_stream`, listed for
/// the admin API until it leaves; it gives its place back when dropped (it rides on the
/// viewer's [`Subscription`], so it lives exactly as long as the viewer).
pub struct ViewerTicket {
    pub(super) hub: std::sync::Weak<Hub>,
    pub(super) base: StreamKey,
    pub(super) id: u64,
    pub(super) kicked: Arc<AtomicBool>,
    pub(super) on_release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl ViewerTicket {
    /// Runs `f` when the viewer leaves (the event hook's `stop`).
    pub fn on_release(&mut self, f: impl FnOnce() + Send + Sync + 'static) {
        self.on_release = Some(Box::new(f));
    }
}

impl Drop for ViewerTicket {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            let mut v = hub.viewers.lock();
            v.total = v.total.saturating_sub(1);
            v.listed.remove(&self.id);
            if let Some(n) = v.per_stream.get_mut(&self.base) {
                *n -= 1;
                if *n == 0 {
                    v.per_stream.remove(&self.base);
                }
            }
            if let Some(n) = v.per_namespace.get_mut(self.base.namespace()) {
                *n -= 1;
                if *n == 0 {
                    v.per_namespace.remove(self.base.namespace());
                }
            }
        }
        if let Some(f) = self.on_release.take() {
            f();
        }
    }
}

/// One viewer as the admin API lists it.
#[derive(Clone, Debug, Serialize)]
pub struct ViewerInfo {
    pub id: String,
    pub stream: String,
    pub protocol: &'static str,
    pub client: String,
    pub since_unix_ms: u64,
    #[serde(skip)]
    kicked: Arc<AtomicBool>,
}

/// Viewers admitted, node-wide, per stream and per namespace (derived streams count as their original).
#[derive(Default)]
pub(super) struct ViewerCounts {
    pub(super) total: usize,
    pub(super) per_stream: HashMap<StreamKey, usize>,
    pub(super) per_namespace: HashMap<String, usize>,
    pub(super) listed: HashMap<u64, ViewerInfo>,
}
