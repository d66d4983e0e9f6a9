//! `[node]`: who this node is (id, region, role) and how many viewers it is sized for.

use serde::Deserialize;

use super::read::{check_name, Problem, Problems};

/// What a node does in the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes publishers, joins the origin mesh, serves edges (and viewers).
    Origin,
    /// Serves viewers, pulling streams from its origins on demand.
    Edge,
    /// Origin and edge in one process; the default with no config file.
    Standalone,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Origin => "origin",
            Role::Edge => "edge",
            Role::Standalone => "standalone",
        }
    }

    /// Whether this node accepts publishers and belongs to the origin mesh.
    pub fn is_origin(self) -> bool {
        matches!(self, Role::Origin | Role::Standalone)
    }
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Defaults to the role's name.
    pub id: String,
    pub region: String,
    pub role: Role,
    /// Viewers this node is sized for: routing counts a node this full as fully loaded.
    pub max_viewers: u32,
}

/// The region of a node that names none (documented in `docs/configuration.md`).
pub const DEFAULT_REGION: &str = "default";

impl Default for NodeConfig {
    /// The node started with no config file.
    fn default() -> Self {
        NodeConfig {
            id: Role::Standalone.as_str().into(),
            region: DEFAULT_REGION.into(),
            role: Role::Standalone,
            max_viewers: 1000,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    id: Option<String>,
    region: Option<String>,
    role: Option<Role>,
    max_viewers: Option<u32>,
}

pub(super) fn parse(raw: RawNode, problems: &mut Problems) -> NodeConfig {
    let d = NodeConfig::default();
    let role = raw.role.unwrap_or(d.role);
    let id = raw.id.unwrap_or_else(|| role.as_str().to_string());
    check_name(&id, "node.id", problems);
    let region = raw.region.unwrap_or(d.region);
    check_name(&region, "node.region", problems);
    let max_viewers = raw.max_viewers.unwrap_or(d.max_viewers);
    if max_viewers == 0 {
        problems.push(Problem::new("node.max_viewers", "must be at least 1"));
    }
    NodeConfig {
        id,
        region,
        role,
        max_viewers,
    }
}
