//! The operations surface under hostile conditions (issue 25): idle
//! sockets against the health probes, a lease holder frozen past its TTL,
//! operator sweeps during a lease gap, hooks posted twice, a deploy stream
//! trimmed with a backlog, and Redis errors as the operator reads them.

use crate::support::{RedisServer, cli};

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
