//! [`ServerProtocol`] against rml_rtmp's client session, bytes pumped in memory: no socket.

use bytes::Bytes;
use rml_amf0::Amf0Value;
use rml_rtmp::chunk_io::ChunkDeserializer;
use rml_rtmp::messages::RtmpMessage;
use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult, PublishRequestType,
};
use rml_rtmp::time::RtmpTimestamp;

use super::*;
use crate::rtmp::guard::GuardLimits;

/// One `onStatus`/`_result`/`_error` the server sent: (command, level, code, description).
type Status = (String, String, String, String);

/// A client session and a server protocol, with what each side saw.
struct Pair {
    client: ClientSession,
    server: ServerProtocol,
    /// Events the server raised, drained by the tests.
    events: Vec<ProtocolEvent>,
    client_events: Vec<ClientSessionEvent>,
    statuses: Vec<Status>,
    /// Every message the server sent, decoded.
    messages: Vec<RtmpMessage>,
    decoder: ChunkDeserializer,
}

impl Pair {
    /// A connected pair (the client's `connect` accepted).
    fn connected() -> Pair {
        let (client, initial) = ClientSession::new(ClientSessionConfig::new()).unwrap();
        let server = ServerProtocol::new(4096, GuardLimits::default()).unwrap();
        let mut pair = Pair {
            client,
            server,
            events: Vec::new(),
            client_events: Vec::new(),
            statuses: Vec::new(),
            messages: Vec::new(),
            decoder: ChunkDeserializer::new(),
        };
        pair.deliver();
        pair.send(initial);
        let connect = pair.client.request_connection("live".into()).unwrap();
        pair.send(vec![connect]);
        assert!(pair
            .client_events
            .iter()
            .any(|e| matches!(e, ClientSessionEvent::ConnectionRequestAccepted)));
        pair
    }

    /// Sends what the client produced to the server, then pumps until both are quiet.
    fn send(&mut self, results: Vec<ClientSessionResult>) {
        let mut bytes = Vec::new();
        crate::rtmp::client::collect(&results, &mut bytes);
        self.send_bytes(&bytes);
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.server.handle_input(bytes).unwrap();
        }
        self.deliver();
    }

    /// Server → client (and the client's answers back) until nothing moves.
    fn deliver(&mut self) {
        loop {
            while let Some(ev) = self.server.poll_event() {
                self.events.push(ev);
            }
            let mut out = Vec::new();
            self.server.poll_transmit(&mut out);
            if out.is_empty() {
                return;
            }
            let bytes: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
            self.decode(&bytes);
            let results = self.client.handle_input(&bytes).unwrap();
            let mut answer = Vec::new();
            for r in results {
                match r {
                    ClientSessionResult::OutboundResponse(p) => answer.extend_from_slice(&p.bytes),
                    ClientSessionResult::RaisedEvent(e) => self.client_events.push(e),
                    ClientSessionResult::UnhandleableMessageReceived(_) => {}
                }
            }
            if !answer.is_empty() {
                self.server.handle_input(&answer).unwrap();
            }
        }
    }

    fn decode(&mut self, mut bytes: &[u8]) {
        while let Some(payload) = self.decoder.get_next_message(bytes).unwrap() {
            bytes = &[];
            let message = payload.to_rtmp_message().unwrap();
            if let RtmpMessage::SetChunkSize { size } = message {
                self.decoder.set_max_chunk_size(size as usize).unwrap();
            }
            if let RtmpMessage::Amf0Command {
                command_name,
                additional_arguments,
                ..
            } = &message
            {
                if let Some(Amf0Value::Object(o)) = additional_arguments.first() {
                    let field = |k: &str| match o.get(k) {
                        Some(Amf0Value::Utf8String(s)) => s.clone(),
                        _ => String::new(),
                    };
                    self.statuses.push((
                        command_name.clone(),
                        field("level"),
                        field("code"),
                        field("description"),
                    ));
                }
            }
            self.messages.push(message);
        }
    }

    /// Connected, with a publish of `live/demo` waiting for its answer (events taken).
    fn waiting_publish() -> Pair {
        let mut pair = Pair::connected();
        pair.publish("demo");
        pair.take_events();
        pair
    }

    /// Connected and publishing `live/demo` (events taken).
    fn publishing() -> Pair {
        let mut pair = Pair::waiting_publish();
        pair.server.accept_publish().unwrap();
        pair.deliver();
        pair.take_events();
        pair
    }

    /// Connected and playing `live/demo` (events taken).
    fn playing() -> Pair {
        let mut pair = Pair::connected();
        pair.play("demo");
        pair.server.accept_play().unwrap();
        pair.deliver();
        pair.take_events();
        pair
    }

    fn publish(&mut self, key: &str) {
        let r = self
            .client
            .request_publishing(key.into(), PublishRequestType::Live)
            .unwrap();
        self.send(vec![r]);
    }

    fn play(&mut self, key: &str) {
        let r = self.client.request_playback(key.into()).unwrap();
        self.send(vec![r]);
    }

    fn take_events(&mut self) -> Vec<ProtocolEvent> {
        std::mem::take(&mut self.events)
    }

    fn last_status(&self) -> Status {
        self.statuses.last().cloned().expect("a status")
    }

    fn client_saw(&self, want: impl Fn(&ClientSessionEvent) -> bool) -> bool {
        self.client_events.iter().any(want)
    }
}

/// A video message on the publish stream with a full chunk header (as any client may send
/// it, accepted or not).
fn video_message(timestamp: u32) -> Bytes {
    // An AVC NAL unit (keyframe): frame type 1, codec 7, packet type 1, cts 0, then data.
    let body = [0x17, 0x01, 0, 0, 0, 0, 0, 0, 1, 0x65];
    chunk::encode_message(
        chunk::CSID_VIDEO,
        chunk::MSG_VIDEO,
        timestamp,
        PUBLISH_STREAM_ID,
        &body,
        4096,
    )
}

/// Asserts `events` is one video message stamped `timestamp`.
fn assert_one_video(events: &[ProtocolEvent], timestamp: u32) {
    assert!(
        matches!(events, [ProtocolEvent::Video { timestamp: t, .. }] if *t == timestamp),
        "{events:?}"
    );
}

fn requested(events: &[ProtocolEvent]) -> Option<&Request> {
    events.iter().find_map(|e| match e {
        ProtocolEvent::PublishRequested(r) | ProtocolEvent::PlayRequested(r) => Some(r),
        _ => None,
    })
}

#[test]
fn connect_is_accepted_and_its_result_names_success() {
    let pair = Pair::connected();
    let (command, _, code, _) = pair.statuses[0].clone();
    assert_eq!(command, "_result");
    assert_eq!(code, "NetConnection.Connect.Success");
    assert!(!pair.server.awaits_answer());
}

#[test]
fn a_publish_waits_for_the_driver_with_its_key_and_query() {
    let mut pair = Pair::connected();
    // createStream is answered by the protocol, then the publish goes out to the driver.
    pair.publish("demo?token=T");
    let events = pair.take_events();
    let request = requested(&events).expect("a publish request");
    assert!(matches!(events[0], ProtocolEvent::PublishRequested(_)));
    assert_eq!(request.key.to_string(), "live/demo");
    assert_eq!(request.query, "token=T");
    assert!(pair.server.awaits_answer());
    assert!(!pair.client_saw(|e| matches!(e, ClientSessionEvent::PublishRequestAccepted)));
}

#[test]
fn an_accepted_publish_starts_and_its_media_flows() {
    let mut pair = Pair::publishing();
    assert!(pair.client_saw(|e| matches!(e, ClientSessionEvent::PublishRequestAccepted)));
    assert_eq!(pair.last_status().2, "NetStream.Publish.Start");
    pair.send_bytes(&video_message(40));
    assert_one_video(&pair.take_events(), 40);
}

#[test]
fn media_sent_before_the_answer_is_dropped() {
    let mut pair = Pair::waiting_publish();
    pair.send_bytes(&video_message(0));
    pair.send_bytes(&video_message(33));
    assert!(
        pair.take_events().is_empty(),
        "early media reached the driver"
    );
    pair.server.accept_publish().unwrap();
    pair.deliver();
    pair.send_bytes(&video_message(66));
    assert_one_video(&pair.take_events(), 66);
}

#[test]
fn pings_are_answered_while_a_publish_waits_for_its_answer() {
    let mut pair = Pair::waiting_publish();
    let (ping, _) = pair.client.send_ping_request().unwrap();
    pair.send_bytes(&ping.bytes);
    assert!(pair.client_saw(|e| matches!(e, ClientSessionEvent::PingResponseReceived { .. })));
    assert!(pair.server.awaits_answer());
}

#[test]
fn a_refused_publish_is_told_its_code_and_reason() {
    let mut pair = Pair::waiting_publish();
    let refusal = pair
        .server
        .refuse(Refused::Unauthorized, "a token is required".into())
        .unwrap();
    pair.deliver();
    assert_eq!(refusal.stream, "live/demo");
    assert!(refusal.closes());
    let (command, level, code, description) = pair.last_status();
    assert_eq!(command, "_error");
    assert_eq!(level, "_error");
    assert_eq!(code, "NetStream.Publish.Unauthorized");
    assert_eq!(description, "a token is required");
    assert!(!pair.server.awaits_answer());
}

#[test]
fn a_name_that_is_no_stream_key_is_refused_by_the_protocol() {
    let mut pair = Pair::connected();
    pair.publish("no good");
    let events = pair.take_events();
    let [ProtocolEvent::Refused(refusal)] = &events[..] else {
        panic!("{events:?}");
    };
    assert_eq!(refusal.why, Refused::BadName);
    assert_eq!(pair.last_status().2, "NetStream.Publish.BadName");
    assert!(!pair.server.awaits_answer());
}

#[test]
fn a_second_request_while_one_waits_is_refused_as_busy() {
    let mut pair = Pair::waiting_publish();
    // A `play` on the same stream, as a raw command (the client session would not send it).
    let play = RtmpMessage::Amf0Command {
        command_name: "play".into(),
        transaction_id: 0.0,
        command_object: Amf0Value::Null,
        additional_arguments: vec![Amf0Value::Utf8String("other".into())],
    }
    .into_message_payload(RtmpTimestamp::new(0), PUBLISH_STREAM_ID)
    .unwrap();
    let bytes = chunk::encode_message(20, play.type_id, 0, PUBLISH_STREAM_ID, &play.data, 4096);
    pair.send_bytes(&bytes);
    let events = pair.take_events();
    let [ProtocolEvent::Refused(refusal)] = &events[..] else {
        panic!("{events:?}");
    };
    assert_eq!(
        (refusal.command, refusal.why),
        (Command::Play, Refused::Busy)
    );
    assert!(!refusal.closes());
    assert_eq!(pair.last_status().2, "NetStream.Play.StreamNotFound");
    // The publish still waits, and can still be accepted.
    assert!(pair.server.awaits_answer());
    pair.server.accept_publish().unwrap();
}

#[test]
fn an_accepted_play_starts_without_data_messages_ffmpeg_would_misread() {
    let mut pair = Pair::connected();
    pair.play("demo?token=T");
    let events = pair.take_events();
    assert!(matches!(events[..], [ProtocolEvent::PlayRequested(_)]));
    assert_eq!(requested(&events).unwrap().query, "token=T");
    let stream_id = pair.server.accept_play().unwrap();
    pair.deliver();
    assert_eq!(stream_id, 1);
    assert!(pair.server.is_playing());
    assert!(pair.client_saw(|e| matches!(e, ClientSessionEvent::PlaybackRequestAccepted)));
    assert!(
        !pair
            .messages
            .iter()
            .any(|m| matches!(m, RtmpMessage::Amf0Data { .. })),
        "a data message was sent"
    );
}

#[test]
fn a_refused_play_closes_only_when_denied_or_over_a_limit() {
    for (why, code, closes) in [
        (Refused::NotFound, "NetStream.Play.StreamNotFound", false),
        (Refused::Unauthorized, "NetStream.Play.Unauthorized", true),
        (Refused::Limit, "NetStream.Play.Failed", true),
    ] {
        let mut pair = Pair::connected();
        pair.play("demo");
        pair.take_events();
        let refusal = pair.server.refuse(why, "because".into()).unwrap();
        pair.deliver();
        assert_eq!(refusal.closes(), closes, "{why:?}");
        assert_eq!(pair.last_status().2, code);
        assert_eq!(pair.last_status().3, "because");
    }
}

#[test]
fn every_publish_refusal_closes_and_has_its_code() {
    for (why, code) in [
        (Refused::Busy, status::PUBLISH_BAD_CONNECTION),
        (Refused::BadName, status::PUBLISH_BAD_NAME),
        (Refused::Unauthorized, status::PUBLISH_UNAUTHORIZED),
        (Refused::Limit, status::PUBLISH_BAD_NAME),
        (Refused::Taken, status::PUBLISH_BAD_NAME),
    ] {
        let refusal = Refusal {
            command: Command::Publish,
            stream: "live/x".into(),
            why,
            reason: String::new(),
        };
        assert_eq!(refusal.code(), code, "{why:?}");
        assert!(refusal.closes());
    }
}

#[test]
fn an_evicted_publisher_is_told_why_in_an_error_status() {
    let mut pair = Pair::publishing();
    pair.server.evict("kicked by the admin API").unwrap();
    pair.deliver();
    let (command, level, code, description) = pair.last_status();
    assert_eq!(command, "onStatus");
    assert_eq!(level, "error");
    assert_eq!(code, "NetStream.Publish.BadName");
    assert_eq!(description, "kicked by the admin API");
    // Media after the eviction goes nowhere.
    pair.take_events();
    pair.send_bytes(&video_message(99));
    assert!(pair.take_events().is_empty());
}

#[test]
fn the_end_of_a_played_stream_is_sent_as_play_complete() {
    let mut pair = Pair::playing();
    pair.server.end_of_stream();
    pair.deliver();
    assert_eq!(pair.last_status().2, "NetStream.Play.Complete");
    assert!(!pair.server.is_playing());
}

#[test]
fn closing_a_publish_or_a_play_is_reported_once() {
    let mut pair = Pair::publishing();
    let stop = pair.client.stop_publishing().unwrap();
    pair.send(stop);
    let events = pair.take_events();
    assert!(
        matches!(events[..], [ProtocolEvent::PublishFinished]),
        "{events:?}"
    );

    let mut pair = Pair::playing();
    let stop = pair.client.stop_playback().unwrap();
    pair.send(stop);
    let events = pair.take_events();
    assert!(
        matches!(events[..], [ProtocolEvent::PlayFinished]),
        "{events:?}"
    );
}

#[test]
fn answering_without_a_request_is_an_error_not_a_panic() {
    let mut pair = Pair::connected();
    assert!(pair.server.accept_publish().is_err());
    assert!(pair.server.accept_play().is_err());
    assert!(pair.server.refuse(Refused::Limit, "x".into()).is_err());
}

#[test]
fn tokens_come_off_the_key_or_the_app() {
    let n = rtmp_names;
    assert_eq!(
        n("live", "demo?token=T"),
        ("live".into(), "demo".into(), "token=T".into())
    );
    assert_eq!(
        n("live?token=T", "demo"),
        ("live".into(), "demo".into(), "token=T".into())
    );
    assert_eq!(n("live?a=1", "demo?token=T").2, "token=T&a=1");
    assert_eq!(n("live", "demo").2, "");
}
