//! `cachepol test`: run scenario files against a policy on the fake host.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use cachepol::fake::scenario::{self, Scenario};
use cachepol::sandbox::runtime::{Runtime, RuntimeConfig};
use clap::Args;

pub const AFTER_HELP: &str = "Examples:
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
Exit status: 0 if every scenario passed, 1 otherwise.";

#[derive(Args)]
pub struct TestArgs {
    /// The policy's .wasm component.
    policy: PathBuf,
    /// Scenario files, or directories of them.
    #[arg(required = true)]
    scenarios: Vec<PathBuf>,
}

/// Run every scenario, print `ok`/`FAIL` per file and a summary line.
pub async fn run(args: TestArgs) -> Result<ExitCode> {
    let files = scenario::collect_files(&args.scenarios)?;
    if files.is_empty() {
        bail!(
            "no scenario files (*.toml, *.json) in {}",
            args.scenarios.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let policy = &args.policy;
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
