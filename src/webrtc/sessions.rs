//! The registry of this node's WebRTC sessions (WHIP publishers and WHEP viewers): their
//! ids, the stream each belongs to, the limit on how many there are, and the task each runs
//! in.
//!
//! Registering a session routes the ufrag of its answer to a queue of incoming datagrams
//! ([`super::io`]): its own (a publisher's task), or its shard's (a viewer's, see
//! [`super::shard`]). The session's end removes both. A DELETE cancels the session's token,
//! and its peer closes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, Instrument};

use super::io::{Datagram, Io, PeerQueue};
use super::offer::random_token;
use super::WebRtcError;
use crate::media::StreamKey;

/// Datagrams queued per peer between the socket reader and the peer task.
const PEER_QUEUE: usize = 256;
/// A viewer (WHEP) whose ICE and DTLS are not connected within this time is dropped. It
/// holds a session slot and a viewer admission until then.
pub(crate) const VIEWER_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A publisher (WHIP) whose ICE and DTLS are not connected within this time is dropped.
/// Longer than a viewer's: a browser publishing may still be starting its camera.
pub(crate) const PUBLISHER_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a session ended normally (its task's result).
pub(crate) type SessionEnd = Result<&'static str, str0m::RtcError>;

struct SessionEntry {
    stream: StreamKey,
    ufrag: String,
    cancel: CancellationToken,
}

/// A registered session's ends: its id, incoming datagrams and cancel token.
pub(crate) struct Registered {
    pub id: String,
    pub datagrams: mpsc::Receiver<Datagram>,
    pub cancel: CancellationToken,
}

pub(crate) struct Sessions {
    io: Arc<Io>,
    entries: Mutex<HashMap<String, SessionEntry>>,
    /// WHIP and WHEP sessions at most, connecting or connected.
    max: usize,
    shutdown: CancellationToken,
}

impl Sessions {
    pub(crate) fn new(io: Arc<Io>, max: usize, shutdown: CancellationToken) -> Sessions {
        Sessions {
            io,
            entries: Mutex::new(HashMap::new()),
            max,
            shutdown,
        }
    }

    /// Refuses a new session past the limit (those still connecting count: they expire
    /// after their connect timeout).
    pub(crate) fn check_capacity(&self) -> Result<(), WebRtcError> {
        if self.entries.lock().len() >= self.max {
            return Err(WebRtcError::TooManySessions(self.max));
        }
        Ok(())
    }

    /// Registers a session of `stream` whose answer carries `ufrag`: routes the ufrag's
    /// datagrams to it.
    pub(crate) fn register(&self, stream: &StreamKey, ufrag: String) -> Registered {
        let (tx, datagrams) = mpsc::channel(PEER_QUEUE);
        let (id, cancel) = self.register_to(stream, ufrag, PeerQueue { tx, tag: 0 });
        Registered {
            id,
            datagrams,
            cancel,
        }
    }

    /// Registers a session whose datagrams go to `queue`; returns its id and cancel token.
    /// Whoever runs it calls [`Sessions::remove`] when it ends.
    pub(crate) fn register_to(
        &self,
        stream: &StreamKey,
        ufrag: String,
        queue: PeerQueue,
    ) -> (String, CancellationToken) {
        let id = random_token(20);
        let cancel = self.shutdown.child_token();
        self.io.add_route(ufrag.clone(), queue);
        self.entries.lock().insert(
            id.clone(),
            SessionEntry {
                stream: stream.clone(),
                ufrag,
                cancel: cancel.clone(),
            },
        );
        (id, cancel)
    }

    /// Runs a registered session's peer in its own task (in `span`); it is removed from
    /// the registry when the peer ends.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        id: String,
        span: tracing::Span,
        peer: impl Future<Output = SessionEnd> + Send + 'static,
    ) {
        let me = self.clone();
        // Boxed so the wrapper below holds a pointer, not a second copy of the peer.
        let peer = Box::pin(peer);
        tokio::spawn(
            async move {
                match peer.await {
                    Ok(reason) => info!("session ended: {reason}"),
                    Err(e) => info!("session failed: {e}"),
                }
                me.remove(&id);
            }
            .instrument(span),
        );
    }

    /// Ends a session (WHIP/WHEP DELETE); false if there is no such session for `stream`.
    pub(crate) fn delete(&self, stream: &StreamKey, id: &str) -> bool {
        let entries = self.entries.lock();
        match entries.get(id) {
            Some(s) if &s.stream == stream => {
                s.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    pub(crate) fn exists(&self, stream: &StreamKey, id: &str) -> bool {
        self.entries
            .lock()
            .get(id)
            .is_some_and(|s| &s.stream == stream)
    }

    /// Routes a session's datagrams to `queue` from now on (a viewer handed to another
    /// shard).
    pub(crate) fn reroute(&self, id: &str, queue: PeerQueue) {
        if let Some(s) = self.entries.lock().get(id) {
            self.io.add_route(s.ufrag.clone(), queue);
        }
    }

    /// Forgets an ended session and its route.
    pub(crate) fn remove(&self, id: &str) {
        if let Some(s) = self.entries.lock().remove(id) {
            self.io.remove_route(&s.ufrag);
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.entries.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sessions(max: usize) -> Arc<Sessions> {
        let (io, _) = Io::bind("127.0.0.1:0".parse().unwrap(), false)
            .await
            .unwrap();
        Arc::new(Sessions::new(Arc::new(io), max, CancellationToken::new()))
    }

    #[tokio::test]
    async fn sessions_past_the_limit_are_refused_until_one_ends() {
        let s = sessions(2).await;
        let key = StreamKey::new("live", "a").unwrap();
        let first = s.register(&key, "u1".into());
        s.check_capacity().unwrap();
        let _second = s.register(&key, "u2".into());
        assert!(matches!(
            s.check_capacity(),
            Err(WebRtcError::TooManySessions(2))
        ));
        // The first session's peer ends when it is deleted; its task removes it.
        let cancel = first.cancel.clone();
        s.spawn(first.id.clone(), tracing::Span::none(), async move {
            cancel.cancelled().await;
            Ok("deleted")
        });
        assert!(s.exists(&key, &first.id));
        assert!(s.delete(&key, &first.id));
        for _ in 0..100 {
            if s.count() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(s.count(), 1);
        assert!(!s.exists(&key, &first.id));
        s.check_capacity().unwrap();
    }

    #[tokio::test]
    async fn a_session_is_deleted_only_under_its_own_stream() {
        let s = sessions(10).await;
        let (a, b) = (
            StreamKey::new("live", "a").unwrap(),
            StreamKey::new("live", "b").unwrap(),
        );
        let session = s.register(&a, "u1".into());
        assert!(!s.exists(&b, &session.id));
        assert!(!s.delete(&b, &session.id), "another stream's session");
        assert!(!session.cancel.is_cancelled());
        assert!(!s.delete(&a, "no-such-id"));
        assert!(s.delete(&a, &session.id));
        assert!(session.cancel.is_cancelled());
    }
}
