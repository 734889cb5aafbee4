//! `cachepol run`: the daemon.

use std::process::ExitCode;

use anyhow::Result;
use cachepol::config::Config;
use cachepol::daemon;
use cachepol::dispatch::reload::ConfigSource;
use clap::Args;
use tokio_util::sync::CancellationToken;

use super::PolicySetArgs;

pub const AFTER_HELP: &str = "Examples:
  cachepol run                                   # redis://127.0.0.1:6379, ./policies
  REDIS_URL=redis://:secret@cache:6379/2 cachepol run --config /etc/cachepol.toml
  cachepol run --configure-notifications --policies /srv/cachepol/policies

  cachepol run --admin 0.0.0.0:9477 --log-format json   # metrics and health for an orchestrator

Settings come from the config file (see README), then flags, REDIS_URL and CACHEPOL_DEPLOY_TOKEN
override them. Policies hot-reload: replace a file atomically (cp new.wasm policies/.x.tmp && mv
policies/.x.tmp policies/x.wasm), delete one to unload it. SIGHUP re-reads the config file (an
invalid one is refused, the running config stays) and re-scans the directory.
The admin server (default 127.0.0.1:9477): GET /metrics /livez /readyz /status, POST /deploys.
Stop with SIGINT or SIGTERM: in-flight calls finish, handled deploy hooks are acknowledged.";

#[derive(Args, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    set: PolicySetArgs,
    /// Do not watch the policies directory (immutable deployments); SIGHUP still reloads.
    #[arg(long)]
    no_watch: bool,
    /// Events queued per policy before coalescing and dropping (then a gap sweep).
    #[arg(long)]
    queue_capacity: Option<usize>,
    /// Longest chain of policies waking each other through their writes.
    #[arg(long)]
    hop_limit: Option<u8>,
    /// Where the admin server listens (host:port), or `none` (default 127.0.0.1:9477).
    #[arg(long)]
    admin: Option<String>,
}

/// The deploy webhook's token from the environment (it beats the file:
/// secrets are better kept out of config files).
pub const TOKEN_ENV: &str = "CACHEPOL_DEPLOY_TOKEN";

/// The admin server's token (`/status`, `/metrics`) from the environment.
pub const ADMIN_TOKEN_ENV: &str = "CACHEPOL_ADMIN_TOKEN";

impl RunArgs {
    /// The config as `run` uses it: the file, then flags and environment.
    fn config(&self) -> Result<Config> {
        let mut config = self.set.load()?;
        config.watch &= !self.no_watch;
        if let Some(n) = self.queue_capacity {
            config.queue_capacity = n.max(1);
        }
        if let Some(n) = self.hop_limit {
            config.hop_limit = n;
        }
        if let Some(addr) = &self.admin {
            config.admin_addr = addr.clone();
            config.admin().map_err(anyhow::Error::msg)?;
        }
        if let Some(token) = std::env::var(TOKEN_ENV).ok().filter(|t| !t.trim().is_empty()) {
            anyhow::ensure!(token.trim().len() >= 16, "{TOKEN_ENV} must be at least 16 characters");
            config.deploy_token = Some(token.trim().to_owned());
        }
        if let Some(token) = std::env::var(ADMIN_TOKEN_ENV).ok().filter(|t| !t.trim().is_empty()) {
            anyhow::ensure!(token.trim().len() >= 16, "{ADMIN_TOKEN_ENV} must be at least 16 characters");
            config.admin_token = Some(token.trim().to_owned());
        }
        Ok(config)
    }
}

/// Run the daemon until SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> Result<ExitCode> {
    let config = args.config()?;
    // SIGHUP reads the same sources again; with no config file there is
    // nothing to re-read.
    let reload: Option<ConfigSource> = args
        .set
        .common
        .config
        .is_some()
        .then(|| Box::new(move || args.config().map_err(|e| format!("{e:#}"))) as ConfigSource);
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    daemon::run(config, reload, shutdown).await?;
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
