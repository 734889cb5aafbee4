//! The `cachepol` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cachepol::fake::FakeRedis;
use cachepol::runtime::{LoadOptions, Runtime, RuntimeConfig};
use cachepol::scenario::{self, Scenario};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "cachepol", version, about = "Cache policies as sandboxed WebAssembly components next to Redis")]
struct Cli {
    /// More log output (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a policy component and print its manifest.
    #[command(after_help = "Examples:
  cachepol check policies/genre-invalidation.wasm
  cachepol check policies/genre-invalidation.wasm --config '{\"keys\": [\"graph:{genre}\"]}'
  cachepol check policies/genre-invalidation.wasm --config @genre.json")]
    Check {
        /// The policy's .wasm component.
        policy: PathBuf,
        /// The policy's config: JSON text, or @FILE to read it from a file.
        #[arg(long, default_value = "{}")]
        config: String,
    },
    /// Run scenario files against a policy on the fake host.
    #[command(after_help = "Examples:
  cachepol test policies/genre-invalidation.wasm policies/genre-invalidation/scenarios/
  cachepol test my-policy.wasm deploy.toml sweep.json

A scenario (TOML or JSON) gives config, starting keys, steps and expectations:
  [keys]
  \"graph_data:dance\" = \"g\"
  \"service_playlist:dance:1\" = { value = \"p\", ttl = 900 }
  [[steps]]
  deploy = { service = \"catalog\", tags = { genre = \"dance\" } }
  [expect]
  absent = [\"graph_data:dance\"]
  none_matching = [\"service_playlist:dance:*\"]

Steps: set, del, expire, persist, advance (seconds), deploy, sweep, event, expect.
Expectations: present, absent, none_matching, values, ttl ([min, max] or \"persistent\"),
keys (the exact keyspace), denials and failures (none unless listed).
Exit status: 0 if every scenario passed, 1 otherwise.")]
    Test {
        /// The policy's .wasm component.
        policy: PathBuf,
        /// Scenario files, or directories of them.
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "error",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Check { policy, config } => check(&policy, &config).await,
        Command::Test { policy, scenarios } => test(&policy, &scenarios).await,
    }
}

fn read_config(config: &str) -> Result<String> {
    let text = match config.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read config file {path}"))?,
        None => config.to_owned(),
    };
    serde_json::from_str::<serde_json::Value>(&text).context("--config is not valid JSON")?;
    Ok(text)
}

async fn check(path: &Path, config: &str) -> Result<ExitCode> {
    let config = read_config(config)?;
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let compiled = runtime.compile_file(path).with_context(|| path.display().to_string())?;
    let backend = Arc::new(FakeRedis::new().client("check"));
    let label = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let options = LoadOptions { label, config, ..LoadOptions::default() };
    let policy = runtime.load(&compiled, backend, &options).await.with_context(|| path.display().to_string())?;
    print!("{}", policy.manifest());
    Ok(ExitCode::SUCCESS)
}

async fn test(policy: &Path, paths: &[PathBuf]) -> Result<ExitCode> {
    let files = scenario::collect_files(paths)?;
    if files.is_empty() {
        bail!(
            "no scenario files (*.toml, *.json) in {}",
            paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let compiled = runtime.compile_file(policy).with_context(|| policy.display().to_string())?;
    let (mut passed, mut failed) = (0, 0);
    for file in &files {
        let scenario = match Scenario::from_file(file) {
            Ok(s) => s,
            Err(e) => {
                println!("FAIL {}\n  {e}", file.display());
                failed += 1;
                continue;
            }
        };
        let report = scenario::run(&runtime, &compiled, &scenario).await;
        let what = if report.description.is_empty() { String::new() } else { format!(": {}", report.description) };
        if report.passed() {
            passed += 1;
            println!("ok   {}{what}", file.display());
        } else {
            failed += 1;
            println!("FAIL {}{what}\n{report}", file.display());
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
