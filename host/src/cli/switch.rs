//! `cachepol disable` / `cachepol enable`: the kill switch, without
//! touching files.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use super::{CommonArgs, connect};

pub const AFTER_HELP: &str = "Examples:
  cachepol disable file-cache-clear
  REDIS_URL=redis://cache:6379 cachepol disable ttl-table

Adds NAME to the Redis Set `cachepol:control:disabled` (config: control_key); running daemons
read it every second and confirm in their log. A disabled policy gets no events; its deploy
hooks are retried, then dead-lettered. `cachepol enable NAME` undoes it (and sweeps the policy).";

#[derive(Args)]
pub struct SwitchArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The policy's name (as in its manifest and the daemon's log).
    name: String,
}

/// Add the policy to the disabled set (`disable`) or remove it (`enable`).
pub async fn run(args: SwitchArgs, disable: bool) -> Result<ExitCode> {
    let config = args.common.load()?;
    let mut conn = connect(&config.redis_url).await?;
    let command = if disable { "SADD" } else { "SREM" };
    let changed: i64 = redis::cmd(command)
        .arg(&config.control_key)
        .arg(&args.name)
        .query_async(&mut conn)
        .await
        .with_context(|| format!("cannot update {}", config.control_key))?;
    let state = if disable { "disabled" } else { "enabled" };
    let already = if changed == 0 { " (it already was)" } else { "" };
    println!("{} {state}{already}; running daemons confirm in their log within a second", args.name);
    Ok(ExitCode::SUCCESS)
}
