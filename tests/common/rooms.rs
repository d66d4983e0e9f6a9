//! Rooms in tests: admin calls, join tokens and a two-region cluster with token auth.

use serde_json::{json, Value};

use super::http::http_raw;
use super::*;

pub const SECRET: &str = "rooms-test-secret-0123456789";

pub fn admin_token() -> String {
    sign(SECRET, &claims(meshcast::auth::Action::Admin, &[]))
}

/// An admin call with a JSON body: (status, JSON answer).
pub fn admin(node: &NodeProc, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let headers = format!(
        "Authorization: Bearer {}\r\nContent-Type: application/json\r\n",
        admin_token()
    );
    let (status, _, answer) = http_raw(node.http, method, path, &headers, &body).unwrap();
    (status, serde_json::from_str(&answer).unwrap_or(Value::Null))
}

pub fn join_token(node: &NodeProc, room: &str, identity: &str) -> String {
    let (status, v) = admin(
        node,
        "POST",
        &format!("/api/v1/rooms/{room}/tokens"),
        Some(json!({ "identity": identity, "name": identity.to_uppercase() })),
    );
    assert_eq!(status, 200, "{v}");
    v["token"].as_str().unwrap().to_string()
}

/// Origins A and B (regions us and eu), an edge of each, all with the same token secret.
pub fn cluster() -> (NodeProc, NodeProc, NodeProc, NodeProc) {
    let auth = format!("\n[auth]\nsecrets = [\"{SECRET}\"]\n");
    let (a_quic, b_quic) = (node_addr(), node_addr());
    let origin = |id: &str, region: &str, peer| NodeSpec {
        upstreams: vec![peer],
        region: region.into(),
        extra: auth.clone(),
        ..NodeSpec::origin(id)
    };
    let with_token = |mut n: NodeProc| {
        n.admin_token = Some(admin_token());
        n
    };
    let a = with_token(NodeProc::start_at(origin("origin-a", "us", b_quic), a_quic));
    let b = with_token(NodeProc::start_at(origin("origin-b", "eu", a_quic), b_quic));
    let edge = |id: &str, region: &str, up| {
        with_token(NodeProc::start(NodeSpec {
            region: region.into(),
            extra: auth.clone(),
            ..NodeSpec::edge(id, vec![up])
        }))
    };
    let (ea, eb) = (edge("edge-us", "us", a_quic), edge("edge-eu", "eu", b_quic));
    a.wait_for_link_count(3);
    b.wait_for_link_count(3);
    ea.wait_for_link_count(1);
    eb.wait_for_link_count(1);
    (a, b, ea, eb)
}

/// Creates a room on `on` with `body` and waits until every node of `everywhere` knows it;
/// its id.
pub fn create_room(on: &NodeProc, everywhere: &[&NodeProc], body: Value) -> String {
    let (status, room) = admin(on, "POST", "/api/v1/rooms", Some(body));
    assert_eq!(status, 201, "{room}");
    let id = room["id"].as_str().unwrap().to_string();
    for n in everywhere {
        wait_until(
            Duration::from_secs(5),
            "the room reaches every node",
            || admin(n, "GET", &format!("/api/v1/rooms/{id}"), None).0 == 200,
        );
    }
    id
}
