//! `cachepol status`: a running daemon's `/status`, as a table.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use cachepol::admin::status::{PolicyStatus, Status};
use cachepol::config::DEFAULT_ADMIN_ADDR;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::dead_letter::human;

pub const AFTER_HELP: &str = "Examples:
  cachepol status
  cachepol status --admin 10.0.0.5:9477
  cachepol status --json | jq '.policies[].counters'";

#[derive(Args)]
pub struct StatusArgs {
    /// The daemon's admin address (its admin_addr).
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    admin: String,
    /// Print the JSON as the daemon gave it.
    #[arg(long)]
    json: bool,
    /// The daemon's admin_token, if it has one.
    #[arg(long, env = super::run::ADMIN_TOKEN_ENV, hide_env_values = true)]
    admin_token: Option<String>,
}

pub async fn run(args: StatusArgs) -> Result<ExitCode> {
    let body = get(&args.admin, "/status", args.admin_token.as_deref()).await?;
    if args.json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let status: Status = serde_json::from_str(&body).context("the daemon's /status is not what this cachepol reads")?;
    print!("{}", render(&status, SystemTime::now()));
    Ok(if status.ready { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// One HTTP/1.1 GET on loopback or a private network: the admin server's
/// answers are small and never chunked, so a plain socket is enough.
async fn get(addr: &str, path: &str, token: Option<&str>) -> Result<String> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within 5 s"))?
        .with_context(|| {
            format!("cannot reach the admin server at {addr} (is the daemon running, with admin_addr {addr}?)")
        })?;
    let auth = token.map(|t| format!("Authorization: Bearer {}\r\n", t.trim())).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| anyhow::anyhow!("{addr} did not finish its answer within 10 s"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("not an HTTP answer")?;
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        bail!("{addr}{path} answered {status_line}: {}", body.trim());
    }
    Ok(body.to_owned())
}

/// The status as a person reads it.
pub fn render(s: &Status, now: SystemTime) -> String {
    let mut out = String::new();
    let ready = if s.ready { "ready".to_owned() } else { format!("NOT READY: {}", s.not_ready.join("; ")) };
    out.push_str(&format!("cachepol {}, up {}, {ready}\n", s.version, human(Duration::from_secs(s.uptime_secs))));
    let r = &s.redis;
    match &r.error {
        Some(e) => out.push_str(&format!("redis: {e}\n")),
        None => out.push_str(&format!(
            "redis {}: hit rate {} ({} hits, {} misses), used memory {} (maxmemory-policy {}), notify-keyspace-events {}\n",
            r.version.as_deref().unwrap_or("?"),
            r.hit_rate.map_or_else(|| "-".into(), |h| format!("{:.1}%", h * 100.0)),
            r.keyspace_hits.unwrap_or(0),
            r.keyspace_misses.unwrap_or(0),
            r.used_memory.map_or_else(|| "?".into(), mib),
            r.maxmemory_policy.as_deref().unwrap_or("?"),
            r.notify_keyspace_events.as_deref().filter(|f| !f.is_empty()).unwrap_or("(off)"),
        )),
    }
    if s.subscriptions.len() > 1 {
        let up = s.subscriptions.iter().filter(|n| n.subscribed).count();
        let nodes: Vec<String> = s
            .subscriptions
            .iter()
            .map(|n| format!("{}{}", n.node, if n.subscribed { "" } else { " (down)" }))
            .collect();
        out.push_str(&format!("subscribed to {up} of {} primaries: {}\n", s.subscriptions.len(), nodes.join(", ")));
    }
    if let Some(lease) = &s.lease {
        let held: Vec<String> = lease.shards.iter().filter(|l| l.held).map(|l| format!("slot {}", l.slot)).collect();
        match (lease.shards.is_empty(), lease.held) {
            (true, true) => out.push_str(&format!("lease {}: held (token {})\n", lease.key, lease.token)),
            (true, false) => out.push_str(&format!("lease {}: standing by\n", lease.key)),
            (false, _) => out.push_str(&format!(
                "shard leases: {} of {} held{}\n",
                held.len(),
                lease.shards.len(),
                if held.is_empty() { String::new() } else { format!(" ({})", held.join(", ")) }
            )),
        }
    }
    if !s.peers.is_empty() {
        let sharing = match &s.lease {
            Some(_) => "replicas: one at a time handles keyspace events",
            None => "[replicas] enabled = false: EACH handles every keyspace event",
        };
        out.push_str(&format!("other daemons on this Redis: {} ({sharing})\n", s.peers.join(", ")));
    }
    for n in &s.subscriptions {
        let Some(flags) = &n.flags else { continue };
        let on = if n.node.is_empty() { String::new() } else { format!(" on {}", n.node) };
        if let Some(probe) = &flags.probe {
            out.push_str(&format!("notify-keyspace-events{on} `{}`: {probe}\n", flags.value));
        }
        for m in &flags.missing {
            out.push_str(&format!(
                "notifications{on}: missing `{}` for the {}: {} ({})\n",
                m.flags, m.needed_by, m.cost, m.not_set
            ));
        }
    }
    for p in &s.index {
        out.push_str(&format!("key index {}: {} ({} keys)\n", p.pattern, p.status, p.keys));
    }
    out.push('\n');
    if s.policies.is_empty() {
        out.push_str("no policy loaded\n");
        return out;
    }
    let header = ["POLICY", "VERSION", "MODE", "HEALTH", "QUEUE", "EVENTS", "CALLS", "LAST EVENT", "LAST SWEEP"]
        .map(str::to_owned);
    let rows: Vec<[String; 9]> = s.policies.iter().map(|p| policy_row(p, now)).collect();
    out.push_str(&super::table(&header, &rows));
    out
}

fn policy_row(p: &PolicyStatus, now: SystemTime) -> [String; 9] {
    let ago = |ms: u64| {
        let at = UNIX_EPOCH + Duration::from_millis(ms);
        format!("{} ago", human(now.duration_since(at).unwrap_or_default()))
    };
    let ok = p.counters.calls.get("ok").copied().unwrap_or(0);
    let failed: u64 = p.counters.calls.iter().filter(|(k, _)| *k != "ok").map(|(_, n)| n).sum();
    let health = if p.disabled { format!("{} (disabled)", p.health) } else { p.health.clone() };
    [
        p.name.clone(),
        p.version.clone(),
        p.mode.clone(),
        health,
        p.queue.depth.to_string(),
        format!("{} ({} dropped)", p.counters.delivered, p.counters.dropped),
        format!("{ok} ok, {failed} failed"),
        p.activity.last_event_ms.map_or_else(|| "-".into(), ago),
        match (&p.activity.walking, &p.activity.last_sweep) {
            (Some(walking), _) => format!("under way: {walking}"),
            (None, Some(w)) => format!("{} {} {}", w.reason, if w.ok { "ok" } else { "FAILED" }, ago(w.at_ms)),
            (None, None) => "-".into(),
        },
    ]
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}
