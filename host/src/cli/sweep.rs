//! `cachepol sweep NAME`: ask the daemon leading sweeps to sweep a policy
//! now, and with `--wait` wait until one has, saying which.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cachepol::intake::control::{request_sweep, sweep_answer, sweep_reason};
use clap::Args;

use super::{CommonArgs, connect};

pub const AFTER_HELP: &str = "Examples:
  cachepol sweep ttl-table
  cachepol sweep ttl-table --wait
  cachepol sweep genre-invalidation --reason gap

Counts a request in the Redis Hash `cachepol:control:sweeps` (config: sweep_key). It stays
pending until a daemon that has the policy and leads sweeps (the lease holder; with replicas
off, every daemon) has run a sweep started after it, which records itself in the hash
(`NAME.done`, `NAME.by`): a request made while no daemon leads is run by the next one to.
`--wait` waits for that and says which daemon ran it. The reason is what the policy's sweep
hook is told (start, reconnect, gap, periodic, manual, reload); `manual` unless given.";

#[derive(Args)]
pub struct SweepArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The policy's name (as in its manifest and the daemon's log).
    name: String,
    /// The reason the policy is given.
    #[arg(long, default_value = "manual", value_parser = parse_reason)]
    reason: String,
    /// Wait until a daemon has run the sweep, and say which.
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
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
    if !args.wait {
        println!(
            "sweep({}) of {} requested (request {count}); pending until the daemon leading sweeps runs it (--wait waits for it)",
            args.reason, args.name
        );
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    loop {
        let answer = sweep_answer(&mut conn, &config.sweep_key, &args.name)
            .await
            .with_context(|| format!("cannot read {}", config.sweep_key))?;
        if answer.done >= count {
            let by = answer.by.as_deref().unwrap_or("an unnamed daemon");
            println!("sweep({}) of {} run by {by} (request {count})", args.reason, args.name);
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "sweep({}) of {} not run within {} s: is a daemon with the policy running and leading sweeps (see `cachepol status`)? The request stays pending",
                args.reason,
                args.name,
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
