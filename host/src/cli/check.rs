//! `cachepol check`: validate a policy component and print its manifest.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use cachepol::fake::FakeRedis;
use cachepol::intake::notify;
use cachepol::sandbox::runtime::{LoadOptions, Runtime, RuntimeConfig};
use clap::Args;

pub const AFTER_HELP: &str = "Examples:
  cachepol check policies/genre-invalidation.wasm
  cachepol check policies/genre-invalidation.wasm --config '{\"keys\": [\"graph:{genre}\"]}'
  cachepol check policies/genre-invalidation.wasm --config @genre.json";

#[derive(Args)]
pub struct CheckArgs {
    /// The policy's .wasm component.
    policy: PathBuf,
    /// The policy's config: JSON text, or @FILE to read it from a file.
    #[arg(long, default_value = "{}")]
    config: String,
}

/// Compile, instantiate, configure and describe the policy on the fake host.
pub async fn run(args: CheckArgs) -> Result<ExitCode> {
    let path = &args.policy;
    let config = read_config(&args.config)?;
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let compiled = runtime.compile_file(path).with_context(|| path.display().to_string())?;
    let backend = Arc::new(FakeRedis::new().client("check"));
    let label = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let options = LoadOptions { label, config, ..LoadOptions::default() };
    let policy = runtime.load(&compiled, backend, &options).await.with_context(|| path.display().to_string())?;
    print!("{}", policy.manifest());
    // What Redis must send for it (the daemon checks or sets this at start).
    let flags = notify::required(&[policy.manifest()]);
    if flags.is_empty() {
        println!("notify-keyspace-events: none needed (no keyspace subscriptions)");
    } else {
        // CONFIG SET replaces the whole value: these are to add to what
        // other policies (and the key index) already need.
        println!(
            "notify-keyspace-events: needs `{}`, added to the current flags (the daemon adds what is missing with --configure-notifications)",
            notify::text(&flags)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `--config`: JSON text, or `@FILE`; checked to be JSON before the policy
/// sees it, so a typo is reported as such rather than as the policy's error.
fn read_config(config: &str) -> Result<String> {
    let text = match config.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read config file {path}"))?,
        None => config.to_owned(),
    };
    serde_json::from_str::<serde_json::Value>(&text).context("--config is not valid JSON")?;
    Ok(text)
}
