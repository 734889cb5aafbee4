//! `cachepol run`: the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use cachepol::daemon;
use clap::Args;
use tokio_util::sync::CancellationToken;

use super::PolicySetArgs;

pub const AFTER_HELP: &str = "Examples:
  cachepol run                                   # redis://127.0.0.1:6379, ./policies
  REDIS_URL=redis://:secret@cache:6379/2 cachepol run --config /etc/cachepol.toml
  cachepol run --configure-notifications --policies /srv/cachepol/policies

Settings come from the config file (see README), then flags and REDIS_URL override them.
Policies hot-reload: replace a file atomically (cp new.wasm policies/.x.tmp && mv policies/.x.tmp
policies/x.wasm), delete one to unload it; SIGHUP re-scans the directory.
Stop with SIGINT or SIGTERM: in-flight calls finish, handled deploy hooks are acknowledged.";

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    set: PolicySetArgs,
    /// Do not watch the policies directory (immutable deployments); SIGHUP still reloads.
    #[arg(long)]
    no_watch: bool,
    /// Where compiled policies are cached.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Events queued per policy before coalescing and dropping (then a gap sweep).
    #[arg(long)]
    queue_capacity: Option<usize>,
    /// Longest chain of policies waking each other through their writes.
    #[arg(long)]
    hop_limit: Option<u8>,
}

/// Run the daemon until SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> Result<ExitCode> {
    let mut config = args.set.load()?;
    config.watch &= !args.no_watch;
    if let Some(dir) = args.cache_dir {
        config.cache_dir = dir;
    }
    if let Some(n) = args.queue_capacity {
        config.queue_capacity = n.max(1);
    }
    if let Some(n) = args.hop_limit {
        config.hop_limit = n;
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    daemon::run(config, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Cancel `shutdown` on SIGINT or SIGTERM.
async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
    shutdown.cancel();
}
