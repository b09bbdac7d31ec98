//! A real nats-server on a free port, for the end-to-end tests and for
//! the unit tests of natswal's own NATS client (bridge/src/wire), which
//! include this file by path.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The pinned nats-server that `scripts/setup` installs.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/nats-server");
    assert!(
        path.exists(),
        "nats-server not found at {}: run scripts/setup (the README's test command does)",
        path.display()
    );
    path
}

/// A port nothing listens on, below the kernel's ephemeral range
/// (32768-60999 here): a port the kernel hands out for binding port 0 can
/// be taken by an outgoing connection's local end before the server the
/// test starts binds it (seen as a node that did not start). Each port is
/// handed out once per test process; the start is spread by the pid.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const COUNT: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 97) % COUNT,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..COUNT {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + COUNT);
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs a child process, if there is one, and reaps it.
pub fn kill_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Sends `signal` to a running child process without waiting.
pub fn signal_child(child: Option<&Child>, signal: i32) {
    let child = child.expect("running");
    // SAFETY: kill(2) with a valid pid and signal touches no memory.
    let result = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(result, 0, "kill({}, {signal}) failed", child.id());
}

/// A nats-server child process on loopback.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    directory: tempfile::TempDir,
    config: Option<String>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_with_config(None)
    }

    /// `config` is nats-server configuration text; `port` is set by us.
    pub fn start_with_config(config: Option<String>) -> NatsServer {
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            directory: tempfile::tempdir().expect("temp dir"),
            config,
        };
        server.spawn();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn directory(&self) -> &Path {
        self.directory.path()
    }

    fn spawn(&mut self) {
        let mut command = Command::new(nats_server_binary());
        command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(config) = &self.config {
            let path = self.directory.path().join("nats.conf");
            std::fs::write(&path, config).expect("write nats.conf");
            command.arg("-c").arg(path);
        }
        self.child = Some(command.spawn().expect("start nats-server"));
        let port = self.port;
        wait_until("nats-server to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Kills the server (SIGKILL) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn stop(&mut self) {
        kill_child(&mut self.child);
    }

    /// Sends `signal` to the running server without waiting.
    pub fn signal(&self, signal: i32) {
        signal_child(self.child.as_ref(), signal);
    }

    /// Waits for the server to exit (after a signal) and forgets it.
    pub fn wait_exit(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after it exited).
    pub fn start_again(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
