//! `cachepol dead-letter`: the deploy hooks the daemon gave up on.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use cachepol::intake::dead_letters::{self, DeadLetter};
use clap::{Args, Subcommand};

use super::{CommonArgs, connect};

const AFTER_HELP: &str = "Examples:
  cachepol dead-letter list
  cachepol dead-letter replay 1717171717171-0
  cachepol dead-letter replay --all
  cachepol dead-letter drop 1717171717171-0

A hook is dead-lettered when a policy keeps failing it (after deploy.max_attempts), a grant
refuses it, or it is malformed; the dead-letter stream (config: deploy.dead_letter) keeps it
with the reason. Replay sends it back to the deploy stream as it was sent (same hook id),
for instance once the policy is fixed or enabled again.";

#[derive(Subcommand)]
pub enum DeadLetterCommand {
    /// List dead letters, oldest first: id, service, failing policies, attempts, age, reason.
    #[command(after_help = AFTER_HELP)]
    List(ListArgs),
    /// Send dead letters back to the deploy stream (and remove them from the dead letters).
    #[command(after_help = AFTER_HELP)]
    Replay(ReplayArgs),
    /// Delete a dead letter for good.
    #[command(after_help = AFTER_HELP)]
    Drop(DropArgs),
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Show at most this many.
    #[arg(long, default_value_t = 100)]
    count: usize,
}

#[derive(Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The dead letter's id (from `list`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    id: Option<String>,
    /// Replay every dead letter.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
pub struct DropArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The dead letter's id (from `list`).
    id: String,
}

pub async fn run(command: DeadLetterCommand) -> Result<ExitCode> {
    match command {
        DeadLetterCommand::List(args) => list(args).await,
        DeadLetterCommand::Replay(args) => replay(args).await,
        DeadLetterCommand::Drop(args) => {
            let config = args.common.load()?;
            let mut conn = connect(&config.redis_url).await?;
            dead_letters::drop(&mut conn, &config.deploy, &args.id).await?;
            println!("dropped {}", args.id);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn list(args: ListArgs) -> Result<ExitCode> {
    let config = args.common.load()?;
    let mut conn = connect(&config.redis_url).await?;
    let letters = dead_letters::list(&mut conn, &config.deploy, None, args.count)
        .await
        .with_context(|| format!("cannot read {}", config.deploy.dead_letter))?;
    if letters.is_empty() {
        println!("no dead letters in {}", config.deploy.dead_letter);
        return Ok(ExitCode::SUCCESS);
    }
    let now = SystemTime::now();
    let rows: Vec<[String; 6]> = letters.iter().map(|l| row(l, now)).collect();
    let header = ["ID", "SERVICE", "POLICIES", "ATTEMPTS", "AGE", "REASON"].map(str::to_owned);
    print!("{}", super::table(&header, &rows));
    Ok(ExitCode::SUCCESS)
}

fn row(l: &DeadLetter, now: SystemTime) -> [String; 6] {
    [
        l.id.clone(),
        if l.service.is_empty() { "-".into() } else { l.service.clone() },
        if l.policies.is_empty() { "-".into() } else { l.policies.clone() },
        l.attempts.map_or_else(|| "-".into(), |n| n.to_string()),
        l.age(now).map_or_else(|| "-".into(), human),
        l.reason.clone(),
    ]
}

/// `3d4h`, `5m12s`, `40s`: the two largest units.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

async fn replay(args: ReplayArgs) -> Result<ExitCode> {
    let config = args.common.load()?;
    let mut conn = connect(&config.redis_url).await?;
    let ids: Vec<String> = match args.id {
        Some(id) => vec![id],
        None => dead_letters::all_ids(&mut conn, &config.deploy)
            .await
            .with_context(|| format!("cannot read {}", config.deploy.dead_letter))?,
    };
    if ids.is_empty() {
        println!("no dead letters to replay");
    }
    let mut failed = 0;
    for id in ids {
        match dead_letters::replay(&mut conn, &config.deploy, &id).await {
            Ok(new_id) => println!("replayed {id} as {new_id} in {}", config.deploy.stream),
            Err(e) => {
                eprintln!("cannot replay {id}: {e}");
                failed += 1;
            }
        }
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
