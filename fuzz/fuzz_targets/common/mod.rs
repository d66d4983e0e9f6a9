//! Shared by the egress fuzz targets (included with `#[path]`; not a target itself).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use meshcast::egress::spec::confine;

/// A recording root of this process (named after `target`).
fn root(target: &str) -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let r = std::env::temp_dir().join(format!("meshcast-fuzz-{target}-{}", std::process::id()));
        std::fs::create_dir_all(&r).unwrap();
        r
    })
}

/// Confines `rel` under this process's recording root, asserts the result stays under it,
/// then empties the root for the next input.
pub fn assert_confined(target: &str, rel: &Path) {
    let root = root(target);
    if let Ok(path) = confine(root, rel) {
        assert!(path.starts_with(root));
    }
    let _ = std::fs::remove_dir_all(root);
    let _ = std::fs::create_dir_all(root);
}
