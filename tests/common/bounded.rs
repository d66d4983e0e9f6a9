//! Child processes that cannot hang a test: each runs in its own process group for at most
//! a given time, after which the whole group is killed and the test fails, naming it.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// `cmd.output()`, but for at most `limit` (stdout and stderr are captured).
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    run(cmd, limit)
}

/// `cmd.status()`, but for at most `limit` (stdio as `cmd` sets it).
pub fn status_within(cmd: &mut Command, limit: Duration) -> ExitStatus {
    run(cmd, limit).status
}

fn run(cmd: &mut Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    // Drain the pipes beside the wait, so a chatty child never blocks on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let Some(status) = wait_or_kill_group(&mut child, limit) else {
        let err = stderr.join().unwrap_or_default();
        panic!(
            "{what} did not finish within {limit:?}; it was killed. Its stderr:\n{}",
            String::from_utf8_lossy(&err)
        );
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Waits up to `limit` for `child`, which leads its own process group; then kills the
/// group (a child's own children, such as nodes and browsers, go with it) and reaps the
/// child. `None` if it had to be killed.
pub fn wait_or_kill_group(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            return Some(status);
        }
        if start.elapsed() > limit {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
