//! `cachepol deploy`: publish a deploy hook to the deploy stream.

use std::process::ExitCode;

use anyhow::{Context, Result};
use cachepol::intake::deploy::publish;
use clap::Args;

use super::{CommonArgs, connect};

pub const AFTER_HELP: &str = "Examples:
  cachepol deploy --service quiz --file quiz_generator.py
  cachepol deploy --service catalog --tag genre=dance --tag genre=rock
  REDIS_URL=redis://cache:6379 cachepol deploy --service web --file app.py --id release-2024-05-01";

#[derive(Args)]
pub struct DeployArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The service that was deployed.
    #[arg(long)]
    service: String,
    /// A changed file (repeatable).
    #[arg(long = "file")]
    files: Vec<String>,
    /// A tag, name=value (repeatable).
    #[arg(long = "tag", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// The hook's id (default: the stream entry id).
    #[arg(long)]
    id: Option<String>,
}

/// Append the hook (durable: the daemon acknowledges it once handled) and
/// print its stream id.
pub async fn run(args: DeployArgs) -> Result<ExitCode> {
    let config = args.common.load()?;
    let mut conn = connect(&config.redis_url).await?;
    let stream = &config.deploy;
    let id =
        publish(&mut conn, &stream.stream, stream.max_len, &args.service, &args.files, &args.tags, args.id.as_deref())
            .await
            .context("cannot publish the deploy hook")?;
    println!("{id}");
    Ok(ExitCode::SUCCESS)
}

fn parse_tag(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{text}` is not name=value")),
    }
}
