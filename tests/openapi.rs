//! `docs/openapi.json` against the running thing: every `/api/v1` route the router has is
//! documented, every documented operation is called on a live cluster (two origins and an
//! edge, a live stream, a viewer, an egress, a room), and each answer's status is
//! documented and its JSON body validates against the documented schema (`jsonschema`).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::flv_watch::FlvWatcher;
use common::http::http_raw;
use common::*;
use meshcast::auth::Action;
use serde_json::{json, Value};

const SECRET: &str = "openapi-test-secret-0123456789";

fn spec() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("openapi.json is JSON")
}

/// The documented path template `path` matches (`/api/v1/egress/eg_1` → `/api/v1/egress/{id}`).
fn template_of<'a>(spec: &'a Value, path: &str) -> Option<&'a str> {
    let path = path.split('?').next().unwrap();
    let parts: Vec<&str> = path.split('/').collect();
    spec["paths"]
        .as_object()?
        .keys()
        .map(String::as_str)
        .find(|t| {
            let tp: Vec<&str> = t.split('/').collect();
            tp.len() == parts.len()
                && tp
                    .iter()
                    .zip(&parts)
                    .all(|(a, b)| a == b || (a.starts_with('{') && a.ends_with('}')))
        })
}

/// Checks one live answer against the document; returns the operation it exercised.
fn check(spec: &Value, method: &str, path: &str, status: u16, body: &str) -> (String, String) {
    let template = template_of(spec, path).unwrap_or_else(|| panic!("{path} is not documented"));
    let op = &spec["paths"][template][method.to_lowercase()];
    assert!(op.is_object(), "{method} {template} is not documented");
    let response = &op["responses"][status.to_string()];
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which {template} does not document: {body}"
    );
    if let Some(schema) = response["content"]["application/json"]["schema"].as_object() {
        let instance: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{method} {path} {status}: not JSON ({e}): {body}"));
        // The schema with the document's components beside it, so `#/components/...` resolves.
        let root = json!({ "allOf": [schema], "components": spec["components"] });
        let validator = jsonschema::validator_for(&root)
            .unwrap_or_else(|e| panic!("{method} {template} {status}: bad schema: {e}"));
        let errors: Vec<String> = validator
            .iter_errors(&instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {path} {status} does not match the document:\n{}\n{body}",
            errors.join("\n")
        );
    }
    if std::env::var_os("MESHCAST_OPENAPI_DUMP").is_some() {
        eprintln!("{method} {path} -> {status}\n{body}\n");
    }
    (method.to_lowercase(), template.to_string())
}

struct Caller<'a> {
    spec: &'a Value,
    token: String,
    done: BTreeSet<(String, String)>,
}

impl Caller<'_> {
    /// Calls `method path` on `node` (with the admin token unless `anonymous`) and checks
    /// the answer; returns its status and JSON.
    fn call(
        &mut self,
        node: &NodeProc,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call_as(node, method, path, body, Some(self.token.clone()))
    }

    fn call_as(
        &mut self,
        node: &NodeProc,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<String>,
    ) -> (u16, Value) {
        let mut headers = String::new();
        if let Some(t) = token {
            headers += &format!("Authorization: Bearer {t}\r\n");
        }
        if body.is_some() {
            headers += "Content-Type: application/json\r\n";
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, _, answer) = http_raw(node.http, method, path, &headers, &body).unwrap();
        self.done
            .insert(check(self.spec, method, path, status, &answer));
        (status, serde_json::from_str(&answer).unwrap_or(Value::Null))
    }
}

/// `(method, template)` of every `/api/v1` route in the router (`src/api/http.rs`).
fn routed() -> BTreeSet<(String, String)> {
    let code = include_str!("../src/api/http.rs");
    let mut out = BTreeSet::new();
    for part in code.split(".route(").skip(1) {
        let Some(path) = part.split('"').nth(1).filter(|p| p.starts_with("/api/v1")) else {
            continue;
        };
        let handlers = part.split(".route(").next().unwrap();
        let handlers = handlers.split(")\n").next().unwrap_or(handlers);
        for (needle, method) in [
            ("get(", "get"),
            ("post(", "post"),
            ("delete(", "delete"),
            ("patch(", "patch"),
        ] {
            if handlers.contains(needle) {
                out.insert((method.to_string(), path.to_string()));
            }
        }
    }
    out
}

#[test]
fn the_openapi_document_matches_the_router_and_every_live_answer() {
    let spec = spec();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    let documented: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(p, _)| p.starts_with("/api/v1"))
        .flat_map(|(p, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .filter(|m| ["get", "post", "delete", "patch", "put"].contains(&m.as_str()))
                .map(move |m| (m.clone(), p.clone()))
        })
        .collect();
    let routes = routed();
    assert!(routes.len() > 15, "{routes:?}");
    let missing: Vec<_> = routes.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "routes not in docs/openapi.json: {missing:?}"
    );
    let stale: Vec<_> = documented.difference(&routes).collect();
    assert!(stale.is_empty(), "documented but not routed: {stale:?}");

    // A cluster to answer: two origins and an edge, with auth.
    let auth = format!("\n[auth]\nsecrets = [\"{SECRET}\"]\n");
    let (a_quic, b_quic) = (node_addr(), node_addr());
    let origin = |id: &str, peer, quic| {
        let mut spec = NodeSpec::origin(id);
        spec.upstreams = vec![peer];
        spec.extra = auth.clone();
        let mut n = NodeProc::start_at(spec, quic);
        n.admin_token = Some(sign(SECRET, &claims(Action::Admin, &[])));
        n
    };
    let a = origin("origin-a", b_quic, a_quic);
    let _b = origin("origin-b", a_quic, b_quic);
    let edge = NodeProc::start(NodeSpec {
        extra: auth.clone(),
        ..NodeSpec::edge("edge-1", vec![a_quic])
    });
    a.wait_for_link_count(3);
    let publish = sign(SECRET, &claims(Action::Publish, &["live/*"]));
    let play = sign(SECRET, &claims(Action::Play, &["live/*"]));
    let _publisher = Publisher::start(
        &format!("{}?token={publish}", a.rtmp_url("cam")),
        PublishOpts::default(),
    );
    let mut c = Caller {
        spec: &spec,
        token: sign(SECRET, &claims(Action::Admin, &[])),
        done: BTreeSet::new(),
    };
    wait_until(Duration::from_secs(15), "the stream live", || {
        c.call(&a, "GET", "/api/v1/streams", None).1["streams"]
            .as_array()
            .is_some_and(|s| {
                s.iter()
                    .any(|s| s["stream"] == "live/cam" && !s["video"].is_null())
            })
    });
    let viewer = FlvWatcher::start(edge.http, &format!("/live/cam.flv?token={play}"));
    wait_until(Duration::from_secs(10), "the edge's viewer plays", || {
        !viewer.media(9).is_empty()
    });
    std::thread::sleep(Duration::from_millis(1500)); // node records with links and pulls

    for node in [&a, &edge] {
        c.call(node, "GET", "/api/v1/node", None);
        c.call(node, "GET", "/api/v1/streams", None);
        c.call(node, "GET", "/api/v1/links", None);
        c.call(node, "GET", "/api/v1/cluster", None);
    }
    let (_, viewers) = c.call(&edge, "GET", "/api/v1/viewers", None);
    let vid = viewers["viewers"][0]["id"].as_str().unwrap().to_string();
    c.call(&edge, "GET", "/api/v1/route?stream=live/cam", None);
    c.call(
        &edge,
        "GET",
        "/api/v1/route?stream=live/cam&region=r&action=publish",
        None,
    );
    c.call(&edge, "GET", "/api/v1/route", None);

    // Egress: created, read, listed, refused, stopped.
    let (status, eg) = c.call(
        &a,
        "POST",
        "/api/v1/egress",
        Some(json!({"stream": "live/cam", "kind": "record", "format": "mp4"})),
    );
    assert_eq!(status, 201, "{eg}");
    let id = eg["id"].as_str().unwrap().to_string();
    c.call(
        &a,
        "POST",
        "/api/v1/egress",
        Some(json!({"stream": "bad name", "kind": "x"})),
    );
    std::thread::sleep(Duration::from_secs(2));
    c.call(&a, "GET", &format!("/api/v1/egress/{id}"), None);
    c.call(&a, "GET", "/api/v1/egress", None);
    c.call(&a, "GET", "/api/v1/egress/eg_none", None);

    // Rooms: created, listed, read, a token, its event channel refused without one, deleted.
    let (status, room) = c.call(
        &a,
        "POST",
        "/api/v1/rooms",
        Some(json!({"name": "Standup"})),
    );
    assert_eq!(status, 201, "{room}");
    let rid = room["id"].as_str().unwrap().to_string();
    c.call(&a, "POST", "/api/v1/rooms", Some(json!({"colour": "blue"})));
    c.call(&a, "GET", "/api/v1/rooms", None);
    c.call(&a, "GET", &format!("/api/v1/rooms/{rid}"), None);
    c.call(
        &a,
        "POST",
        &format!("/api/v1/rooms/{rid}/tokens"),
        Some(json!({"identity": "alice", "name": "Alice"})),
    );
    c.call_as(
        &a,
        "GET",
        &format!("/api/v1/rooms/{rid}/events"),
        None,
        None,
    );
    c.call(&a, "DELETE", &format!("/api/v1/rooms/{rid}"), None);
    c.call(&a, "GET", &format!("/api/v1/rooms/{rid}"), None);

    // Refusals: no token, a play token.
    c.call_as(&a, "GET", "/api/v1/streams", None, None);
    c.call_as(&a, "GET", "/api/v1/cluster", None, Some(play.clone()));

    // Reload: the node re-reads its file (nothing changed).
    c.call(&a, "POST", "/api/v1/reload", None);

    // Kicks and stops last.
    c.call(&edge, "DELETE", &format!("/api/v1/viewers/{vid}"), None);
    c.call(&edge, "DELETE", "/api/v1/viewers/v_none", None);
    c.call(&a, "DELETE", &format!("/api/v1/egress/{id}"), None);
    c.call(&a, "DELETE", "/api/v1/streams/live/cam", None);
    c.call(&a, "DELETE", "/api/v1/streams/live/cam", None);

    let untested: Vec<_> = documented.difference(&c.done).collect();
    assert!(
        untested.is_empty(),
        "documented operations never called: {untested:?}"
    );
}
