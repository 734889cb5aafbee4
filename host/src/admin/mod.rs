//! The admin server: what ops and orchestrators ask a running daemon.
//!
//! One HTTP/1 listener (`admin_addr`, default `127.0.0.1:9477`; `none`
//! turns it off), started before anything else so that liveness answers
//! while Redis is still being reached. Endpoints:
//!
//! | endpoint         | answer                                                                    |
//! |------------------|---------------------------------------------------------------------------|
//! | `GET /metrics`   | Prometheus/OpenMetrics text: every `cachepol_*` metric ([`crate::metrics`]); bearer `admin_token` when set |
//! | `GET /livez`     | `200 ok` while the process runs                                           |
//! | `GET /readyz`    | `200 ready`, or `503` with what is missing: starting, Redis unreachable (no keyspace subscription, no deploy reader), shutting down |
//! | `GET /status`    | JSON: version, uptime, Redis (hit rate, memory, notification flags), the key index, every policy ([`status`]); `cachepol status` renders it; bearer `admin_token` when set |
//! | `POST /deploys`  | the deploy webhook for CI/CD ([`webhook`]): bearer `deploy_token`, JSON hook, appended to the deploy stream, `202` with its stream id |
//!
//! Anything else is `404`. The server holds no state of its own: it reads
//! the routes, metrics and readiness the stages publish, and writes only
//! to the deploy stream.
//!
//! `/status` shows grants, subscriptions and errors, `/metrics` the
//! policies' names and traffic: bound beyond loopback (`--admin
//! 0.0.0.0:9477` in a pod), set `admin_token` (or `CACHEPOL_ADMIN_TOKEN`)
//! and they answer `401` without `Authorization: Bearer <admin_token>`.
//! `/livez` and `/readyz` never need a token (orchestrators' probes send
//! none), and the daemon warns at start when it is bound beyond loopback
//! without one.
//!
//! A client cannot hold the server (or shutdown) hostage, and above all
//! cannot make the probes fail, which would have the orchestrator restart
//! a healthy daemon (and each restart runs a start sweep): request headers
//! must arrive within [`HEADER_TIMEOUT`], a connection lives at most
//! [`CONNECTION_TIMEOUT`] and serves one request, at most
//! [`MAX_CONNECTIONS`] are open, and one peer address holds at most
//! [`PER_PEER`] of them (the rest, [`RESERVED`], stay for others). A new
//! connection that finds no room closes the oldest connection, of its peer
//! or of all, that has not sent its request yet ([`Slots`]): idle
//! connections make room for a probe, whoever opened them, and a request
//! being answered is never cut. Only when every slot is busy answering is
//! the newcomer closed.
//!
//! May call: every stage (it reads them all). Called by: the daemon's
//! wiring.

pub mod status;
pub mod webhook;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// `/status` and `/metrics` need it when set.
    admin_token: Option<String>,
    /// Redis's last answer to `/status`, and when it came.
    redis_status: std::sync::Mutex<Option<(Instant, status::RedisStatus)>>,
}

impl Admin {
    pub fn new(deploy: DeployConfig, token: Option<String>, admin_token: Option<String>) -> Arc<Admin> {
        Arc::new(Admin {
            started: Instant::now(),
            wired: OnceLock::new(),
            deploy,
            token: token.map(|t| t.trim().to_owned()),
            admin_token: admin_token.map(|t| t.trim().to_owned()),
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

    /// `401` unless the request carries the admin token (when one is set).
    fn refuse_without_token(&self, headers: &axum::http::HeaderMap) -> Option<Response> {
        let token = self.admin_token.as_deref()?;
        if webhook::authorized(headers, token) {
            return None;
        }
        let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong `Authorization: Bearer <admin_token>`");
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        Some(response)
    }
}

/// Bind the admin address: done before anything else, so that a taken
/// port stops start-up with a clear error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// How long a client has to send its request headers: a probe or a
/// scraper sends them at once.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest a connection lives, its one request included.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections one peer address may not take: kept for the others.
pub const RESERVED: usize = 16;
/// Connections one peer address may hold.
pub const PER_PEER: usize = MAX_CONNECTIONS - RESERVED;
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
    let mut slots = Slots::default();
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Ok(id) = done {
                    slots.close(id);
                }
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: the daemon's Redis
                    // connections need them more; try again shortly.
                    tracing::warn!(error = %e, "the admin server cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some((id, slot)) = slots.open(peer.ip()) else {
            tracing::debug!(peer = %peer, "admin server: every connection is busy answering; closed a new one");
            continue;
        };
        let inner = TowerToHyperService::new(app.clone());
        let asked = slot.asked.clone();
        // The request's headers are in: the connection is busy, no longer
        // one to close for a newcomer.
        let service = hyper::service::service_fn(move |request| {
            asked.store(true, Ordering::Relaxed);
            hyper::service::Service::call(&inner, request)
        });
        connections.spawn(async move {
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).keep_alive(false);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = slot.closed.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection) => {}
            }
            id
        });
    }
    if tokio::time::timeout(DRAIN, async { while connections.join_next().await.is_some() {} }).await.is_err() {
        connections.abort_all();
    }
}

/// One open connection, as [`Slots`] sees it.
#[derive(Clone)]
struct Slot {
    peer: IpAddr,
    /// Its request's headers arrived.
    asked: Arc<AtomicBool>,
    /// Cancelled to close it and make room.
    closed: CancellationToken,
}

/// The open connections, oldest first, and who may have a new one: room
/// is made by closing the oldest connection that has not sent its request
/// (of the newcomer's peer, past [`PER_PEER`]; of anyone, past
/// [`MAX_CONNECTIONS`]).
#[derive(Default)]
struct Slots {
    open: BTreeMap<u64, Slot>,
    next: u64,
}

impl Slots {
    /// Room for a connection from `peer`, or `None` (every candidate is
    /// busy answering).
    fn open(&mut self, peer: IpAddr) -> Option<(u64, Slot)> {
        if self.open.values().filter(|s| s.peer == peer).count() >= PER_PEER {
            self.make_room(Some(peer))?;
        }
        if self.open.len() >= MAX_CONNECTIONS {
            self.make_room(None)?;
        }
        let slot = Slot { peer, asked: Arc::default(), closed: CancellationToken::new() };
        let id = self.next;
        self.next += 1;
        self.open.insert(id, slot.clone());
        Some((id, slot))
    }

    /// Close the oldest idle connection (of `peer`, if given).
    fn make_room(&mut self, peer: Option<IpAddr>) -> Option<()> {
        let (&id, _) = self.open.iter().find(|(_, s)| {
            peer.is_none_or(|p| s.peer == p) && !s.asked.load(Ordering::Relaxed) && !s.closed.is_cancelled()
        })?;
        let slot = self.open.remove(&id).expect("found");
        slot.closed.cancel();
        Some(())
    }

    fn close(&mut self, id: u64) {
        self.open.remove(&id);
    }
}

async fn metrics_text(State(admin): State<Arc<Admin>>, headers: axum::http::HeaderMap) -> Response {
    if let Some(refused) = admin.refuse_without_token(&headers) {
        return refused;
    }
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
