//! Which Redis the daemon speaks to: one server, or a Redis Cluster.
//!
//! `redis://` and `rediss://` URLs name one server; `redis+cluster://`
//! and `rediss+cluster://` name a cluster by one or more of its nodes
//! (`redis+cluster://[user:pass@]host:port[,host:port...]`), with AUTH
//! and TLS as for one server.
//!
//! Everything above this module holds a [`Conn`]: one self-reconnecting
//! multiplexed connection on a single server, redis-rs's cluster client
//! (which routes each command by its key's slot, follows `MOVED` and `ASK`,
//! and refreshes its slot map) on a cluster. What the cluster client does
//! not do is here too: the list of primaries ([`RedisTarget::primaries`]),
//! for the per-node work no cluster client routes (keyspace subscriptions,
//! `SCAN`), a plain connection to one node ([`RedisTarget::node`]), and a
//! [`TopologyHint`] raised by any reply saying the layout changed, so that
//! the subscriptions follow a failover at once rather than at their next
//! periodic read.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisError, RedisFuture, ServerErrorKind,
    Value,
};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a command may wait for its reply (a bulk page or a blocking
/// stream read take a while; a dead peer must not hang a call forever).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// A bad Redis URL.
#[derive(Debug, thiserror::Error)]
#[error("invalid Redis URL `{url}`: {reason}")]
pub struct UrlError {
    pub url: String,
    pub reason: String,
}

/// One server or a cluster, as the URL says. (One per daemon, cloned for
/// each bulk operation at most: the size of a `Client` is no concern.)
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum RedisTarget {
    Single(Client),
    Cluster(ClusterTarget),
}

/// A cluster: its seed nodes, and how to reach any node (AUTH, TLS).
#[derive(Clone, Debug)]
pub struct ClusterTarget {
    seeds: Vec<ConnectionInfo>,
    /// Shared by every connection made from this target.
    hint: TopologyHint,
}

/// Raised when a reply says the cluster's layout changed under a command:
/// its slot moved (`MOVED`, `ASK`, `TRYAGAIN`), the cluster or the slot's
/// primary is down (`CLUSTERDOWN`, `MASTERDOWN`), or a node cannot be
/// reached. The cluster client follows redirections itself and says
/// nothing; the keyspace subscriptions, which it does not keep, wait on
/// this to read the topology again at once.
#[derive(Clone, Debug, Default)]
pub struct TopologyHint(Arc<tokio::sync::Notify>);

impl TopologyHint {
    /// Raise the hint if `e` says the topology changed.
    pub fn saw(&self, e: &RedisError) {
        if Self::telling(e) {
            self.0.notify_one();
        }
    }

    fn telling(e: &RedisError) -> bool {
        e.is_cluster_error()
            || matches!(e.kind(), ErrorKind::Server(ServerErrorKind::MasterDown) | ErrorKind::ClusterConnectionNotFound)
            || e.is_connection_dropped()
            || e.is_connection_refusal()
    }

    /// Wait until raised (a hint raised while nobody waited is kept, once).
    pub async fn raised(&self) {
        self.0.notified().await;
    }
}

/// A primary of the cluster and the slot ranges it serves.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Node {
    /// `host:port`, as the cluster announces it.
    pub addr: String,
    pub host: String,
    pub port: u16,
    /// Inclusive ranges.
    pub slots: Vec<(u16, u16)>,
}

impl Node {
    /// The shard this node serves, named by its first slot: a replica
    /// promoted in its place serves the same slots, so the same shard.
    pub fn shard(&self) -> u16 {
        self.slots.first().map_or(0, |(start, _)| *start)
    }
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

impl RedisTarget {
    /// Parse a URL (see the module doc).
    pub fn parse(url: &str) -> Result<RedisTarget, UrlError> {
        let bad = |reason: String| UrlError { url: url.to_string(), reason };
        let cluster =
            ["redis+cluster://", "rediss+cluster://"].iter().find_map(|p| url.strip_prefix(p).map(|r| (*p, r)));
        let Some((scheme, rest)) = cluster else {
            return Client::open(url).map(RedisTarget::Single).map_err(|e| bad(e.to_string()));
        };
        let plain = scheme.replace("+cluster", "");
        // `user:pass@` applies to every host; a path (a database) does not
        // exist in a cluster.
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((auth, hosts)) => (format!("{auth}@"), hosts),
            None => (String::new(), rest),
        };
        let hosts = hosts.trim_end_matches('/');
        if hosts.contains('/') {
            return Err(bad("a cluster has only database 0: leave the path out".into()));
        }
        let seeds = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|host| format!("{plain}{auth}{host}").into_connection_info().map_err(|e| bad(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        if seeds.is_empty() {
            return Err(bad("name at least one node: redis+cluster://host:port[,host:port...]".into()));
        }
        Ok(RedisTarget::Cluster(ClusterTarget { seeds, hint: TopologyHint::default() }))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster(_))
    }

    /// The cluster's [`TopologyHint`] (`None` on a single server).
    pub fn topology_hint(&self) -> Option<&TopologyHint> {
        match self {
            RedisTarget::Single(_) => None,
            RedisTarget::Cluster(cluster) => Some(&cluster.hint),
        }
    }

    /// Raise the topology hint if `e`, from a command sent to one of the
    /// cluster's nodes, says the topology changed.
    pub fn saw(&self, e: &RedisError) {
        if let Some(hint) = self.topology_hint() {
            hint.saw(e);
        }
    }

    /// The database keyspace events come from (always 0 on a cluster).
    pub fn db(&self) -> u32 {
        match self {
            RedisTarget::Single(client) => {
                u32::try_from(client.get_connection_info().redis_settings().db()).unwrap_or(0)
            }
            RedisTarget::Cluster(_) => 0,
        }
    }

    /// A self-reconnecting connection for commands.
    pub async fn connect(&self) -> redis::RedisResult<Conn> {
        match self {
            RedisTarget::Single(client) => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_max_delay(Duration::from_secs(5));
                Ok(Conn::Single(ConnectionManager::new_with_config(client.clone(), config).await?))
            }
            RedisTarget::Cluster(cluster) => {
                let first = &cluster.seeds[0];
                let mut builder = ClusterClientBuilder::new(cluster.seeds.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    // A failover takes seconds: retry through it, but give
                    // the caller an answer within about ten.
                    .retries(6)
                    .min_retry_wait(100)
                    .max_retry_wait(2000);
                if let Some(user) = first.redis_settings().username() {
                    builder = builder.username(user);
                }
                if let Some(password) = first.redis_settings().password() {
                    builder = builder.password(password);
                }
                if let ConnectionAddr::TcpTls { insecure, .. } = first.addr() {
                    // `#insecure` on the URL: no certificate check, as for
                    // one server.
                    let mode = if *insecure { redis::TlsMode::Insecure } else { redis::TlsMode::Secure };
                    builder = builder.tls(mode);
                }
                let client = builder.build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?, cluster.hint.clone()))
            }
        }
    }

    /// The client for one node at `host:port` (a cluster's primary), with
    /// this target's AUTH and TLS (`None`: the first seed); on a single
    /// server, that server.
    pub fn node(&self, node: Option<&Node>) -> redis::RedisResult<Client> {
        match (self, node) {
            (RedisTarget::Single(client), _) => Ok(client.clone()),
            (RedisTarget::Cluster(cluster), Some(node)) => {
                let seed = cluster.seeds[0].clone();
                let addr = match seed.addr() {
                    ConnectionAddr::TcpTls { insecure, tls_params, .. } => ConnectionAddr::TcpTls {
                        host: node.host.clone(),
                        port: node.port,
                        insecure: *insecure,
                        tls_params: tls_params.clone(),
                    },
                    _ => ConnectionAddr::Tcp(node.host.clone(), node.port),
                };
                Client::open(seed.set_addr(addr))
            }
            (RedisTarget::Cluster(cluster), None) => Client::open(cluster.seeds[0].clone()),
        }
    }

    /// The primaries serving slots now, sorted by address; on a single
    /// server, none (it is its own only node).
    pub async fn primaries(&self, conn: &mut Conn) -> redis::RedisResult<Vec<Node>> {
        if !self.is_cluster() {
            return Ok(Vec::new());
        }
        let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
        Ok(parse_slots(&reply))
    }
}

/// Parse `CLUSTER SLOTS`: `[[start, end, [host, port, id, ...], replicas...], ...]`,
/// one entry per primary (merging its ranges).
pub fn parse_slots(reply: &Value) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    let Value::Array(ranges) = reply else { return nodes };
    for range in ranges {
        let Value::Array(fields) = range else { continue };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        let host = match primary.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = primary.get(1) else { continue };
        // An empty host means "the address you reached me by", which a
        // cluster announces only when it has one node in it.
        if host.is_empty() || host == "?" {
            continue;
        }
        let port = *port as u16;
        let addr = format!("{host}:{port}");
        let slots = (*start as u16, *end as u16);
        match nodes.iter_mut().find(|n| n.addr == addr) {
            Some(node) => node.slots.push(slots),
            None => nodes.push(Node { addr, host, port, slots: vec![slots] }),
        }
    }
    for node in &mut nodes {
        node.slots.sort_unstable();
    }
    nodes.sort();
    nodes
}

/// The cluster slot of `key` (CRC16 of its hash tag, or of the whole key).
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter().position(|b| *b == b'}').filter(|close| *close > 0).map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS
}

/// Split `keys` into groups of one slot each (a multi-key command on a
/// cluster takes keys of one slot only), keeping their order within each.
pub fn by_slot<K: AsRef<[u8]>>(keys: &[K]) -> Vec<Vec<&K>> {
    let mut groups: std::collections::BTreeMap<u16, Vec<&K>> = std::collections::BTreeMap::new();
    for key in keys {
        groups.entry(slot(key.as_ref())).or_default().push(key);
    }
    groups.into_values().collect()
}

/// A connection for commands: to one server, or through the cluster client.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    /// The cluster client, and the hint its errors raise.
    Cluster(ClusterConnection, TopologyHint),
}

impl Conn {
    /// Send `pipe` to the node serving `slot` and return every reply (none
    /// ignored). The cluster client would route a pipeline by its first
    /// keyed command, and takes a `PUBLISH`'s channel for a key: this
    /// sends commands that must run on one node, in order, whatever their
    /// arguments hash to.
    pub async fn pipeline_on_slot(&mut self, pipe: &redis::Pipeline, slot: u16) -> redis::RedisResult<Vec<Value>> {
        let count = pipe.cmd_iter().count();
        match self {
            Conn::Single(c) => c.req_packed_commands(pipe, 0, count).await,
            Conn::Cluster(c, hint) => {
                use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
                let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
                c.route_pipeline(pipe.clone(), 0, count, route).await.inspect_err(|e| hint.saw(e))
            }
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c, hint) => {
                Box::pin(async move { c.req_packed_command(cmd).await.inspect_err(|e| hint.saw(e)) })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c, hint) => {
                Box::pin(async move { c.req_packed_commands(cmd, offset, count).await.inspect_err(|e| hint.saw(e)) })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(..) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags_as_redis_does() {
        // Values from the Redis Cluster specification's examples and
        // `CLUSTER KEYSLOT` on redis-server 7.0.
        assert_eq!(slot(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"), "an empty tag hashes the whole key");
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"{cachepol}:deploys"), slot(b"{cachepol}:control:disabled"));
    }

    #[test]
    fn cluster_urls_name_every_seed_with_the_same_auth() {
        let RedisTarget::Cluster(c) = RedisTarget::parse("redis+cluster://u:p@127.0.0.1:7000,127.0.0.1:7001").unwrap()
        else {
            panic!("a cluster URL")
        };
        assert_eq!(c.seeds.len(), 2);
        assert!(
            c.seeds
                .iter()
                .all(|s| s.redis_settings().username() == Some("u") && s.redis_settings().password() == Some("p"))
        );
        assert!(matches!(c.seeds[1].addr(), ConnectionAddr::Tcp(h, 7001) if h == "127.0.0.1"));
        assert!(!RedisTarget::parse("redis://127.0.0.1:6379/2").unwrap().is_cluster());
        assert!(RedisTarget::parse("redis+cluster://").is_err());
        assert!(RedisTarget::parse("redis+cluster://h:1/3").unwrap_err().to_string().contains("database 0"));
    }

    #[test]
    fn cluster_slots_are_read_per_primary() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node("127.0.0.1", 7001), node("127.0.0.1", 7004)]),
            Value::Array(vec![Value::Int(0), Value::Int(5460), node("127.0.0.1", 7000)]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node("127.0.0.1", 7000)]),
        ]);
        let nodes = parse_slots(&reply);
        assert_eq!(nodes.iter().map(|n| n.addr.as_str()).collect::<Vec<_>>(), ["127.0.0.1:7000", "127.0.0.1:7001"]);
        assert_eq!(nodes[0].slots, [(0, 5460), (10923, 16383)]);
    }

    #[test]
    fn replies_saying_the_layout_changed_raise_the_topology_hint() {
        use futures_util::FutureExt;
        let hint = TopologyHint::default();
        let raised = |hint: &TopologyHint| hint.raised().now_or_never().is_some();
        let server = |kind: ServerErrorKind, text: &'static str| RedisError::from((ErrorKind::Server(kind), text));
        hint.saw(&server(ServerErrorKind::ResponseError, "WRONGTYPE"));
        hint.saw(&server(ServerErrorKind::CrossSlot, "CROSSSLOT"));
        assert!(!raised(&hint), "a command's own fault says nothing of the topology");
        hint.saw(&server(ServerErrorKind::Moved, "MOVED 3999 127.0.0.1:7001"));
        hint.saw(&server(ServerErrorKind::ClusterDown, "CLUSTERDOWN"));
        assert!(raised(&hint));
        assert!(!raised(&hint), "raised hints are taken once, however many replies said it");
        for e in [
            server(ServerErrorKind::MasterDown, "MASTERDOWN"),
            server(ServerErrorKind::Ask, "ASK 3999 127.0.0.1:7002"),
            RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        ] {
            hint.saw(&e);
            assert!(raised(&hint), "{e}");
        }
        let single = RedisTarget::parse("redis://127.0.0.1:1").unwrap();
        assert!(single.topology_hint().is_none(), "one server has no topology to follow");
    }

    #[test]
    fn keys_are_grouped_by_slot() {
        let keys = ["{a}1", "b", "{a}2"];
        let groups = by_slot(&keys);
        assert_eq!(groups.len(), 2);
        assert!(groups.iter().any(|g| g.len() == 2 && *g[0] == "{a}1" && *g[1] == "{a}2"));
    }
}
