//! `cachepol acl`: the Redis ACL rule that lets the daemon do exactly what
//! its loaded policies may, and nothing else.
//!
//! Grants are checked by the host before anything reaches Redis; this is
//! the second wall, enforced by Redis itself, for the day the first one has
//! a bug. The rule allows:
//! - the commands the daemon sends (the restricted policy API, the deploy
//!   stream, the keyspace subscription, connection set-up), and no others:
//!   no `KEYS`, `FLUSH*`, `CONFIG SET` (unless the daemon is to set
//!   `notify-keyspace-events` itself), `DEBUG`, ...;
//! - each policy grant's key pattern, read-only (`%R~`), write-only (`%W~`)
//!   or both (`~`) as its operations need, plus the deploy stream, its
//!   dead-letter stream, the kill switch's set (read-only), and the keys
//!   the subscriber probes the notification flags with (write-only);
//! - the one pub/sub pattern the daemon subscribes to, and the channels of
//!   its echo fences (which it publishes to and subscribes to itself).

use std::collections::BTreeSet;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cachepol::config::DeployConfig;
use cachepol::dispatch::reload::policy_files;
use cachepol::fake::FakeRedis;
use cachepol::intake::notify::PROBE_PREFIX;
use cachepol::sandbox::runtime::{Runtime, RuntimeConfig, content_hash};
use cachepol::wit::KeyOps;
use clap::Args;

use super::PolicySetArgs;

pub const AFTER_HELP: &str = "Examples:
  cachepol acl --redis-url redis://cachepol:s3cret@cache:6379 --policies /srv/cachepol/policies
  cachepol acl --config /etc/cachepol.toml | redis-cli -h cache --user default --pass ...

Loads every policy in the directory with its config section (as `cachepol run` would) and prints
one `ACL SETUSER` line: the commands the daemon sends and no others, each grant's key pattern
(read-only, write-only or both), the deploy streams and the keyspace-notification channel.
The user and password come from the Redis URL (or --user/--password). Run the daemon as that user.";

#[derive(Args)]
pub struct AclArgs {
    #[command(flatten)]
    set: PolicySetArgs,
    /// The ACL user (default: the Redis URL's user, else `cachepol`).
    #[arg(long)]
    user: Option<String>,
    /// The user's password (default: the Redis URL's password).
    #[arg(long)]
    password: Option<String>,
}

/// Load the policies as `cachepol run` would and print their rule.
pub async fn run(args: AclArgs) -> Result<ExitCode> {
    let config = args.set.load()?;
    let target = cachepol::store::target::RedisTarget::parse(&config.redis_url)?;
    let client = target.node(None)?;
    let settings = client.get_connection_info().redis_settings();
    let user = args.user.or_else(|| settings.username().map(str::to_owned)).unwrap_or_else(|| "cachepol".into());
    let Some(password) = args.password.or_else(|| settings.password().map(str::to_owned)) else {
        bail!("no password: give --password, or a Redis URL with one (redis://{user}:PASSWORD@host)");
    };
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let backend = Arc::new(FakeRedis::new().client("acl"));
    let mut grants = Vec::new();
    let files =
        policy_files(&config.policies_dir).with_context(|| format!("cannot list {}", config.policies_dir.display()))?;
    for path in &files {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let section = config.policy(&stem);
        let options = config.load_options(&stem, &section);
        // Through the daemon's compile cache: what `run` compiled is reused.
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let hash = content_hash(&bytes);
        let (compiled, _) =
            runtime.compile_cached(&bytes, &hash, &config.cache_dir).with_context(|| path.display().to_string())?;
        let policy =
            runtime.load(&compiled, backend.clone(), &options).await.with_context(|| path.display().to_string())?;
        grants.extend(policy.grants().rules().iter().map(|r| (r.pattern.as_str().to_owned(), r.ops)));
    }
    let request = AclRequest {
        user: &user,
        password: &password,
        db: u32::try_from(settings.db()).unwrap_or(0),
        deploy: &config.deploy,
        control_key: &config.control_key,
        sweep_key: &config.sweep_key,
        walks_key: &config.walks_key,
        lease_key: &config.replicas.lease_key,
        replicas: config.replicas.enabled,
        configure_notifications: config.configure_notifications,
        cluster: target.is_cluster(),
        grants,
    };
    if request.cluster {
        eprintln!(
            "# Redis Cluster: ACL users are per node. Apply this rule on every node, primaries and replicas (a replica promoted later needs it too), e.g. with `redis-cli -h HOST -p PORT` for each."
        );
    }
    println!("{}", render(&setuser_args(&request)));
    Ok(ExitCode::SUCCESS)
}

/// Commands for the restricted policy API, host-side bulk operations and
/// locks (the release script runs through `EVALSHA`, loaded on first use).
const POLICY_COMMANDS: &[&str] = &[
    "get",
    "mget",
    "exists",
    "pttl",
    "type",
    "scan",
    "set",
    "unlink",
    "pexpire",
    "persist",
    "evalsha",
    "eval",
    "script|load",
];
/// Commands for the deploy-hook stream and its dead letters.
/// (`xlen`, `xinfo|groups`, `xrange`, `xtrim`: trimming that keeps hooks
/// not yet handled, in the publish script; `get`/`set`: hook ids.)
const STREAM_COMMANDS: &[&str] = &[
    "xgroup|create",
    "xreadgroup",
    "xautoclaim",
    "xclaim",
    "xpending",
    "xack",
    "xadd",
    "xlen",
    "xinfo|groups",
    "xrange",
    "xtrim",
];
/// Connection set-up, health checks, the subscription, and reading
/// `notify-keyspace-events`. (redis-rs also sends `CLIENT SETINFO`, which
/// Redis 7.0 does not know and 7.2 may refuse: it ignores the answer.)
const CONNECTION_COMMANDS: &[&str] = &[
    "hello",
    "auth",
    "ping",
    "select",
    "psubscribe",
    "punsubscribe",
    "subscribe",
    "unsubscribe",
    "publish",
    "config|get",
    "smembers",
    // Sweep requests (`cachepol sweep`; the runner records itself), and
    // `/status`'s view of Redis.
    "hgetall",
    "hset",
    "info",
    // The keyspace's size, for the progress of sliced sweeps and hooks.
    "dbsize",
];

/// What the rule is for.
pub struct AclRequest<'a> {
    pub user: &'a str,
    pub password: &'a str,
    pub db: u32,
    pub deploy: &'a DeployConfig,
    /// The kill switch's set, which the daemon reads.
    pub control_key: &'a str,
    /// The sweep requests' hash, which the daemon reads and answers.
    pub sweep_key: &'a str,
    /// Where sliced sweeps and hooks stopped, which the daemon keeps.
    pub walks_key: &'a str,
    /// `[replicas] lease_key`: the daemons alive on this Redis are counted
    /// in a sorted set under it (`ZADD`, `ZREM`, `ZREMRANGEBYSCORE`, `ZRANGE`,
    /// `TIME` in a script), replicas or not.
    pub lease_key: &'a str,
    /// Replicas share the keyspace-event lease (the default): its scripts
    /// `GET`, `SET`, `PEXPIRE`, `INCR` its token and `UNLINK` it on release.
    pub replicas: bool,
    /// The daemon sets `notify-keyspace-events` itself.
    pub configure_notifications: bool,
    /// A Redis Cluster: the clients read its topology (`CLUSTER SLOTS`).
    pub cluster: bool,
    /// Every loaded policy's effective grants (after the operator's
    /// narrowing).
    pub grants: Vec<(String, KeyOps)>,
}

/// The key permission a grant needs: `%R~`, `%W~` or `~`.
pub fn key_rule(pattern: &str, ops: KeyOps) -> String {
    let any = |flags: &[KeyOps]| flags.iter().any(|f| ops.contains(*f));
    let reads = any(&[KeyOps::READ, KeyOps::LOCK]);
    let writes = any(&[KeyOps::WRITE, KeyOps::DELETE, KeyOps::EXPIRE, KeyOps::LOCK]);
    match (reads, writes) {
        (true, false) => format!("%R~{pattern}"),
        (false, true) => format!("%W~{pattern}"),
        _ => format!("~{pattern}"),
    }
}

/// The arguments of `ACL SETUSER`.
pub fn setuser_args(req: &AclRequest<'_>) -> Vec<String> {
    let mut args = vec![req.user.to_owned(), "reset".into(), "on".into(), format!(">{}", req.password)];
    args.push("resetchannels".into());
    args.push(format!("&__keyevent@{}__:*", req.db));
    // The echo ledger's fences (see `store::echo`), one channel per daemon.
    args.push("&cachepol:fence:*".into());
    let lease = format!("{}:db{}", cachepol_guest_sdk::glob::escape(req.lease_key), req.db);
    // Replicas splitting a cluster announce their writes to each other.
    if req.replicas && req.cluster {
        args.push(format!("&{lease}:echo"));
    }
    args.push("-@all".into());
    let mut commands: Vec<&str> = [POLICY_COMMANDS, STREAM_COMMANDS, CONNECTION_COMMANDS].concat();
    if req.configure_notifications {
        commands.push("config|set");
    }
    // The daemons alive (and the replicas splitting a cluster's shards),
    // scored by Redis's clock; the take script reads it too.
    commands.extend(["zadd", "zrem", "zremrangebyscore", "zrange", "time"]);
    if req.replicas {
        commands.push("incr");
    }
    if req.cluster {
        commands.push("cluster|slots");
    }
    args.extend(commands.iter().map(|c| format!("+{c}")));
    let mut seen = BTreeSet::new();
    let keys = [
        key_rule(&cachepol_guest_sdk::glob::escape(&req.deploy.stream), KeyOps::READ | KeyOps::WRITE),
        // Hook ids published and handled (`<stream>:id:*`, `<stream>:done:*`).
        key_rule(&format!("{}:*", cachepol_guest_sdk::glob::escape(&req.deploy.stream)), KeyOps::READ | KeyOps::WRITE),
        key_rule(&cachepol_guest_sdk::glob::escape(&req.deploy.dead_letter), KeyOps::WRITE),
        key_rule(&cachepol_guest_sdk::glob::escape(req.control_key), KeyOps::READ),
        key_rule(&cachepol_guest_sdk::glob::escape(req.sweep_key), KeyOps::READ | KeyOps::WRITE),
        key_rule(&format!("{}:*", cachepol_guest_sdk::glob::escape(req.walks_key)), KeyOps::READ | KeyOps::WRITE),
        // The probes of the notification flags (`A` hides `n`).
        key_rule(&format!("{PROBE_PREFIX}*"), KeyOps::WRITE),
    ]
    .into_iter()
    // The daemons alive; with replicas, the lease (`<key>:db<N>`) and its
    // token counter (`<key>:db<N>:token`), exactly, and on a cluster each
    // shard's lease and token and the members.
    .chain(
        std::iter::once(format!("{lease}:daemons"))
            .chain(req.replicas.then(|| [format!("{lease}:token"), lease.clone()]).into_iter().flatten())
            .chain((req.replicas && req.cluster).then(|| format!("{lease}:*")))
            .map(|key| key_rule(&key, KeyOps::READ | KeyOps::WRITE)),
    )
    .chain(req.grants.iter().map(|(pattern, ops)| key_rule(pattern, *ops)));
    args.extend(keys.filter(|k| seen.insert(k.clone())));
    args
}

/// One `redis-cli` line: arguments with spaces or quotes are quoted.
pub fn render(args: &[String]) -> String {
    let mut line = String::from("ACL SETUSER");
    for arg in args {
        line.push(' ');
        if arg.is_empty() || arg.chars().any(|c| c.is_whitespace() || c == '"' || c == '\'') {
            line.push('"');
            for c in arg.chars() {
                if matches!(c, '"' | '\\') {
                    line.push('\\');
                }
                line.push(c);
            }
            line.push('"');
        } else {
            line.push_str(arg);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_permissions_follow_the_operations() {
        assert_eq!(key_rule("last_updated:*", KeyOps::READ), "%R~last_updated:*");
        assert_eq!(key_rule("graph_data:*", KeyOps::DELETE), "%W~graph_data:*");
        assert_eq!(key_rule("job:*", KeyOps::READ | KeyOps::EXPIRE), "~job:*");
        assert_eq!(key_rule("lock:*", KeyOps::LOCK), "~lock:*", "releasing a lock reads it");
    }

    #[test]
    fn the_rule_names_commands_keys_and_the_channel() {
        let deploy = DeployConfig::default();
        let req = AclRequest {
            user: "cachepol",
            password: "s3cret",
            db: 2,
            deploy: &deploy,
            control_key: "cachepol:control:disabled",
            sweep_key: "cachepol:control:sweeps",
            walks_key: "cachepol:walks",
            lease_key: "cachepol:lease:events",
            replicas: false,
            configure_notifications: false,
            cluster: false,
            grants: vec![("quiz:*".into(), KeyOps::DELETE), ("quiz:*".into(), KeyOps::DELETE)],
        };
        let args = setuser_args(&req);
        assert_eq!(
            &args[..8],
            ["cachepol", "reset", "on", ">s3cret", "resetchannels", "&__keyevent@2__:*", "&cachepol:fence:*", "-@all"]
        );
        assert!(args.contains(&"+unlink".to_owned()) && args.contains(&"+xreadgroup".to_owned()));
        assert!(!args.iter().any(|a| a == "+config|set" || a == "+keys" || a == "+flushall"));
        assert_eq!(args.iter().filter(|a| *a == "%W~quiz:*").count(), 1, "duplicates folded");
        assert!(
            args.contains(&"~cachepol:deploys".to_owned()) && args.contains(&"%W~cachepol:deploys:dead".to_owned())
        );
        assert!(args.contains(&"%R~cachepol:control:disabled".to_owned()));
        assert!(args.contains(&"%W~cachepol:probe:*".to_owned()), "the flags' probes");
        assert!(!args.contains(&"+incr".to_owned()), "no lease, no INCR");
        assert!(args.contains(&"~cachepol:lease:events:db2:daemons".to_owned()), "the daemons alive, replicas or not");
        assert!(args.contains(&"+zadd".to_owned()) && args.contains(&"+zrange".to_owned()));
        let with_lease = setuser_args(&AclRequest { replicas: true, grants: req.grants.clone(), ..req });
        assert!(with_lease.contains(&"+incr".to_owned()) && !with_lease.contains(&"+del".to_owned()));
        assert!(with_lease.contains(&"~cachepol:lease:events:db2".to_owned()), "{with_lease:?}");
        assert!(with_lease.contains(&"~cachepol:lease:events:db2:token".to_owned()), "{with_lease:?}");
        let on_cluster = setuser_args(&AclRequest {
            lease_key: "{cachepol}:lease:events",
            replicas: true,
            cluster: true,
            grants: req.grants.clone(),
            ..req
        });
        for command in ["+cluster|slots", "+zadd", "+zremrangebyscore", "+time"] {
            assert!(on_cluster.contains(&command.to_owned()), "{command} in {on_cluster:?}");
        }
        assert!(
            on_cluster.contains(&"~{cachepol}:lease:events:db2:*".to_owned()),
            "each shard's lease: {on_cluster:?}"
        );
        assert!(on_cluster.contains(&"&{cachepol}:lease:events:db2:echo".to_owned()), "{on_cluster:?}");
        let with_set = setuser_args(&AclRequest { configure_notifications: true, ..req });
        assert!(with_set.contains(&"+config|set".to_owned()));
    }

    #[test]
    fn rendering_quotes_what_redis_cli_would_split() {
        let args = vec!["u".to_owned(), ">pass word".to_owned(), "~a\\*b".to_owned(), "~say\"hi\"".to_owned()];
        assert_eq!(render(&args), r#"ACL SETUSER u ">pass word" ~a\*b "~say\"hi\"""#);
    }
}
