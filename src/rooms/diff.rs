//! The events that turn one view of a room into the next (sans-IO).

use std::collections::BTreeMap;

use super::state::{Event, Member};

/// The events that turn view `old` into view `new`; `reason` is given to leaves.
pub fn diff(
    old: &BTreeMap<String, Member>,
    new: &BTreeMap<String, Member>,
    reason: &'static str,
) -> Vec<Event> {
    let mut events = Vec::new();
    for (identity, m) in old {
        match new.get(identity) {
            None => events.push(Event::Left {
                identity: identity.clone(),
                reason,
            }),
            Some(n) if n.participant.session != m.participant.session => {
                events.push(Event::Left {
                    identity: identity.clone(),
                    reason: "rejoined",
                });
            }
            Some(_) => {}
        }
    }
    for (identity, n) in new {
        let was = old
            .get(identity)
            .filter(|m| m.participant.session == n.participant.session);
        let Some(m) = was else {
            events.push(Event::Joined {
                participant: Member {
                    participant: n.participant.clone(),
                    track: None,
                },
            });
            if let Some(t) = &n.track {
                events.push(Event::TrackPublished {
                    identity: identity.clone(),
                    stream: t.stream.clone(),
                });
            }
            continue;
        };
        for (kind, before, after) in [
            (
                "audio",
                m.participant.audio_muted,
                n.participant.audio_muted,
            ),
            (
                "video",
                m.participant.video_muted,
                n.participant.video_muted,
            ),
        ] {
            if before != after {
                events.push(Event::Muted {
                    identity: identity.clone(),
                    kind,
                    muted: after,
                });
            }
        }
        let (a, b) = (
            m.track.as_ref().map(|t| &t.stream),
            n.track.as_ref().map(|t| &t.stream),
        );
        if a != b {
            if let Some(s) = a {
                events.push(Event::TrackUnpublished {
                    identity: identity.clone(),
                    stream: s.clone(),
                });
            }
            if let Some(s) = b {
                events.push(Event::TrackPublished {
                    identity: identity.clone(),
                    stream: s.clone(),
                });
            }
        }
    }
    events
}
