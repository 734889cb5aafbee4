//! A private Redis Cluster: `redis-server --cluster-enabled yes` nodes on
//! free loopback ports (each with its cluster bus on port + 10000), joined
//! by `redis-cli --cluster create`, stopped when dropped.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use cachepol::store::target::{Node, parse_slots, slot};

use super::{Daemon, RedisServer, Setup, free_port};

pub struct Cluster {
    /// Every node, primaries and replicas, in the order created.
    pub nodes: Vec<RedisServer>,
}

/// A port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55535 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

impl Cluster {
    /// `primaries` primaries, each with `replicas` replicas; returns once
    /// every node says the cluster is ok and every replica is in sync.
    pub fn start(primaries: usize, replicas: usize) -> Cluster {
        Cluster::start_with(primaries, replicas, &[])
    }

    /// [`Cluster::start`] with extra `redis-server` arguments for every
    /// node (`--appendonly yes`: nodes restarted in place keep their data).
    pub fn start_with(primaries: usize, replicas: usize, extra: &[&str]) -> Cluster {
        let mut args =
            vec!["--cluster-enabled", "yes", "--cluster-node-timeout", "1000", "--cluster-config-file", "nodes.conf"];
        args.extend(extra);
        let nodes: Vec<RedisServer> =
            (0..primaries * (1 + replicas)).map(|_| RedisServer::start_on(cluster_port, &args)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli is required for the cluster tests");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = Cluster { nodes };
        cluster.wait_until("the cluster is ok with every replica in sync", |c| c.ok(primaries));
        cluster
    }

    /// Every running node says the cluster is ok and its replicas are in
    /// sync, with `primaries` primaries.
    pub fn ok(&self, primaries: usize) -> bool {
        self.running().all(|n| {
            let info: String = n.cmd(&["CLUSTER", "INFO"]);
            let replication: String = n.cmd(&["INFO", "replication"]);
            info.contains("cluster_state:ok")
                && (replication.contains("role:master") || replication.contains("master_link_status:up"))
        }) && self.primaries().len() == primaries
    }

    /// `redis+cluster://` with one seed.
    pub fn url(&self) -> String {
        format!("redis+cluster://127.0.0.1:{}", self.running().next().expect("a node runs").port)
    }

    /// `redis+cluster://user:password@...`.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        self.url().replace("redis+cluster://", &format!("redis+cluster://{user}:{password}@"))
    }

    /// Run `args` on every running node.
    pub fn on_every_node(&self, args: &[&str]) {
        for node in self.running() {
            node.cmd::<redis::Value>(args);
        }
    }

    fn running(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|n| n.child.is_some())
    }

    /// The primaries serving slots, as a running node sees them.
    pub fn primaries(&self) -> Vec<Node> {
        for node in self.running() {
            if let Ok(reply) = redis::cmd("CLUSTER").arg("SLOTS").query::<redis::Value>(&mut node.conn()) {
                return parse_slots(&reply);
            }
        }
        Vec::new()
    }

    /// The running node serving `key`'s slot.
    pub fn node_of(&self, key: &str) -> &RedisServer {
        let slot = slot(key.as_bytes());
        let primary = self
            .primaries()
            .into_iter()
            .find(|n| n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .unwrap_or_else(|| panic!("no primary serves slot {slot}"));
        self.by_port(primary.port)
    }

    pub fn by_port(&self, port: u16) -> &RedisServer {
        self.nodes.iter().find(|n| n.port == port).expect("a node of this cluster")
    }

    pub fn by_port_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes.iter_mut().find(|n| n.port == port).expect("a node of this cluster")
    }

    /// Run a command on `key`'s node.
    pub fn cmd<T: redis::FromRedisValue>(&self, key: &str, args: &[&str]) -> T {
        self.node_of(key).cmd(args)
    }

    pub fn set(&self, key: &str, value: &str) {
        self.cmd::<()>(key, &["SET", key, value]);
    }

    pub fn exists(&self, key: &str) -> bool {
        self.cmd::<i64>(key, &["EXISTS", key]) == 1
    }

    /// The keys matching `pattern` on every primary, sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = self.primaries().iter().flat_map(|p| self.by_port(p.port).keys(pattern)).collect();
        keys.sort();
        keys
    }

    /// [`RedisServer::recorded_events`] over the whole cluster.
    pub fn recorded_events(&self, name: &str) -> u64 {
        let counts = self.keys(&format!("recorder:{name}:events:*"));
        counts.iter().map(|key| self.cmd::<Option<u64>>(key, &["GET", key]).unwrap_or(0)).sum()
    }

    /// Wait (30 s at most) until `check` holds.
    pub fn wait_until(&self, what: &str, check: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check(self) {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A `cachepol` daemon on this cluster, ready.
    pub fn daemon(&self, setup: &Setup) -> Daemon {
        self.daemon_at(&self.url(), setup, &["--configure-notifications"])
    }

    /// A `cachepol` daemon on `url` (one of this cluster's), ready.
    pub fn daemon_at(&self, url: &str, setup: &Setup, extra: &[&str]) -> Daemon {
        let daemon = Daemon::spawn_url(url, setup, extra, "info,cachepol=debug");
        daemon.wait_for("cachepol ready", Duration::from_secs(60));
        daemon
    }

    /// A `cachepol` command against this cluster.
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_cachepol"))
            .args(args)
            .args(["--redis-url", &self.url()])
            .output()
            .expect("run cachepol");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }
}
