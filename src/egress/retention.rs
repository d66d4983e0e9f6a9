//! Recording retention (`[recording] max_age_hours`, `max_total_mb`): once a minute, the
//! finished files under the recording root older than the age limit are deleted, then the
//! oldest while the total is above the size limit. Files being written are never touched.
//! The walk is bounded (depth and entries) and runs on the blocking pool.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Egress;
use crate::config::Retention;

/// How often the recording root is swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Directory levels walked at most.
const MAX_DEPTH: usize = 16;
/// Files looked at per sweep at most.
const MAX_FILES: usize = 200_000;

/// Sweeps `root` every minute until `shutdown`.
pub async fn run(root: PathBuf, rule: Retention, egress: Arc<Egress>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let open: HashSet<PathBuf> = egress
            .list()
            .into_iter()
            .filter_map(|s| s.current_file)
            .map(|f| root.join(f))
            .collect();
        let (root, rule) = (root.clone(), rule.clone());
        match tokio::task::spawn_blocking(move || sweep(&root, &rule, &open, SystemTime::now()))
            .await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(files = n, "retention: deleted old recordings"),
            Ok(Err(e)) => warn!("retention sweep failed: {e}"),
            Err(_) => warn!("retention sweep panicked"),
        }
    }
}

/// Deletes what `rule` says must go under `root` (never a file in `open`); returns how many
/// files were deleted.
pub fn sweep(
    root: &Path,
    rule: &Retention,
    open: &HashSet<PathBuf>,
    now: SystemTime,
) -> std::io::Result<usize> {
    if !root.is_dir() {
        return Ok(0);
    }
    let mut files = Vec::new();
    collect(root, 0, open, &mut files)?;
    let mut deleted = 0;
    if let Some(max_age) = rule.max_age {
        files.retain(|(path, modified, _)| {
            let old = now.duration_since(*modified).is_ok_and(|age| age > max_age);
            if old && std::fs::remove_file(path).is_ok() {
                deleted += 1;
            }
            !old
        });
    }
    if let Some(max_total) = rule.max_total_bytes {
        files.sort_by_key(|(_, modified, _)| *modified);
        let mut total: u64 = files.iter().map(|(_, _, len)| len).sum();
        for (path, _, len) in &files {
            if total <= max_total {
                break;
            }
            if std::fs::remove_file(path).is_ok() {
                total -= len;
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}

/// The recording files under `root` (bounded like a sweep: [`MAX_DEPTH`], [`MAX_FILES`],
/// links not followed), with their modification time and size.
pub fn recording_files(root: &Path) -> std::io::Result<Vec<(PathBuf, SystemTime, u64)>> {
    let mut files = Vec::new();
    if root.is_dir() {
        collect(root, 0, &HashSet::new(), &mut files)?;
    }
    Ok(files)
}

/// Recordings under `dir`: not the dot files beside them (the egress state file) nor
/// temporary files (one being replaced).
fn collect(
    dir: &Path,
    depth: usize,
    open: &HashSet<PathBuf>,
    out: &mut Vec<(PathBuf, SystemTime, u64)>,
) -> std::io::Result<()> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        if out.len() >= MAX_FILES {
            return Ok(());
        }
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name.ends_with(".tmp") {
            continue;
        }
        // Links are not followed: only what lies under the root is ever deleted.
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            collect(&path, depth + 1, open, out)?;
        } else if kind.is_file() && !open.contains(&path) {
            let meta = entry.metadata()?;
            out.push((path, meta.modified()?, meta.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, len: usize, age: Duration) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, vec![0u8; len]).unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
        p
    }

    #[test]
    fn old_files_go_then_the_oldest_until_the_total_fits_and_open_files_stay() {
        let dir = std::env::temp_dir().join(format!("meshcast-retention-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let h = Duration::from_secs(3600);
        let ancient = file(&dir, "live/a/1.mp4", 100, 48 * h);
        let open_old = file(&dir, "live/a/2.mp4", 100, 47 * h);
        let older = file(&dir, "live/b/1.mp4", 400, 3 * h);
        let newer = file(&dir, "live/b/2.mp4", 400, h);
        let newest = file(&dir, "live/c.mp4", 400, Duration::ZERO);
        let rule = Retention {
            max_age: Some(24 * h),
            max_total_bytes: Some(900),
        };
        let open: HashSet<PathBuf> = [open_old.clone()].into();
        let n = sweep(&dir, &rule, &open, SystemTime::now()).unwrap();
        assert_eq!(n, 2);
        assert!(!ancient.exists() && !older.exists());
        assert!(open_old.exists() && newer.exists() && newest.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
