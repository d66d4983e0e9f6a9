//! The rooms this node knows, and what their participants are told (sans-IO).
//!
//! A room's state is the union of **slices**, one per node: a node's slice holds the
//! participants whose event channel it serves and the tracks (streams) published on it.
//! Each node is the only writer of its own slice, so nothing needs a home node or a lock
//! across nodes: a node that dies takes only its own slice with it. The union is the room
//! as everyone sees it ([`Member`]s, one per identity, the newest session winning), and
//! every change to it is turned into the events the participants receive, by diffing the
//! view before and after ([`diff`]). So a participant's events follow the order in which
//! its node saw the changes: a join always comes before that participant's leave.
//!
//! Time is handed in (`now` for timers, `now_ms` for what is shown); nothing here does IO.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use super::checks::{clean_name, valid_identity, valid_room_id, RateLimit};
pub use super::diff::diff;

/// A room as created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInfo {
    pub id: String,
    pub name: String,
    pub max_participants: u32,
    pub empty_timeout_s: u64,
    /// Unix ms.
    pub created_ms: u64,
}

/// One participant's presence, as the node serving its event channel says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    pub identity: String,
    pub name: String,
    /// Random per join: tells a rejoin of the same identity from the session before.
    pub session: u64,
    /// The node serving its event channel.
    pub node: String,
    /// Unix ms.
    pub joined_ms: u64,
    pub audio_muted: bool,
    pub video_muted: bool,
}

/// A participant's published stream, as the node it is published on says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Track {
    /// `room/ROOM.IDENTITY`.
    pub stream: String,
    pub node: String,
    /// Audio level, RFC 6464 style: 0 is the loudest, 127 silence (-dBov).
    pub level: u8,
}

/// A participant as the room sees it: presence, and its track if one is published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Member {
    #[serde(flatten)]
    pub participant: Participant,
    pub track: Option<Track>,
}

/// What a participant is told. Serialized as the event channel's JSON (`type` first).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Joined {
        participant: Member,
    },
    Left {
        identity: String,
        reason: &'static str,
    },
    TrackPublished {
        identity: String,
        stream: String,
    },
    TrackUnpublished {
        identity: String,
        stream: String,
    },
    Muted {
        identity: String,
        kind: &'static str,
        muted: bool,
    },
    Speaker {
        identity: Option<String>,
    },
    Data {
        from: String,
        whisper: bool,
        payload: serde_json::Value,
    },
    Closed {
        reason: String,
    },
}

impl Event {
    /// The participant the event is about, when it is about what that participant did
    /// itself (who is not told of its own join, leave or mute).
    pub fn about(&self) -> Option<&str> {
        match self {
            Event::Joined { participant } => Some(&participant.participant.identity),
            Event::Left { identity, .. } | Event::Muted { identity, .. } => Some(identity),
            _ => None,
        }
    }
}

/// Why a room operation was refused; the text goes to the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("no room {0}")]
    NoRoom(String),
    #[error("room {0} is full ({1} participants)")]
    Full(String, u32),
    #[error("at most {0} rooms")]
    TooManyRooms(usize),
    #[error("{0}")]
    Invalid(String),
}

/// One node's part of a room.
#[derive(Clone, Debug, Default)]
struct Slice {
    /// The owner's (incarnation, version) when it made this slice: a newer one replaces it.
    stamp: (u64, u64),
    /// Why its latest change removed participants.
    reason: &'static str,
    participants: BTreeMap<String, Participant>,
    tracks: BTreeMap<String, Track>,
    /// When a remote slice is forgotten unless refreshed; `None` for this node's own.
    expires: Option<Instant>,
}

impl Slice {
    fn is_empty(&self) -> bool {
        self.participants.is_empty() && self.tracks.is_empty()
    }
}

#[derive(Debug)]
struct Room {
    info: RoomInfo,
    slices: BTreeMap<String, Slice>,
    /// The newest stamp seen from each node, kept after its slice empties or expires, so
    /// that a late older copy cannot bring a participant back.
    stamps: BTreeMap<String, (u64, u64)>,
    view: BTreeMap<String, Member>,
    empty_since: Option<Instant>,
    speaker: Speaker,
}

/// Levels louder than this (-dBov) make a speaker.
const SPEAKING_DBOV: u8 = 50;
/// A new speaker takes over only this much louder than a current one still speaking.
const TAKE_OVER_DB: u8 = 6;
/// The speaker changes at most this often.
const SPEAKER_HOLD: Duration = Duration::from_millis(1000);

/// Whether a level changed enough for the other nodes to hear of it: across the speaking
/// threshold, or by 6 dB or more.
fn level_moved(before: u8, after: u8) -> bool {
    (before < SPEAKING_DBOV) != (after < SPEAKING_DBOV) || before.abs_diff(after) >= TAKE_OVER_DB
}

#[derive(Debug, Default)]
struct Speaker {
    identity: Option<String>,
    since: Option<Instant>,
}

/// The rooms known here and their slices.
#[derive(Debug)]
pub struct RoomTable {
    me: String,
    /// This node's incarnation and the version of its latest slice change.
    incarnation: u64,
    version: u64,
    /// The reason of this node's latest slice change (sent with an emptied slice).
    last_reason: &'static str,
    max_rooms: usize,
    rooms: BTreeMap<String, Room>,
    /// Rooms closed lately, so that no late copy brings one back.
    closed: BTreeMap<String, Instant>,
}

/// How long a closed room's id is remembered.
const CLOSED_MEMORY: Duration = Duration::from_secs(600);
/// Participants or tracks in one slice at most (bigger ones from peers are refused).
pub const MAX_SLICE_ITEMS: usize = 1000;

/// One node's slice of a room, as it travels between nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SliceUpdate {
    pub room: String,
    pub node: String,
    pub stamp: (u64, u64),
    pub participants: Vec<Participant>,
    pub tracks: Vec<Track>,
    /// Why participants missing from it left (of its latest change).
    #[serde(default)]
    pub reason: String,
}

/// A leave reason from a peer, as one of ours (an unknown one is `left`).
fn leave_reason(s: &str) -> &'static str {
    match s {
        "lost" => "lost",
        "rejoined" => "rejoined",
        "disconnected" => "disconnected",
        "closed" => "closed",
        _ => "left",
    }
}

/// The union of a room's slices: per identity, the newest session's presence and any
/// track of that identity.
fn union(slices: &BTreeMap<String, Slice>) -> BTreeMap<String, Member> {
    let mut view: BTreeMap<String, Member> = BTreeMap::new();
    for slice in slices.values() {
        for p in slice.participants.values() {
            let newer = view.get(&p.identity).is_none_or(|m| {
                (p.joined_ms, p.session) > (m.participant.joined_ms, m.participant.session)
            });
            if newer {
                view.insert(
                    p.identity.clone(),
                    Member {
                        participant: p.clone(),
                        track: None,
                    },
                );
            }
        }
    }
    for slice in slices.values() {
        for (identity, t) in &slice.tracks {
            if let Some(m) = view.get_mut(identity) {
                if m.track.is_none() {
                    m.track = Some(t.clone());
                }
            }
        }
    }
    view
}

impl RoomTable {
    pub fn new(me: &str, max_rooms: usize) -> RoomTable {
        Self::with_incarnation(me, max_rooms, 0)
    }

    /// `incarnation` orders this node's slices after those of its earlier runs (its start
    /// time in unix ms).
    pub fn with_incarnation(me: &str, max_rooms: usize, incarnation: u64) -> RoomTable {
        RoomTable {
            me: me.to_string(),
            incarnation,
            version: 0,
            last_reason: "left",
            max_rooms,
            rooms: BTreeMap::new(),
            closed: BTreeMap::new(),
        }
    }

    /// A room another node made (or passed on). `true` if it is new here.
    pub fn learn_room(&mut self, info: RoomInfo, now: Instant) -> bool {
        if self.rooms.contains_key(&info.id) || self.closed.contains_key(&info.id) {
            return false;
        }
        self.create(info, now).is_ok()
    }

    /// Every room's record.
    pub fn infos(&self) -> Vec<RoomInfo> {
        self.rooms.values().map(|r| r.info.clone()).collect()
    }

    /// This node's slices (of rooms where it has participants or tracks).
    pub fn my_slices(&self) -> Vec<SliceUpdate> {
        self.rooms
            .iter()
            .filter_map(|(id, r)| {
                let s = r.slices.get(&self.me)?;
                Some(SliceUpdate {
                    room: id.clone(),
                    node: self.me.clone(),
                    stamp: s.stamp,
                    participants: s.participants.values().cloned().collect(),
                    tracks: s.tracks.values().cloned().collect(),
                    reason: s.reason.to_string(),
                })
            })
            .collect()
    }

    /// This node's slice of `room`, even an empty one (to tell peers it emptied).
    pub fn my_slice(&self, room: &str) -> SliceUpdate {
        let s = self.rooms.get(room).and_then(|r| r.slices.get(&self.me));
        SliceUpdate {
            room: room.to_string(),
            node: self.me.clone(),
            stamp: s.map_or((self.incarnation, self.version), |s| s.stamp),
            participants: s
                .map(|s| s.participants.values().cloned().collect())
                .unwrap_or_default(),
            tracks: s
                .map(|s| s.tracks.values().cloned().collect())
                .unwrap_or_default(),
            reason: self.last_reason.to_string(),
        }
    }

    /// Another node's slice. `None` when it is stale (an older stamp than held), about an
    /// unknown room, or this node's own; else the events of the change (none for a mere
    /// refresh). It is forgotten at `expires` unless refreshed.
    pub fn apply_slice(
        &mut self,
        update: SliceUpdate,
        expires: Instant,
        now: Instant,
    ) -> Option<Vec<Event>> {
        if update.node == self.me {
            return None;
        }
        let r = self.rooms.get_mut(&update.room)?;
        match r.stamps.get(&update.node) {
            Some(seen) if update.stamp < *seen => return None,
            Some(seen) if update.stamp == *seen => {
                if let Some(held) = r.slices.get_mut(&update.node) {
                    held.expires = Some(expires);
                }
                return Some(Vec::new());
            }
            _ => {}
        }
        r.stamps.insert(update.node.clone(), update.stamp);
        let reason = leave_reason(&update.reason);
        let slice = Slice {
            stamp: update.stamp,
            reason,
            participants: update
                .participants
                .into_iter()
                .map(|p| (p.identity.clone(), p))
                .collect(),
            tracks: update
                .tracks
                .into_iter()
                .filter_map(|t| {
                    let name = t.stream.strip_prefix("room/")?;
                    let (_, identity) = name.split_once('.')?;
                    Some((identity.to_string(), t))
                })
                .collect(),
            expires: Some(expires),
        };
        if slice.is_empty() {
            r.slices.remove(&update.node);
        } else {
            r.slices.insert(update.node, slice);
        }
        Some(r.refresh(reason, now))
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// Adds a room (its id made by the caller, unguessable).
    pub fn create(&mut self, info: RoomInfo, now: Instant) -> Result<RoomInfo, RoomError> {
        if self.rooms.len() >= self.max_rooms {
            return Err(RoomError::TooManyRooms(self.max_rooms));
        }
        if self.rooms.contains_key(&info.id) || self.closed.contains_key(&info.id) {
            return Err(RoomError::Invalid(format!("room {} exists", info.id)));
        }
        self.rooms.insert(
            info.id.clone(),
            Room {
                info: info.clone(),
                slices: BTreeMap::new(),
                stamps: BTreeMap::new(),
                view: BTreeMap::new(),
                empty_since: Some(now),
                speaker: Speaker::default(),
            },
        );
        Ok(info)
    }

    pub fn info(&self, room: &str) -> Option<&RoomInfo> {
        self.rooms.get(room).map(|r| &r.info)
    }

    pub fn rooms(&self) -> impl Iterator<Item = (&RoomInfo, usize)> {
        self.rooms.values().map(|r| (&r.info, r.view.len()))
    }

    /// The members of `room`, by identity.
    pub fn members(&self, room: &str) -> Option<Vec<Member>> {
        self.rooms
            .get(room)
            .map(|r| r.view.values().cloned().collect())
    }

    pub fn member(&self, room: &str, identity: &str) -> Option<&Member> {
        self.rooms.get(room)?.view.get(identity)
    }

    pub fn speaker(&self, room: &str) -> Option<&str> {
        self.rooms.get(room)?.speaker.identity.as_deref()
    }

    /// Removes a room; the events its local participants get (a `Closed`).
    pub fn remove(&mut self, room: &str, reason: &str, now: Instant) -> Option<Event> {
        self.closed.insert(room.to_string(), now);
        self.rooms.remove(room).map(|_| Event::Closed {
            reason: reason.to_string(),
        })
    }

    /// Changes this node's slice of `room` with `change`, and returns the events.
    fn change_mine(
        &mut self,
        room: &str,
        reason: &'static str,
        now: Instant,
        change: impl FnOnce(&mut Slice),
    ) -> Vec<Event> {
        let me = self.me.clone();
        let Some(r) = self.rooms.get_mut(room) else {
            return Vec::new();
        };
        self.version += 1;
        self.last_reason = reason;
        let slice = r.slices.entry(me.clone()).or_default();
        change(slice);
        slice.stamp = (self.incarnation, self.version);
        slice.reason = reason;
        if r.slices.get(&me).is_some_and(Slice::is_empty) {
            r.slices.remove(&me);
        }
        r.refresh(reason, now)
    }

    /// A participant joins through this node. Refused when the room is unknown or full
    /// (a rejoin of an identity already present is not counted twice).
    pub fn join(
        &mut self,
        room: &str,
        participant: Participant,
        now: Instant,
    ) -> Result<Vec<Event>, RoomError> {
        let r = self
            .rooms
            .get(room)
            .ok_or_else(|| RoomError::NoRoom(room.to_string()))?;
        let present = r.view.contains_key(&participant.identity);
        if !present && r.view.len() >= r.info.max_participants as usize {
            return Err(RoomError::Full(room.to_string(), r.info.max_participants));
        }
        Ok(self.change_mine(room, "left", now, |s| {
            s.participants
                .insert(participant.identity.clone(), participant);
        }))
    }

    /// A participant's event channel on this node closed (`reason`: `left`, `lost`, ...).
    /// Only its own session is removed: a newer one of the same identity stays.
    pub fn leave(
        &mut self,
        room: &str,
        identity: &str,
        session: u64,
        reason: &'static str,
        now: Instant,
    ) -> Vec<Event> {
        self.change_mine(room, reason, now, |s| {
            if s.participants
                .get(identity)
                .is_some_and(|p| p.session == session)
            {
                s.participants.remove(identity);
            }
        })
    }

    /// A participant on this node says its audio or video is muted or not.
    pub fn set_muted(
        &mut self,
        room: &str,
        identity: &str,
        video: bool,
        muted: bool,
        now: Instant,
    ) -> Vec<Event> {
        self.change_mine(room, "left", now, |s| {
            if let Some(p) = s.participants.get_mut(identity) {
                if video {
                    p.video_muted = muted;
                } else {
                    p.audio_muted = muted;
                }
            }
        })
    }

    /// A participant's stream started (`Some`) or ended (`None`) on this node.
    pub fn set_track(
        &mut self,
        room: &str,
        identity: &str,
        track: Option<Track>,
        now: Instant,
    ) -> Vec<Event> {
        self.change_mine(room, "left", now, |s| match track {
            Some(t) => {
                s.tracks.insert(identity.to_string(), t);
            }
            None => {
                s.tracks.remove(identity);
            }
        })
    }

    /// Audio levels of tracks published here (identity, -dBov over the last window).
    /// Returns a `Speaker` event when the active speaker changes.
    pub fn set_levels(
        &mut self,
        room: &str,
        levels: &[(String, u8)],
        now: Instant,
    ) -> (Vec<Event>, bool) {
        let me = self.me.clone();
        let Some(r) = self.rooms.get_mut(room) else {
            return (Vec::new(), false);
        };
        let mut moved = false;
        if let Some(s) = r.slices.get_mut(&me) {
            for (identity, level) in levels {
                if let Some(t) = s.tracks.get_mut(identity) {
                    moved |= level_moved(t.level, *level);
                    t.level = *level;
                }
            }
            if moved {
                self.version += 1;
                s.stamp = (self.incarnation, self.version);
            }
        }
        r.view = union(&r.slices);
        (r.choose_speaker(now).into_iter().collect(), moved)
    }

    /// Timers: rooms empty for their timeout are removed (returned), and remote slices
    /// not refreshed in time are dropped (the events of those rooms returned).
    pub fn tick(&mut self, now: Instant) -> (Vec<String>, Vec<(String, Vec<Event>)>) {
        let mut closed = Vec::new();
        let mut changed = Vec::new();
        for (id, r) in self.rooms.iter_mut() {
            let before = r.slices.len();
            r.slices
                .retain(|_, s| s.expires.is_none_or(|deadline| deadline > now));
            if r.slices.len() != before {
                let events = r.refresh("lost", now);
                if !events.is_empty() {
                    changed.push((id.clone(), events));
                }
            }
            if r.empty_since.is_some_and(|t| {
                now.duration_since(t) >= Duration::from_secs(r.info.empty_timeout_s)
            }) {
                closed.push(id.clone());
            }
        }
        for id in &closed {
            self.rooms.remove(id);
            self.closed.insert(id.clone(), now);
        }
        self.closed
            .retain(|_, t| now.duration_since(*t) < CLOSED_MEMORY);
        (closed, changed)
    }
}

impl Room {
    /// Recomputes the view from the slices; the events of the change.
    fn refresh(&mut self, reason: &'static str, now: Instant) -> Vec<Event> {
        let view = union(&self.slices);
        let mut events = diff(&self.view, &view, reason);
        self.view = view;
        self.empty_since = match (self.view.is_empty(), self.empty_since) {
            (true, None) => Some(now),
            (true, since) => since,
            (false, _) => None,
        };
        events.extend(self.choose_speaker(now));
        events
    }

    /// The loudest track's participant becomes the speaker when it speaks and either no
    /// one else does or it is clearly louder, at most once per [`SPEAKER_HOLD`]; a speaker
    /// who left is no longer one.
    fn choose_speaker(&mut self, now: Instant) -> Option<Event> {
        let level_of = |identity: &str| {
            self.view
                .get(identity)
                .and_then(|m| m.track.as_ref())
                .map(|t| t.level)
        };
        let current = self.speaker.identity.clone();
        let current_level = current.as_deref().and_then(level_of);
        if current.as_ref().is_some_and(|c| !self.view.contains_key(c)) {
            self.speaker = Speaker {
                identity: None,
                since: Some(now),
            };
            return Some(Event::Speaker { identity: None });
        }
        let loudest = self
            .view
            .values()
            .filter_map(|m| Some((m.track.as_ref()?.level, &m.participant.identity)))
            .min()
            .filter(|(level, _)| *level < SPEAKING_DBOV)
            .map(|(level, id)| (level, id.clone()))?;
        if current.as_deref() == Some(loudest.1.as_str()) {
            return None;
        }
        if self
            .speaker
            .since
            .is_some_and(|t| now.duration_since(t) < SPEAKER_HOLD)
        {
            return None;
        }
        let takes_over = match current_level {
            Some(l) if l < SPEAKING_DBOV => loudest.0 + TAKE_OVER_DB <= l,
            _ => true,
        };
        if !takes_over {
            return None;
        }
        self.speaker = Speaker {
            identity: Some(loudest.1.clone()),
            since: Some(now),
        };
        Some(Event::Speaker {
            identity: Some(loudest.1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> RoomInfo {
        RoomInfo {
            id: id.into(),
            name: "test".into(),
            max_participants: 3,
            empty_timeout_s: 10,
            created_ms: 0,
        }
    }

    fn participant(identity: &str, session: u64, joined_ms: u64) -> Participant {
        Participant {
            identity: identity.into(),
            name: identity.to_uppercase(),
            session,
            node: "n1".into(),
            joined_ms,
            audio_muted: false,
            video_muted: false,
        }
    }

    fn track(identity: &str, level: u8) -> Track {
        Track {
            stream: format!("room/r1.{identity}"),
            node: "n1".into(),
            level,
        }
    }

    fn kinds(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                let v = serde_json::to_value(e).unwrap();
                format!(
                    "{} {}",
                    v["type"].as_str().unwrap(),
                    v.get("identity")
                        .or(v.get("participant").and_then(|p| p.get("identity")))
                        .and_then(|i| i.as_str())
                        .unwrap_or("-")
                )
            })
            .collect()
    }

    #[test]
    fn joins_tracks_mutes_and_leaves_become_events_in_order() {
        let t0 = Instant::now();
        let mut t = RoomTable::new("n1", 10);
        t.create(info("r1"), t0).unwrap();
        assert_eq!(
            kinds(&t.join("r1", participant("a", 1, 1), t0).unwrap()),
            ["joined a"]
        );
        t.set_track("r1", "b", Some(track("b", 127)), t0);
        // b's track is known before b joins: it is told with b's join.
        assert_eq!(
            kinds(&t.join("r1", participant("b", 2, 2), t0).unwrap()),
            ["joined b", "track_published b"]
        );
        assert_eq!(kinds(&t.set_muted("r1", "a", false, true, t0)), ["muted a"]);
        assert_eq!(
            kinds(&t.set_muted("r1", "a", false, true, t0)),
            Vec::<String>::new()
        );
        assert_eq!(
            kinds(&t.set_track("r1", "b", None, t0)),
            ["track_unpublished b"]
        );
        // A rejoin of a from another session: a leaves, then joins again.
        assert_eq!(
            kinds(&t.join("r1", participant("a", 3, 5), t0).unwrap()),
            ["left a", "joined a"]
        );
        // The old session's late leave removes nothing.
        assert!(t.leave("r1", "a", 1, "left", t0).is_empty());
        let left = t.leave("r1", "a", 3, "lost", t0);
        assert_eq!(
            left,
            [Event::Left {
                identity: "a".into(),
                reason: "lost"
            }]
        );
        assert_eq!(t.members("r1").unwrap().len(), 1);
    }

    #[test]
    fn a_full_room_and_an_unknown_room_are_refused() {
        let t0 = Instant::now();
        let mut t = RoomTable::new("n1", 1);
        t.create(info("r1"), t0).unwrap();
        assert_eq!(t.create(info("r2"), t0), Err(RoomError::TooManyRooms(1)));
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            t.join("r1", participant(id, i as u64, 1), t0).unwrap();
        }
        assert_eq!(
            t.join("r1", participant("d", 9, 1), t0),
            Err(RoomError::Full("r1".into(), 3))
        );
        // A rejoin of someone present is not a fourth participant.
        t.join("r1", participant("c", 10, 2), t0).unwrap();
        assert_eq!(
            t.join("nope", participant("d", 9, 1), t0),
            Err(RoomError::NoRoom("nope".into()))
        );
    }

    #[test]
    fn an_empty_room_closes_after_its_timeout_and_not_while_anyone_is_in() {
        let t0 = Instant::now();
        let mut t = RoomTable::new("n1", 10);
        t.create(info("r1"), t0).unwrap();
        t.join("r1", participant("a", 1, 1), t0).unwrap();
        assert!(t.tick(t0 + Duration::from_secs(60)).0.is_empty());
        t.leave("r1", "a", 1, "left", t0 + Duration::from_secs(60));
        assert!(t.tick(t0 + Duration::from_secs(69)).0.is_empty());
        assert_eq!(t.tick(t0 + Duration::from_secs(70)).0, ["r1"]);
        assert!(t.info("r1").is_none());
    }

    #[test]
    fn the_loudest_speaker_takes_over_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut t = RoomTable::new("n1", 10);
        t.create(info("r1"), t0).unwrap();
        for (i, id) in ["a", "b"].iter().enumerate() {
            t.join("r1", participant(id, i as u64, 1), t0).unwrap();
            t.set_track("r1", id, Some(track(id, 127)), t0);
        }
        let lv = |a: u8, b: u8| vec![("a".to_string(), a), ("b".to_string(), b)];
        // Silence: no speaker.
        assert!(t.set_levels("r1", &lv(127, 127), t0).0.is_empty());
        assert_eq!(
            t.set_levels("r1", &lv(30, 127), t0).0,
            [Event::Speaker {
                identity: Some("a".into())
            }]
        );
        // b is louder but within the hold.
        let t1 = t0 + Duration::from_millis(300);
        assert!(t.set_levels("r1", &lv(30, 10), t1).0.is_empty());
        // After the hold, b clearly louder takes over; barely louder would not.
        let t2 = t0 + Duration::from_millis(1500);
        assert!(t.set_levels("r1", &lv(30, 27), t2).0.is_empty());
        assert_eq!(
            t.set_levels("r1", &lv(30, 10), t2).0,
            [Event::Speaker {
                identity: Some("b".into())
            }]
        );
        // The speaker leaves: no speaker.
        let t3 = t0 + Duration::from_secs(3);
        let events = t.leave("r1", "b", 1, "left", t3);
        assert_eq!(kinds(&events), ["left b", "speaker -"]);
        assert_eq!(t.speaker("r1"), None);
    }

    #[test]
    fn peers_slices_join_the_view_until_they_expire_and_stale_copies_are_ignored() {
        let t0 = Instant::now();
        let mut a = RoomTable::with_incarnation("n1", 10, 1);
        let mut b = RoomTable::with_incarnation("n2", 10, 1);
        a.create(info("r1"), t0).unwrap();
        assert!(b.learn_room(info("r1"), t0));
        assert!(!b.learn_room(info("r1"), t0), "known already");
        let mut bob = participant("bob", 7, 1);
        bob.node = "n2".into();
        b.join("r1", bob, t0).unwrap();
        let first = b.my_slice("r1");
        let ttl = t0 + Duration::from_secs(3);
        assert_eq!(
            kinds(&a.apply_slice(first.clone(), ttl, t0).unwrap()),
            ["joined bob"]
        );
        // The same stamp again is a refresh: no events, a later expiry.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(
            a.apply_slice(first.clone(), later + Duration::from_secs(3), later),
            Some(vec![])
        );
        // Bob closes his tab: the emptied slice carries why.
        b.leave("r1", "bob", 7, "left", t0);
        let emptied = b.my_slice("r1");
        assert_eq!(
            a.apply_slice(emptied.clone(), ttl, t0).unwrap(),
            [Event::Left {
                identity: "bob".into(),
                reason: "left"
            }]
        );
        // An older copy arriving late changes nothing.
        assert_eq!(a.apply_slice(first.clone(), ttl, t0), None);
        // A node's own slice coming back is ignored.
        assert_eq!(b.apply_slice(emptied, ttl, t0), None);
        // Bob again; then his node goes silent: gone when the slice expires, as lost.
        let mut bob = participant("bob", 8, 2);
        bob.node = "n2".into();
        b.join("r1", bob, t0).unwrap();
        a.apply_slice(b.my_slice("r1"), ttl, t0).unwrap();
        assert!(a.tick(t0 + Duration::from_secs(2)).1.is_empty());
        let (_, changed) = a.tick(t0 + Duration::from_secs(4));
        assert_eq!(
            changed,
            [(
                "r1".to_string(),
                vec![Event::Left {
                    identity: "bob".into(),
                    reason: "lost"
                }]
            )]
        );
        // A closed room is not brought back by a late record.
        a.remove("r1", "closed", t0);
        assert!(!a.learn_room(info("r1"), t0));
    }

    #[test]
    fn rate_limits_allow_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, 20, t0);
        assert_eq!((0..30).filter(|_| r.take(t0)).count(), 20);
        assert!(!r.take(t0));
        assert!(r.take(t0 + Duration::from_millis(100)));
        assert!(!r.take(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn identities_and_names_are_checked() {
        assert!(valid_identity("alice-1.x_y"));
        for bad in ["", ".a", "a/b", "a b", "ä", &"x".repeat(65)] {
            assert!(!valid_identity(bad), "{bad}");
        }
        assert!(valid_room_id("Ab3") && !valid_room_id("a-b") && !valid_room_id(""));
        assert_eq!(clean_name("a\u{7}b\nc"), "abc");
        assert_eq!(clean_name(&"é".repeat(100)).chars().count(), 64);
    }
}
