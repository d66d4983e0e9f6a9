//! The event hook (`[hooks] events`): publish, unpublish, play and stop notifications
//! POSTed as JSON to an operator's service.
//!
//! Delivery is asynchronous on a bounded queue served by one task: media paths only
//! `try_send`, so a slow or dead hook never stalls a publisher or viewer. When the queue is
//! full the event is dropped and counted (`meshcast_hook_events_dropped_total`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::webhook::{post_json, HookUrl};
use crate::media::StreamKey;

/// Events waiting for delivery at most.
const QUEUE: usize = 1024;
/// One delivery's time limit.
const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Publish,
    Unpublish,
    Play,
    Stop,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            EventKind::Publish => "publish",
            EventKind::Unpublish => "unpublish",
            EventKind::Play => "play",
            EventKind::Stop => "stop",
        }
    }
}

pub use crate::metrics::HookCounters;

/// The sending side of the event hook.
#[derive(Clone)]
pub struct EventHook {
    tx: mpsc::Sender<Vec<u8>>,
    node_id: Arc<str>,
    counters: HookCounters,
}

impl EventHook {
    /// Starts the delivery task for `url`.
    pub fn start(
        url: &str,
        node_id: &str,
        counters: HookCounters,
        shutdown: CancellationToken,
    ) -> Result<EventHook, String> {
        let url = HookUrl::parse(url)?;
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        let c = counters.clone();
        tokio::spawn(async move {
            loop {
                let body = tokio::select! {
                    b = rx.recv() => match b { Some(b) => b, None => return },
                    _ = shutdown.cancelled() => return,
                };
                match post_json(&url, body, TIMEOUT).await {
                    Ok(s) if (200..300).contains(&s) => c.delivered.inc(),
                    Ok(s) => {
                        debug!(status = s, "event hook refused an event");
                        c.failed.inc()
                    }
                    Err(e) => {
                        debug!("event hook delivery failed: {e}");
                        c.failed.inc()
                    }
                };
            }
        });
        Ok(EventHook {
            tx,
            node_id: node_id.into(),
            counters,
        })
    }

    /// Queues an event; never waits.
    pub fn notify(&self, kind: EventKind, protocol: &str, stream: &StreamKey, client: SocketAddr) {
        let body = serde_json::json!({
            "event": kind.as_str(),
            "protocol": protocol,
            "stream": stream.to_string(),
            "client": client.ip().to_string(),
            "client_port": client.port(),
            "node": &*self.node_id,
            "time_ms": crate::clock::unix_ms(),
        });
        let body = serde_json::to_vec(&body).unwrap_or_default();
        if self.tx.try_send(body).is_err() {
            self.counters.dropped.inc();
        }
    }
}
