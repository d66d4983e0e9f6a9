//! An edge takes RTMP publishers and forwards each publish to an origin.
//!
//! Edges hold no publishes of their own in the mesh (only origins announce), so a stream
//! published to an edge is pushed on to the best origin for the edge's region (route API
//! ranking: nearest by measured RTT, then least loaded), as an RTMP egress. The origin
//! publishes it to the cluster; viewers on this edge are served from the local publish.
//! When that origin leaves the node table (it died), the push moves to the next best; when
//! the origin refuses the name (another origin holds it), the publisher is evicted with the
//! origin's reason.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backbone::Backbone;
use crate::cluster::route::{rank, Action};
use crate::egress::{Egress, EgressRequest, State};
use crate::hub::{Hub, HubEvent};
use crate::media::StreamKey;

/// How often forwards are checked (origin still there, destination still taking it).
const CHECK: Duration = Duration::from_secs(1);
/// A forward that has not gone live within this time (still connecting) is moved to
/// another origin if there is one. Long enough for a cross-region
/// connect plus the origin's check that no live origin holds the name.
const STUCK_AFTER: Duration = Duration::from_secs(5);

/// One local publish and where it goes.
#[derive(Default)]
struct Forward {
    /// The egress pushing it and its origin; `None` while no origin could be found.
    push: Option<Push>,
    /// A "no origin" warning was logged for this publish (said once, not every tick).
    warned: bool,
    /// The origin refused the name and the publisher was told to stop.
    evicted: bool,
}

struct Push {
    egress_id: String,
    origin: String,
    /// When this push was started or last seen live.
    live_at: Instant,
}

/// Runs until `shutdown`: forwards every local publish on this edge to an origin.
///
/// Every local publish has an entry for as long as it lasts: a publish with no origin to
/// go to is retried each tick, and a push is only replaced when another origin can take it
/// (an egress retries its own destination with backoff meanwhile), so a blip that empties
/// the node table does not end forwarding.
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
    let stop = |f: Forward| {
        if let Some(p) = f.push {
            let egress = egress.clone();
            // Stopping waits for the sink to close (up to seconds against a dead origin):
            // never hold up the other forwards for it.
            tokio::spawn(async move { egress.stop(&p.egress_id).await });
        }
    };
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(HubEvent::Published(key)) => {
                    // A new session of a name already forwarded replaces the old push.
                    if let Some(old) = forwards.remove(&key) {
                        stop(old);
                    }
                    let mut f = Forward::default();
                    start(&backbone, &egress, &region, &key, None, &mut f);
                    forwards.insert(key, f);
                }
                Ok(HubEvent::Unpublished(key)) => {
                    if let Some(f) = forwards.remove(&key) {
                        stop(f);
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    // Events were missed: make the forwards match the local publishes.
                    let local: HashSet<StreamKey> = hub.local_streams().into_iter().collect();
                    forwards.retain(|k, f| {
                        let keep = local.contains(k);
                        if !keep {
                            stop(std::mem::take(f));
                        }
                        keep
                    });
                    for key in local {
                        forwards.entry(key).or_default();
                    }
                }
                Err(RecvError::Closed) => return,
            },
            _ = tick.tick() => {
                let live: HashSet<String> =
                    backbone.node_records().into_iter().map(|r| r.node).collect();
                let keys: Vec<StreamKey> = forwards.keys().cloned().collect();
                for key in keys {
                    let f = forwards.get_mut(&key).expect("listed");
                    check(&hub, &backbone, &egress, &region, &key, &live, f, &stop);
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One tick of one forward: start it if it has no push, evict the publisher if the origin
/// refused the name, move it if its origin is gone or it is stuck and another origin exists.
#[allow(clippy::too_many_arguments)]
fn check(
    hub: &Hub,
    backbone: &Backbone,
    egress: &Arc<Egress>,
    region: &str,
    key: &StreamKey,
    live: &HashSet<String>,
    f: &mut Forward,
    stop: &impl Fn(Forward),
) {
    if f.evicted {
        return;
    }
    let Some(push) = f.push.as_mut() else {
        start(backbone, egress, region, key, None, f);
        return;
    };
    let status = egress.get(&push.egress_id);
    let state = status.as_ref().map(|s| s.state);
    if state == Some(State::Live) {
        push.live_at = Instant::now();
    } else if let Some(error) = status.as_ref().and_then(|s| s.last_error.as_deref()) {
        // Another origin holds the name: the publisher here must stop. (An origin still
        // holding this push's own previous connection answers "already being published",
        // which is not this: the egress retries until that connection times out.)
        if error.contains("already published on") || error.contains("publish race") {
            warn!(stream = %key, origin = %push.origin, "origin refused the forwarded publish: {error}");
            hub.evict(key, error);
            f.evicted = true;
            return;
        }
    }
    let gone = !live.contains(&push.origin);
    // Backoff: the push was cut or refused and waits to retry (a dead origin shows here
    // well before its record expires). Otherwise give a new push time to connect.
    let stuck = state == Some(State::Backoff)
        || (state != Some(State::Live) && push.live_at.elapsed() > STUCK_AFTER);
    if !gone && !stuck {
        return;
    }
    let from = push.origin.clone();
    if best_origin(backbone, region, key, Some(&from)).is_none() {
        // Nowhere else to go: the egress keeps retrying its origin.
        return;
    }
    let old = std::mem::take(f);
    info!(stream = %key, %from, gone, "forward moves to another origin");
    // Make before break: the new push starts before the old one is stopped.
    start(backbone, egress, region, key, Some(&from), f);
    stop(old);
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

/// Starts a push of `key` to the best origin (not `except`) into `f`.
fn start(
    backbone: &Backbone,
    egress: &Arc<Egress>,
    region: &str,
    key: &StreamKey,
    except: Option<&str>,
    f: &mut Forward,
) {
    let Some((origin, rtmp)) = best_origin(backbone, region, key, except) else {
        if !f.warned {
            warn!(stream = %key, "no origin to forward the publish to yet; retrying");
            f.warned = true;
        }
        return;
    };
    let req = EgressRequest {
        stream: key.to_string(),
        kind: "rtmp".into(),
        url: Some(format!("{rtmp}/{}/{}", key.namespace(), key.name())),
        ..Default::default()
    };
    match egress.create_forward(&req) {
        Ok(status) => {
            info!(stream = %key, %origin, "forwarding the publish to an origin");
            f.warned = false;
            f.push = Some(Push {
                egress_id: status.id,
                origin,
                live_at: Instant::now(),
            });
        }
        Err(e) => warn!(stream = %key, "cannot forward: {e:?}"),
    }
}
