//! The `cachepol` command line: one file per subcommand, each with its clap
//! arguments, its `--help` examples and the function that runs it.
//!
//! | command               | file          | what it does                                   |
//! |-----------------------|---------------|------------------------------------------------|
//! | `run`                 | [`run`]       | the daemon                                     |
//! | `deploy`              | [`deploy`]    | publish a deploy hook                          |
//! | `check`               | [`check`]     | validate a policy, print its manifest          |
//! | `test`                | [`test`]      | run scenario files on the fake host (a crate: build it first) |
//! | `new`                 | [`new`]       | scaffold a policy crate                        |
//! | `disable` / `enable`  | [`switch`]    | the kill switch                                |
//! | `acl`                 | [`acl`]       | the Redis ACL rule for the loaded policies     |
//! | `status`              | [`status`]    | a running daemon's status, as a table          |
//! | `dead-letter`         | [`dead_letter`] | list, replay or drop dead-lettered hooks     |
//! | `sweep`               | [`sweep`]     | ask running daemons to sweep a policy          |
//!
//! Errors reach `main` as `anyhow` errors and are shown with their causes.

mod acl;
mod check;
mod dead_letter;
mod deploy;
mod new;
mod run;
mod status;
mod sweep;
mod switch;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cachepol::config::Config;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cachepol", version, about = "Cache policies as sandboxed WebAssembly components next to Redis")]
pub struct Cli {
    /// More log output (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log lines as text, or as one JSON object per line (with span fields).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: load the policies and feed them Redis events and deploy hooks.
    #[command(after_help = run::AFTER_HELP)]
    Run(run::RunArgs),
    /// Publish a deploy hook to the deploy stream and print its id.
    #[command(after_help = deploy::AFTER_HELP)]
    Deploy(deploy::DeployArgs),
    /// Validate a policy component and print its manifest.
    #[command(after_help = check::AFTER_HELP)]
    Check(check::CheckArgs),
    /// Disable a policy in every daemon on this Redis, without touching files (the kill switch).
    #[command(after_help = switch::AFTER_HELP)]
    Disable(switch::SwitchArgs),
    /// Enable a policy disabled with `cachepol disable`.
    Enable(switch::SwitchArgs),
    /// Print the Redis ACL rule that gives the daemon exactly what its policies need.
    #[command(after_help = acl::AFTER_HELP)]
    Acl(acl::AclArgs),
    /// Run scenario files against a policy on the fake host.
    #[command(after_help = test::AFTER_HELP)]
    Test(test::TestArgs),
    /// Create a policy crate that builds and passes its scenario as generated.
    #[command(after_help = new::AFTER_HELP)]
    New(new::NewArgs),
    /// Show a running daemon's status (from its admin server).
    #[command(after_help = status::AFTER_HELP)]
    Status(status::StatusArgs),
    /// List, replay or drop deploy hooks that were dead-lettered.
    #[command(subcommand, name = "dead-letter")]
    DeadLetter(dead_letter::DeadLetterCommand),
    /// Ask every running daemon to sweep a policy now.
    #[command(after_help = sweep::AFTER_HELP)]
    Sweep(sweep::SweepArgs),
}

impl Command {
    /// Whether this is the long-running daemon (it logs at info by default).
    pub fn is_daemon(&self) -> bool {
        matches!(self, Command::Run(_))
    }

    /// Run the subcommand.
    pub async fn run(self) -> Result<ExitCode> {
        match self {
            Command::Run(args) => run::run(args).await,
            Command::Deploy(args) => deploy::run(args).await,
            Command::Acl(args) => acl::run(args).await,
            Command::Disable(args) => switch::run(args, true).await,
            Command::Enable(args) => switch::run(args, false).await,
            Command::Check(args) => check::run(args).await,
            Command::Test(args) => test::run(args).await,
            Command::New(args) => new::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::DeadLetter(command) => dead_letter::run(command).await,
            Command::Sweep(args) => sweep::run(args).await,
        }
    }
}

/// Settings shared by the commands that talk to Redis.
#[derive(Args, Clone)]
struct CommonArgs {
    /// Config file (cachepol.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Redis to use (overrides the config file).
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// The deploy-hook stream (overrides the config file).
    #[arg(long)]
    deploy_stream: Option<String>,
}

impl CommonArgs {
    fn load(&self) -> Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(url) = &self.redis_url {
            config.redis_url = url.clone();
        }
        if let Some(stream) = &self.deploy_stream {
            config.deploy.stream = stream.clone();
        }
        config.for_target().map_err(anyhow::Error::msg)?;
        Ok(config)
    }
}

/// What decides the loaded policy set: shared by `run` and `acl`, so that
/// `acl` describes exactly what `run` will load.
#[derive(Args, Clone)]
struct PolicySetArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Directory of policy .wasm files.
    #[arg(long)]
    policies: Option<PathBuf>,
    /// The daemon sets notify-keyspace-events to what the policies need (instead of refusing
    /// to start without them).
    #[arg(long)]
    configure_notifications: bool,
    /// Where compiled policies are cached.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

impl PolicySetArgs {
    fn load(&self) -> Result<Config> {
        let mut config = self.common.load()?;
        if let Some(dir) = &self.policies {
            config.policies_dir = dir.clone();
        }
        config.configure_notifications |= self.configure_notifications;
        if let Some(dir) = &self.cache_dir {
            config.cache_dir = dir.clone();
        }
        Ok(config)
    }
}

/// A self-reconnecting connection for the one-shot commands.
async fn connect(url: &str) -> Result<cachepol::store::target::Conn> {
    let target = cachepol::store::target::RedisTarget::parse(url)?;
    target.connect().await.with_context(|| format!("cannot connect to {url}"))
}

/// Rows under a header, each column as wide as its widest cell.
fn table<const N: usize>(header: &[String; N], rows: &[[String; N]]) -> String {
    let mut widths = header.each_ref().map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let cells: Vec<String> = row.iter().zip(widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
