//! The operations surface under hostile conditions (issue 25): idle
//! sockets against the health probes, a lease holder frozen past its TTL,
//! operator sweeps during a lease gap, hooks posted twice, a deploy stream
//! trimmed with a backlog, and Redis errors as the operator reads them.

use std::net::TcpStream;
use std::time::Duration;

use crate::support::{Daemon, RedisServer, Setup, cli, http};

const ADMIN_TOKEN: &str = "admin-token-0123456789";

/// A Redis error reaches the operator once, as Redis said it: not
/// `"WRONGTYPE": ...: "WRONGTYPE": ...`.
#[test]
fn a_redis_error_is_shown_once() {
    let redis = RedisServer::start();
    let _: () = redis.cmd(&["SET", "cachepol:control:disabled", "not-a-set"]);
    let (ok, text) = cli(&redis, &["disable", "genre-invalidation"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(
            "cannot update cachepol:control:disabled: WRONGTYPE Operation against a key holding the wrong kind of value"
        ),
        "{text}"
    );
    assert_eq!(text.matches("WRONGTYPE").count(), 1, "{text}");
}

/// Idle connections holding every slot of the admin server (what an
/// attacker, or a leaky client, does) do not make the probes fail: a probe
/// makes room by closing the oldest connection that sent nothing.
#[test]
fn probes_answer_while_idle_connections_hold_every_slot() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis, &Setup::new(&["ttl-table"]));
    let admin = daemon.admin();
    let idle: Vec<TcpStream> = (0..80).map(|_| TcpStream::connect(&admin).unwrap()).collect();
    // Let the server accept them all.
    std::thread::sleep(Duration::from_millis(300));
    for path in ["/livez", "/readyz", "/livez"] {
        let (code, body) = http(&admin, "GET", path, &[], b"");
        assert!(code == 200 || (path == "/readyz" && code == 503), "{path}: {code} {body}");
    }
    drop(idle);
    let (code, body) = http(&admin, "GET", "/livez", &[], b"");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
}

/// With `admin_token` set, `/status` and `/metrics` answer only to it;
/// the probes need none, and `cachepol status` sends it.
#[test]
fn the_admin_token_guards_status_and_metrics() {
    let redis = RedisServer::start();
    let setup = Setup::new(&["ttl-table"]).config(&format!("admin_token = \"{ADMIN_TOKEN}\""));
    let daemon = Daemon::start(&redis, &setup);
    let admin = daemon.admin();
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    for path in ["/status", "/metrics"] {
        let (code, body) = http(&admin, "GET", path, &[], b"");
        assert_eq!(code, 401, "{path}: {body}");
        assert!(body.contains("admin_token"), "{body}");
        let (code, _) = http(&admin, "GET", path, &[("Authorization", "Bearer wrong-token-0123456789")], b"");
        assert_eq!(code, 401, "{path}");
        let (code, body) = http(&admin, "GET", path, &[("Authorization", &bearer)], b"");
        assert_eq!(code, 200, "{path}: {body}");
    }
    assert_eq!(http(&admin, "GET", "/livez", &[], b"").0, 200);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cachepol"))
        .args(["status", "--json", "--admin", &admin])
        .env("CACHEPOL_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"policies\""), "{out:?}");
}
