//! The admin server: what ops and orchestrators ask a running daemon.
//!
//! One HTTP/1 listener (`admin_addr`, default `127.0.0.1:9477`; `none`
//! turns it off), started before anything else so that liveness answers
//! while Redis is still being reached. Endpoints:
//!
//! | endpoint         | answer                                                                    |
//! |------------------|---------------------------------------------------------------------------|
//! | `GET /metrics`   | Prometheus/OpenMetrics text: every `cachepol_*` metric ([`crate::metrics`]) |
//! | `GET /livez`     | `200 ok` while the process runs                                           |
//! | `GET /readyz`    | `200 ready`, or `503` with what is missing: starting, Redis unreachable (no keyspace subscription, no deploy reader), shutting down |
//! | `GET /status`    | JSON: version, uptime, Redis (hit rate, memory, notification flags), the key index, every policy ([`status`]); `cachepol status` renders it |
//! | `POST /deploys`  | the deploy webhook for CI/CD ([`webhook`]): bearer token, JSON hook, appended to the deploy stream, `202` with its stream id |
//!
//! Anything else is `404`. The server holds no state of its own: it reads
//! the routes, metrics and readiness the stages publish, and writes only
//! to the deploy stream. A client cannot hold it (or shutdown) hostage:
//! request headers must arrive within [`HEADER_TIMEOUT`], a connection
//! lives at most [`CONNECTION_TIMEOUT`] and serves one request, and past
//! [`MAX_CONNECTIONS`] new ones are closed at once.
//!
//! May call: every stage (it reads them all). Called by: the daemon's
//! wiring.

pub mod status;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::store::target::Conn;
use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::DeployConfig;
use crate::dispatch::routes::Routes;
use crate::dispatch::switches::Switches;
use crate::metrics::{metrics, resident_bytes};
use crate::store::index::KeyIndex;

/// What the endpoints read, once the daemon has connected to Redis.
pub(crate) struct Wired {
    pub(crate) routes: Arc<ArcSwap<Routes>>,
    pub(crate) index: Arc<KeyIndex>,
    pub(crate) redis: Conn,
    pub(crate) switches: Arc<Switches>,
    pub(crate) nodes: Arc<crate::intake::cluster::Nodes>,
    pub(crate) peers: Arc<crate::intake::peers::Peers>,
}

/// The server's shared state.
pub struct Admin {
    started: Instant,
    /// Set once Redis answered and the policies are loading.
    wired: OnceLock<Wired>,
    deploy: DeployConfig,
    /// `POST /deploys` is off without one.
    token: Option<String>,
    /// Redis's last answer to `/status`, and when it came.
    redis_status: std::sync::Mutex<Option<(Instant, status::RedisStatus)>>,
}

impl Admin {
    pub fn new(deploy: DeployConfig, token: Option<String>) -> Arc<Admin> {
        Arc::new(Admin {
            started: Instant::now(),
            wired: OnceLock::new(),
            deploy,
            token: token.map(|t| t.trim().to_owned()),
            redis_status: std::sync::Mutex::new(None),
        })
    }

    /// Hand the server what it reads (once).
    pub(crate) fn wire(&self, wired: Wired) {
        let _ = self.wired.set(wired);
    }

    fn wired(&self) -> Option<&Wired> {
        self.wired.get()
    }
}

/// Bind the admin address: done before anything else, so that a taken
/// port stops start-up with a clear error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// How long a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection lives, its one request included.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 64;
/// How long shutdown waits for the requests in hand.
const DRAIN: Duration = Duration::from_secs(1);

/// Serve until `shutdown`, then give the requests in hand [`DRAIN`] to
/// finish.
pub async fn serve(listener: tokio::net::TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/status", get(status::status))
        .route("/deploys", post(webhook::deploy))
        .with_state(admin);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: the daemon's Redis
                    // connections need them more; try again shortly.
                    tracing::warn!(error = %e, "the admin server cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let service = TowerToHyperService::new(app.clone());
        connections.spawn(async move {
            let _slot = slot;
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).keep_alive(false);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
    if tokio::time::timeout(DRAIN, async { while connections.join_next().await.is_some() {} }).await.is_err() {
        connections.abort_all();
    }
}

async fn metrics_text(State(admin): State<Arc<Admin>>) -> Response {
    let m = metrics();
    if let Some(bytes) = resident_bytes() {
        m.resident_memory.set(bytes as i64);
    }
    if let Some(wired) = admin.wired() {
        m.index_keys.set(wired.index.stats().iter().map(|p| p.keys as i64).sum());
        for route in wired.routes.load().routes() {
            let label = crate::metrics::PolicyLabel { policy: route.name.to_string() };
            m.queue_depth.get_or_create(&label).set(route.queue.len() as i64);
            m.queue_bytes.get_or_create(&label).set(route.queue.bytes() as i64);
        }
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.encode()).into_response()
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz() -> Response {
    let missing = metrics().ready.missing();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", missing.join("; "))).into_response()
    }
}

/// A JSON error body: `{"error": "..."}`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message.into() }))).into_response()
}
