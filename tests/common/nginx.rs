//! nginx with Debian's `libnginx-mod-rtmp`, started on a loopback port as a real RTMP server
//! (the destination egress pushes to, and the peer the fan-out benchmark compares against).
//! Shared by the tests and the benchmarks; killed by its own PID on drop.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl Nginx {
    /// Starts nginx-rtmp with one `live` application on `127.0.0.1:port`, files under `dir`.
    pub fn start(dir: &Path, port: u16) -> Nginx {
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "load_module /usr/lib/nginx/modules/ngx_rtmp_module.so;\ndaemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {0}/logs/error.log;\npid {0}/nginx.pid;\nworker_rlimit_nofile 8192;\nevents {{ worker_connections 8192; }}\nrtmp {{ server {{ listen 127.0.0.1:{port}; application live {{ live on; }} }} }}\n",
                dir.display()
            ),
        )
        .unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx with libnginx-mod-rtmp");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nginx-rtmp did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    pub fn url(&self, stream: &str) -> String {
        format!("rtmp://127.0.0.1:{}/live/{stream}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
