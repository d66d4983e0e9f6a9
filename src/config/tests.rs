//! The config's unit tests: every section's defaults, bounds and messages.

use super::backbone::backbone_token_problem;
use super::*;
use std::path::Path;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(text, "test.toml", Path::new("."))
}

#[test]
fn backbone_congestion_is_bbr_unless_cubic_is_asked_for() {
    assert_eq!(parse("").unwrap().backbone.congestion, Congestion::Bbr);
    let c = parse("[backbone]\ncongestion = \"cubic\"\n").unwrap();
    assert_eq!(c.backbone.congestion, Congestion::Cubic);
    let err = parse("[backbone]\ncongestion = \"reno\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("congestion") && err.contains("bbr"), "{err}");
}

#[test]
fn bframe_streams_are_transcoded_for_webrtc_unless_refused() {
    assert_eq!(parse("").unwrap().webrtc.bframes, BframePolicy::Transcode);
    let c = parse("[webrtc]\nbframes = \"refuse\"\n").unwrap();
    assert_eq!(c.webrtc.bframes, BframePolicy::Refuse);
    let err = parse("[webrtc]\nbframes = \"drop\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("webrtc.bframes") && err.contains("refuse"),
        "{err}"
    );
}

#[test]
fn an_edge_may_bind_its_outgoing_backbone_address() {
    let edge = "[node]\nrole = \"edge\"\n[backbone]\ntoken = \"0123456789abcdef\"\norigins = [\"10.0.0.1:4433\"]\n";
    let c = parse(&format!("{edge}bind = \"10.0.0.7\"\n")).unwrap();
    assert_eq!(c.backbone.bind, Some("10.0.0.7".parse().unwrap()));
    assert_eq!(parse(edge).unwrap().backbone.bind, None);
    for (bad, why) in [
        ("bind = \"10.0.0.7:1\"\n", "not an IP address"),
        ("bind = \"::1\"\n", "address families differ"),
    ] {
        let err = parse(&format!("{edge}{bad}")).unwrap_err().to_string();
        assert!(err.contains("backbone.bind") && err.contains(why), "{err}");
    }
    let err = parse("[backbone]\nbind = \"127.0.0.1\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("only edges bind"), "{err}");
}

#[test]
fn empty_file_is_standalone_on_default_ports() {
    let c = parse("").unwrap();
    assert_eq!(c.node.role, Role::Standalone);
    assert_eq!(c.rtmp.listen.unwrap().port(), 1935);
    assert_eq!(c.http.listen.unwrap().port(), 8080);
    assert_eq!(c.backbone.listen.unwrap().port(), 4433);
}

#[test]
fn reports_every_problem_with_key_and_reason() {
    let err = parse(
        r#"
        [node]
        role = "edge"
        id = "bad id!"
        [rtmp]
        listen = "nonsense"
        chunk_size = 5
        [http]
        listen = 8080
        [backbone]
        listen = "0.0.0.0:4433"
        peers = ["1.2.3.4:1"]
        [bogus]
        "#,
    )
    .unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    for expected in [
        "bogus",
        "http",
        "node.id",
        "rtmp.listen",
        "rtmp.chunk_size",
        "backbone.origins",
        "backbone.peers",
        "backbone.listen",
    ] {
        assert!(keys.contains(&expected), "{expected} missing in {keys:?}");
    }
    let text = err.to_string();
    assert!(text.contains("test.toml: rtmp.chunk_size: must be between 128 and 65536"));
}

#[test]
fn a_backbone_beyond_loopback_needs_a_token_of_16_bytes() {
    let origin = |token: &str, listen: &str, peers: &str| {
        parse(&format!(
            "[node]\nrole = \"origin\"\n[backbone]\ntoken = \"{token}\"\nlisten = \"{listen}\"\npeers = [{peers}]\n"
        ))
    };
    let edge = |token: &str, origin: &str| {
        parse(&format!(
            "[node]\nrole = \"edge\"\n[backbone]\ntoken = \"{token}\"\norigins = [\"{origin}\"]\n"
        ))
    };
    let refused = |r: Result<Config, ConfigErrors>, why: &str| {
        let err = r.unwrap_err();
        assert_eq!(err.problems[0].key, "backbone.token", "{err}");
        let text = err.to_string();
        assert!(text.contains(why) && text.contains("16 bytes"), "{text}");
    };
    let strong = "0123456789abcdef";
    refused(
        origin("", "0.0.0.0:4433", ""),
        "is empty and backbone.listen",
    );
    refused(
        origin("", "127.0.0.1:4433", "\"10.0.0.2:4433\""),
        "is empty",
    );
    refused(origin("short", "10.0.0.1:4433", ""), "is 5 bytes");
    refused(
        origin("short", "127.0.0.1:4433", "\"10.0.0.2:4433\""),
        "dials 10.0.0.2",
    );
    refused(edge("", "127.0.0.1:4433"), "can authenticate");
    refused(edge("0123456789abcde", "[2001:db8::1]:4433"), "is 15 bytes");
    assert!(origin(strong, "0.0.0.0:4433", "\"10.0.0.2:4433\"").is_ok());
    assert!(edge(strong, "10.0.0.1:4433").is_ok());
    // Loopback only (tests, one-machine examples): any non-empty token.
    assert!(origin("short", "127.0.0.1:4433", "\"127.0.0.2:4433\"").is_ok());
    assert!(edge("t", "[::1]:4433").is_ok());
    // Only listening, without a token: starts with its backbone closed.
    assert!(origin("", "127.0.0.1:4433", "").is_ok());
    let c = parse("[backbone]\nlisten = \"0.0.0.0:4433\"\n").unwrap();
    assert!(c.backbone.token.is_empty());
    assert!(backbone_token_problem(Role::Standalone, "", c.backbone.listen, &[], &[]).is_none());
}

#[test]
fn unknown_key_is_named() {
    let err = parse("[rtmp]\nlisten_addr = \"1.2.3.4:5\"\n").unwrap_err();
    assert_eq!(err.problems[0].key, "rtmp.listen_addr");
}

#[test]
fn listener_can_be_turned_off() {
    let c = parse("[rtmp]\nlisten = \"off\"\n").unwrap();
    assert!(c.rtmp.listen.is_none());
}

#[test]
fn recording_s3_is_checked_and_its_secret_stays_out_of_debug_output() {
    let c = parse(
        "[recording.s3]\nbucket = \"recs\"\nendpoint = \"http://127.0.0.1:9000/\"\n\
         access_key_id = \"k\"\nsecret_access_key = \"very-secret\"\n",
    )
    .unwrap();
    let s3 = c.recording.s3.unwrap();
    assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
    assert_eq!((s3.region.as_str(), s3.delete_local), ("us-east-1", true));
    assert!(!format!("{s3:?}").contains("very-secret"));
    let err = parse(
        "[recording.s3]\nbucket = \"No_Such\"\nendpoint = \"ftp://x\"\nprefix = \"/abs\"\naccess_key_id = \"k\"\n",
    )
    .unwrap_err()
    .to_string();
    for key in ["s3.bucket", "s3.endpoint", "s3.prefix", "s3.access_key_id"] {
        assert!(err.contains(key), "{key} not in {err}");
    }
}
