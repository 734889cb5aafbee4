//! Harness for end-to-end tests: a private `redis-server`, the real
//! `cachepol` binary, and real files.
//!
//! Each test starts its own `redis-server` on a free loopback port with no
//! persistence and stops it when done; the machine's shared instance is
//! never touched. A test that cannot start Redis fails, it never skips.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// A built component: `policies/<name>.wasm` or `tests/fixtures/<name>.wasm`.
pub fn wasm(name: &str) -> PathBuf {
    for dir in ["policies", "tests/fixtures"] {
        let path = workspace().join(dir).join(format!("{name}.wasm"));
        if path.exists() {
            return path;
        }
    }
    panic!("{name}.wasm is missing: run `cargo xtask build-policies` first");
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n: u64 = rand::random();
        let dir = std::env::temp_dir().join(format!("cachepol-e2e-{tag}-{n:x}"));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The server the tests run against: `redis-server`, or the binary named
/// by `CACHEPOL_TEST_SERVER` (`cargo xtask test` runs the end-to-end suite
/// a second time with `valkey-server`). A server that cannot be started
/// fails the test; none is ever skipped.
pub fn server_binary() -> String {
    std::env::var("CACHEPOL_TEST_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A private redis-server.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
    /// Extra `redis-server` arguments, kept for restarts.
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Start with extra arguments (later ones win: `--appendonly yes`
    /// makes a durable server, whose restarts reload its data).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        RedisServer::start_on(free_port, extra)
    }

    /// Start on a port from `port`, trying another one when the server
    /// that answers there is not ours: a port found free can be taken by a
    /// test running beside this one before `redis-server` binds it, and
    /// two tests sharing one server would kill it under each other.
    fn start_on(port: impl Fn() -> u16, extra: &[&str]) -> RedisServer {
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        for _ in 0..20 {
            let mut server =
                RedisServer { port: port(), child: None, dir: TempDir::new("redis"), extra: extra.clone() };
            match server.spawn() {
                Ok(()) => return server,
                Err(why) => eprintln!("redis-server on port {}: {why}; trying another port", server.port),
            }
        }
        panic!("redis-server did not start on any of 20 free ports");
    }

    /// Start `redis-server` on `self.port` and wait until it answers; an
    /// error when it exited (its port was taken) or another server answers.
    fn spawn(&mut self) -> Result<(), String> {
        let mut child = Command::new(server_binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .arg("--logfile")
            .arg(self.log_path())
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {} ({e}); `cargo xtask test` installs what the tests need", server_binary())
            });
        let deadline = Instant::now() + Duration::from_secs(30);
        let outcome = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break Err(format!("it exited ({status}): {}", self.log_tail(3)));
            }
            // PING fails while a durable server loads its data.
            if let Ok(mut c) = self.client().get_connection()
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
                && let Ok(info) = redis::cmd("INFO").arg("server").query::<String>(&mut c)
            {
                let pid = info.lines().find_map(|l| l.strip_prefix("process_id:")).map(str::trim);
                break match pid == Some(child.id().to_string().as_str()) {
                    true => Ok(()),
                    false => Err(format!("another server (pid {}) answers there", pid.unwrap_or("?"))),
                };
            }
            if Instant::now() > deadline {
                break Err(format!("it did not answer within 30 s: {}", self.log_tail(3)));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        match outcome {
            Ok(()) => self.child = Some(child),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        outcome
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The last `lines` lines of the server's log.
    fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    pub fn conn(&self) -> redis::Connection {
        self.client().get_connection().expect("connect to the test redis")
    }

    /// Stop the server (as a crash would: no chance to save).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port (empty, unless started durable).
    pub fn restart(&mut self) {
        self.stop();
        if let Err(why) = self.spawn() {
            panic!("redis-server did not start again on port {}: {why}", self.port);
        }
    }

    /// Run one command.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut self.conn()).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// `keys` and `expires` of db 0, from `INFO keyspace`: free for Redis
    /// to answer, unlike a `KEYS` or `TTL` loop over millions of keys.
    pub fn keyspace(&self) -> (u64, u64) {
        let info: String = self.cmd(&["INFO", "keyspace"]);
        let Some(db0) = info.lines().find_map(|l| l.strip_prefix("db0:")) else { return (0, 0) };
        let field = |name: &str| {
            db0.split(',').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok()).unwrap_or(0)
        };
        (field("keys"), field("expires"))
    }

    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = self.cmd(&["KEYS", pattern]);
        keys.sort();
        keys
    }

    pub fn exists(&self, key: &str) -> bool {
        self.cmd::<i64>(&["EXISTS", key]) == 1
    }

    /// `SCAN` commands this server ran since its stats were reset
    /// (`CONFIG RESETSTAT`).
    pub fn scan_calls(&self) -> u64 {
        let stats: String = self.cmd(&["INFO", "commandstats"]);
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_scan:calls="))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Keyspace events the `recorder` fixture named `name` handled: the sum
    /// of its instances' (its lanes') counts.
    pub fn recorded_events(&self, name: &str) -> u64 {
        let counts = self.keys(&format!("recorder:{name}:events:*"));
        counts.iter().map(|key| self.cmd::<Option<u64>>(&["GET", key]).unwrap_or(0)).sum()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A failing test shows how its server ended: a crash report, or a
        // log that simply stops where the process was killed.
        if std::thread::panicking() {
            eprintln!("--- redis-server {} log (last lines) ---\n{}", self.port, self.log_tail(20));
        }
        self.stop();
    }
}

/// The harness's own guarantee: a server that finds its port taken by
/// another test's server starts on another port instead of sharing it.
#[test]
fn a_port_taken_meanwhile_is_not_shared() {
    let first = RedisServer::start();
    let taken = std::cell::Cell::new(Some(first.port));
    let second = RedisServer::start_on(|| taken.take().unwrap_or_else(free_port), &[]);
    assert_ne!(second.port, first.port);
    second.cmd::<()>(&["SET", "only:second", "v"]);
    assert!(!first.exists("only:second"));
}

pub mod cluster;

/// A running `cachepol run`, its log captured to a file.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
    _dir: Option<TempDir>,
}

/// What a daemon runs: a policies directory and a config file.
pub struct Setup {
    pub dir: TempDir,
    pub config: String,
}

impl Setup {
    /// A policies directory holding these components (by name), and an
    /// empty config.
    pub fn new(policies: &[&str]) -> Setup {
        let dir = TempDir::new("policies");
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        for p in policies {
            std::fs::copy(wasm(p), dir.path().join("policies").join(format!("{p}.wasm"))).unwrap();
        }
        Setup { dir, config: String::new() }
    }

    /// Add a component under another file name (a second instance of a
    /// fixture with its own config section).
    pub fn with_copy(self, component: &str, as_name: &str) -> Setup {
        std::fs::copy(wasm(component), self.policies().join(format!("{as_name}.wasm"))).unwrap();
        self
    }

    pub fn config(mut self, toml: &str) -> Setup {
        self.config.push_str(toml);
        self.config.push('\n');
        self
    }

    pub fn policies(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    pub fn config_file(&self) -> PathBuf {
        let path = self.dir.path().join("cachepol.toml");
        std::fs::write(&path, &self.config).unwrap();
        path
    }
}

impl Daemon {
    /// Start the daemon against `redis` and wait until it is ready.
    pub fn start(redis: &RedisServer, setup: &Setup) -> Daemon {
        let daemon = Daemon::spawn(redis, setup, &["--configure-notifications"]);
        daemon.wait_for("cachepol ready", Duration::from_secs(60));
        daemon
    }

    /// Start without waiting, with extra arguments.
    pub fn spawn(redis: &RedisServer, setup: &Setup, extra: &[&str]) -> Daemon {
        Daemon::spawn_logging(redis, setup, extra, "info,cachepol=debug")
    }

    /// [`Daemon::spawn`] with this `RUST_LOG`.
    pub fn spawn_logging(redis: &RedisServer, setup: &Setup, extra: &[&str], rust_log: &str) -> Daemon {
        Daemon::spawn_url(&redis.url(), setup, extra, rust_log)
    }

    /// Start against `url` (a user and password in it, say).
    pub fn spawn_url(url: &str, setup: &Setup, extra: &[&str], rust_log: &str) -> Daemon {
        Daemon::spawn_env(url, setup, extra, rust_log, &[])
    }

    /// [`Daemon::spawn`] with extra environment variables (fault injection).
    pub fn spawn_with_env(redis: &RedisServer, setup: &Setup, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn_env(&redis.url(), setup, extra, "info,cachepol=debug", env)
    }

    fn spawn_env(url: &str, setup: &Setup, extra: &[&str], rust_log: &str, env: &[(&str, &str)]) -> Daemon {
        // Tests run side by side: each admin server on a port of its own
        // (see `Daemon::admin`), unless the test chose one.
        let admin: &[&str] = if extra.contains(&"--admin") { &[] } else { &["--admin", "127.0.0.1:0"] };
        let log_dir = TempDir::new("log");
        let log = log_dir.path().join("daemon.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cachepol"))
            .arg("run")
            .arg("--redis-url")
            .arg(url)
            .arg("--policies")
            .arg(setup.policies())
            .arg("--config")
            .arg(setup.config_file())
            .args(admin)
            .args(extra)
            .env("RUST_LOG", rust_log)
            .envs(env.iter().copied())
            .env_remove("REDIS_URL")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start cachepol");
        Daemon { child, log, _dir: Some(log_dir) }
    }

    /// The admin server's address, from its log line.
    pub fn admin(&self) -> String {
        self.wait_for("admin server listening", Duration::from_secs(60));
        let text = self.log_text();
        let line = text.lines().find(|l| l.contains("admin server listening")).unwrap();
        line.split("http://").nth(1).unwrap().split_whitespace().next().unwrap().to_owned()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the log has a line containing `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(f) = std::fs::File::open(&self.log)
                && BufReader::new(f).lines().map_while(Result::ok).any(|l| l.contains(needle))
            {
                return;
            }
            assert!(Instant::now() < deadline, "no {needle:?} in the daemon log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// SIGTERM, then wait; returns the exit code.
    pub fn stop(mut self) -> Option<i32> {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "cachepol did not stop on SIGTERM:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait for the process to exit by itself; returns the exit code and
    /// the log.
    pub fn wait_exit(mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), self.log_text());
            }
            assert!(Instant::now() < deadline, "cachepol did not exit:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid` in KiB, from /proc (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Poll `check` until it holds, or fail with `what` and the daemon log.
pub fn eventually(daemon: &Daemon, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}\n--- daemon log ---\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A `cachepol` command against `redis`: whether it succeeded, and what it
/// printed (stdout, then stderr).
pub fn cli(redis: &RedisServer, args: &[&str]) -> (bool, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_cachepol")).args(args).args(["--redis-url", &redis.url()]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `cachepol status` of the daemon whose admin server is at `admin`: the
/// table it printed.
pub fn status_table(admin: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cachepol")).args(["status", "--admin", admin]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cachepol acl` for `url`, loading `setup`'s policies and config, with
/// `extra` arguments; what it printed and how it ended.
pub fn acl(url: &str, setup: &Setup, extra: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cachepol"))
        .args(["acl", "--redis-url", url])
        .args(extra)
        .arg("--policies")
        .arg(setup.policies())
        .arg("--config")
        .arg(setup.config_file())
        .output()
        .unwrap()
}

/// `cachepol deploy` against `redis`; returns the entry id.
pub fn deploy(redis: &RedisServer, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cachepol"))
        .arg("deploy")
        .arg("--redis-url")
        .arg(redis.url())
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "cachepol deploy failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The recorder component with its build stamp set to `n` (a distinct
/// version without rebuilding).
pub fn stamped(n: u32) -> Vec<u8> {
    let mut bytes = std::fs::read(wasm("recorder")).unwrap();
    let marker = b"RECORDER-STAMP:";
    let at = bytes.windows(marker.len()).position(|w| w == marker).expect("the recorder has a stamp") + marker.len();
    bytes[at..at + 8].copy_from_slice(format!("{n:08}").as_bytes());
    bytes
}

/// Install the recommended way: a hidden temporary file, then a rename.
pub fn install(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{name}.wasm"))).unwrap();
}

/// Deploy hooks read by the group but not acknowledged.
pub fn pending(redis: &RedisServer) -> usize {
    let entries: Vec<redis::Value> = redis.cmd(&["XPENDING", "cachepol:deploys", "cachepol", "-", "+", "100"]);
    entries.len()
}

/// The reasons of the dead-lettered hooks, in order.
pub fn dead_letters(redis: &RedisServer) -> Vec<String> {
    let reply: redis::streams::StreamRangeReply = redis.cmd(&["XRANGE", "cachepol:deploys:dead", "-", "+"]);
    reply.ids.iter().map(|e| e.get::<String>("reason").unwrap_or_default()).collect()
}

/// One HTTP/1.1 request to `addr`; returns the status code and the body.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(request.as_bytes()).unwrap();
    // The server may answer (413, 401) and close before the whole body is sent.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

/// The value of one sample in a `/metrics` text, 0 if absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
