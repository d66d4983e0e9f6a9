//! An edge takes RTMP publishers and forwards each publish to an origin.
//!
//! Edges hold no publishes of their own in the mesh (only origins announce), so a stream
//! published to an edge is pushed on to the best origin for the edge's region (route API
//! ranking: nearest by measured RTT, then least loaded), as an RTMP egress. The origin
//! publishes it to the cluster; viewers on this edge are served from the local publish.
//! When that origin leaves the node table (it died), the push moves to the next best; when
//! the origin refuses the name (another origin holds it), the publisher is evicted with the
//! origin's reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Egress, EgressRequest, State};
use crate::backbone::nodes::{rank, Action};
use crate::backbone::Backbone;
use crate::hub::{Hub, HubEvent};
use crate::media::StreamKey;

/// How often forwards are checked (origin still there, destination still taking it).
const CHECK: Duration = Duration::from_secs(1);

struct Forward {
    egress_id: String,
    origin: String,
}

/// Runs until `shutdown`: forwards every local publish on this edge to an origin.
pub async fn run(
    hub: Arc<Hub>,
    backbone: Arc<Backbone>,
    egress: Arc<Egress>,
    region: String,
    shutdown: CancellationToken,
) {
    let mut events = hub.events();
    let mut forwards: HashMap<StreamKey, Forward> = HashMap::new();
    let mut tick = tokio::time::interval(CHECK);
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(HubEvent::Published(key)) => {
                    if let Some(f) = start(&backbone, &egress, &region, &key, None) {
                        forwards.insert(key, f);
                    }
                }
                Ok(HubEvent::Unpublished(key)) => {
                    if let Some(f) = forwards.remove(&key) {
                        egress.stop(&f.egress_id).await;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            },
            _ = tick.tick() => {
                let live: Vec<String> = backbone.node_records().into_iter().map(|r| r.node).collect();
                let keys: Vec<StreamKey> = forwards.keys().cloned().collect();
                for key in keys {
                    let f = &forwards[&key];
                    let status = egress.get(&f.egress_id);
                    let error = status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_default();
                    if error.contains("is already") || error.contains("publish race") {
                        warn!(stream = %key, origin = %f.origin, "origin refused the forwarded publish: {error}");
                        hub.evict(&key, &error);
                        continue;
                    }
                    let stuck = status.is_some_and(|s| s.state != State::Live);
                    if live.contains(&f.origin) && !stuck {
                        continue;
                    }
                    if live.contains(&f.origin) {
                        // Still listed but not taking it: try another only if one exists.
                        if best_origin(&backbone, &region, &key, Some(&f.origin)).is_none() {
                            continue;
                        }
                    }
                    let old = forwards.remove(&key).expect("listed");
                    egress.stop(&old.egress_id).await;
                    info!(stream = %key, from = %old.origin, "forward moves to another origin");
                    if let Some(f) = start(&backbone, &egress, &region, &key, Some(&old.origin)) {
                        forwards.insert(key, f);
                    }
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The best origin for publishing `key` from `region` (not `except`): (node id, RTMP URL).
fn best_origin(
    backbone: &Backbone,
    region: &str,
    key: &StreamKey,
    except: Option<&str>,
) -> Option<(String, String)> {
    rank(&backbone.node_records(), key, region, Action::Publish)
        .into_iter()
        .find(|c| Some(c.node.as_str()) != except && !c.rtmp_url.is_empty())
        .map(|c| (c.node, c.rtmp_url))
}

fn start(
    backbone: &Backbone,
    egress: &Arc<Egress>,
    region: &str,
    key: &StreamKey,
    except: Option<&str>,
) -> Option<Forward> {
    let Some((origin, rtmp)) = best_origin(backbone, region, key, except) else {
        warn!(stream = %key, "no origin to forward the publish to");
        return None;
    };
    let req = EgressRequest {
        stream: key.to_string(),
        kind: "rtmp".into(),
        url: Some(format!("{rtmp}/{}/{}", key.namespace(), key.name())),
        ..Default::default()
    };
    match egress.create(&req) {
        Ok(status) => {
            info!(stream = %key, %origin, "forwarding the publish to an origin");
            Some(Forward {
                egress_id: status.id,
                origin,
            })
        }
        Err(e) => {
            warn!(stream = %key, "cannot forward: {e:?}");
            None
        }
    }
}
