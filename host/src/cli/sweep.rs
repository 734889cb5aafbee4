//! `cachepol sweep NAME`: ask every running daemon to sweep a policy now.

use std::process::ExitCode;

use anyhow::{Context, Result};
use cachepol::intake::control::{request_sweep, sweep_reason};
use clap::Args;

use super::{CommonArgs, connect};

pub const AFTER_HELP: &str = "Examples:
  cachepol sweep ttl-table
  cachepol sweep genre-invalidation --reason gap

Counts a request in the Redis Hash `cachepol:control:sweeps` (config: sweep_key); every daemon
running the policy reads it within a second, queues the sweep and logs `sweep requested by the
operator`. The reason is what the policy's sweep hook is told (start, reconnect, gap, periodic,
manual, reload); `manual` unless given.";

#[derive(Args)]
pub struct SweepArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The policy's name (as in its manifest and the daemon's log).
    name: String,
    /// The reason the policy is given.
    #[arg(long, default_value = "manual", value_parser = parse_reason)]
    reason: String,
}

fn parse_reason(text: &str) -> Result<String, String> {
    match sweep_reason(text) {
        Some(_) => Ok(text.to_owned()),
        None => Err(format!("`{text}` is not a sweep reason: start, reconnect, gap, periodic, manual or reload")),
    }
}

pub async fn run(args: SweepArgs) -> Result<ExitCode> {
    let config = args.common.load()?;
    let mut conn = connect(&config.redis_url).await?;
    let reason = sweep_reason(&args.reason).expect("checked by the parser");
    let count = request_sweep(&mut conn, &config.sweep_key, &args.name, reason)
        .await
        .with_context(|| format!("cannot write the request to {}", config.sweep_key))?;
    println!(
        "sweep({}) of {} requested (request {count}); running daemons with it confirm in their log within a second",
        args.reason, args.name
    );
    Ok(ExitCode::SUCCESS)
}
