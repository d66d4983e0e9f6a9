//! The egress API as the tests call it: create, read and stop jobs under `/api/v1/egress`.

use serde_json::{json, Value};

use super::{http_get, http_request, NodeProc};

/// `POST /api/v1/egress` with `body`: the status and the answer (`{"raw": text}` when the
/// answer is not JSON).
pub fn post_egress(node: &NodeProc, body: Value) -> (u16, Value) {
    let (status, text) =
        http_request(node.http, "POST", "/api/v1/egress", Some(&body.to_string())).unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text })),
    )
}

/// Creates an egress that must be accepted (201); returns its id.
pub fn start_egress(node: &NodeProc, body: Value) -> String {
    let (status, created) = post_egress(node, body);
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_string()
}

/// `GET /api/v1/egress/{id}` of an egress that exists.
pub fn egress_status(node: &NodeProc, id: &str) -> Value {
    let (status, text) = http_get(node.http, &format!("/api/v1/egress/{id}")).unwrap();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// `DELETE /api/v1/egress/{id}`: the egress's last status.
pub fn delete_egress(node: &NodeProc, id: &str) -> Value {
    let (status, text) =
        http_request(node.http, "DELETE", &format!("/api/v1/egress/{id}"), None).unwrap();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}
