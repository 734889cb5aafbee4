//! `POST /deploys`: the deploy webhook CI/CD systems call.
//!
//! ```text
//! POST /deploys
//! Authorization: Bearer <deploy_token>
//! Content-Type: application/json
//!
//! {"service": "catalog", "files": ["app.py"], "tags": {"genre": "dance"}, "id": "release-42"}
//! ```
//!
//! `service` is required; `files`, `tags` (an object of strings, or a list
//! of `"name=value"` strings) and `id` are optional; any other field is an
//! error, so a typo is never silently ignored. The hook is appended to the
//! deploy stream, exactly as `cachepol deploy` would (so it is durable and
//! handled once by the consumer group), and the answer is `202` with its
//! stream id.
//!
//! Refusals write nothing and say why, in JSON: `401` without the right
//! token (checked before the body is read), `413` past [`MAX_BODY`] bytes,
//! `400` for anything that is not a valid hook, `503` when Redis does not
//! take it, `404` when no token is configured (the webhook is off).
//!
//! A `202` means the hook is in the stream: as durable as Redis keeps its
//! data (persistence, replicas). A hook with an `id` runs once by that id
//! ([`crate::intake::deploy::HOOK_ID_TTL`]): a duplicate is not appended
//! again, and is answered `202` with the first hook's stream id, so a
//! sender retrying after a `503` that says the hook may have been written
//! loses nothing and doubles nothing. Without an `id`, such a retry may
//! deliver the hook twice.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Admin, error};
use crate::intake::deploy::{publish, tags_from_json};
use crate::store::redis::{describe, is_connection_error};

/// The largest body taken: a hook is a service name and a few paths.
pub const MAX_BODY: usize = 64 * 1024;

/// The longest the webhook waits for Redis to take the hook.
const REDIS_WAIT: Duration = Duration::from_secs(5);

/// A hook as posted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookBody {
    pub service: String,
    #[serde(default)]
    pub files: Vec<String>,
    #[serde(default)]
    pub tags: Option<serde_json::Value>,
    #[serde(default)]
    pub id: Option<String>,
}

/// A valid hook, ready for the stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Hook {
    pub service: String,
    pub files: Vec<String>,
    pub tags: Vec<(String, String)>,
    pub id: Option<String>,
}

/// Parse and check a posted body: a clear sentence for every way it can be
/// wrong. Never panics, whatever the bytes (a fuzz test holds it to that).
pub fn parse(body: &[u8]) -> Result<Hook, String> {
    // serde would also take a struct from a JSON list (`["catalog"]`): a
    // hook is an object, nothing else.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            "the body must be a JSON object: {\"service\": ..., \"files\": [...], \"tags\": {...}, \"id\": ...}".into(),
        );
    }
    let raw: HookBody =
        serde_json::from_slice(body).map_err(|e| format!("the body is not a valid deploy hook: {e}"))?;
    let service = raw.service.trim().to_owned();
    if service.is_empty() {
        return Err("`service` must not be empty".into());
    }
    if raw.files.iter().any(|f| f.is_empty()) {
        return Err("`files` must not contain empty paths".into());
    }
    let tags = match raw.tags {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(value) => tags_from_json(value).map_err(|e| e.replace("field `tags`", "`tags`"))?,
    };
    let id = raw.id.map(|id| id.trim().to_owned());
    if id.as_deref() == Some("") {
        return Err("`id` must not be empty (leave it out to use the stream id)".into());
    }
    Ok(Hook { service, files: raw.files, tags, id })
}

/// Whether `headers` carry `Authorization: Bearer <token>`. The SHA-256
/// digests are compared in constant time: neither the token's bytes nor
/// its length can be learnt from how long a refusal takes.
pub fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let Some(given) = given.strip_prefix("Bearer ") else { return false };
    let (a, b) = (Sha256::digest(given.trim().as_bytes()), Sha256::digest(token.as_bytes()));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) async fn deploy(State(admin): State<Arc<Admin>>, headers: HeaderMap, body: Body) -> Response {
    let Some(token) = admin.token.as_deref() else {
        return error(
            StatusCode::NOT_FOUND,
            "the deploy webhook is off: set deploy_token in the config or CACHEPOL_DEPLOY_TOKEN",
        );
    };
    if !authorized(&headers, token) {
        let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong `Authorization: Bearer <token>`");
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return response;
    }
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is larger than {MAX_BODY} bytes"));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return too_large();
    }
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else { return too_large() };
    let hook = match parse(&bytes) {
        Ok(hook) => hook,
        Err(why) => {
            tracing::info!(reason = %why, "deploy webhook refused a body");
            return error(StatusCode::BAD_REQUEST, why);
        }
    };
    let Some(wired) = admin.wired() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "starting: not connected to Redis yet; nothing written");
    };
    let mut conn = wired.redis.clone();
    let settings = &admin.deploy;
    let sent = publish(
        &mut conn,
        &settings.stream,
        settings.max_len,
        &hook.service,
        &hook.files,
        &hook.tags,
        hook.id.as_deref(),
    );
    match tokio::time::timeout(REDIS_WAIT, sent).await {
        Ok(Ok(id)) => {
            tracing::info!(service = %hook.service, stream_id = %id, "deploy hook received by the webhook");
            (StatusCode::ACCEPTED, Json(serde_json::json!({ "id": id, "stream": settings.stream }))).into_response()
        }
        // A connection that broke after the script was sent may have
        // written it: say so, and whether a retry is safe.
        Ok(Err(e)) if is_connection_error(&e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "Redis connection failed ({}); the hook may have been written: {}",
                describe(&e),
                retry_advice(&hook)
            ),
        ),
        Ok(Err(e)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, format!("Redis refused the hook: {}; nothing written", describe(&e)))
        }
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "Redis did not answer within {} s; the hook may have been written: {}",
                REDIS_WAIT.as_secs(),
                retry_advice(&hook)
            ),
        ),
    }
}

/// What a sender may do after a `503` that may have written the hook.
fn retry_advice(hook: &Hook) -> &'static str {
    match hook.id {
        Some(_) => "retrying with the same `id` is safe (it runs once)",
        None => "retrying may deliver it twice (send an `id` to make retries safe)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_hook_parses() {
        let hook = parse(br#"{"service":"catalog","files":["app.py"],"tags":{"genre":"dance"},"id":"r-1"}"#).unwrap();
        assert_eq!(
            hook,
            Hook {
                service: "catalog".into(),
                files: vec!["app.py".into()],
                tags: vec![("genre".into(), "dance".into())],
                id: Some("r-1".into()),
            }
        );
        let listed = parse(br#"{"service":"catalog","tags":["genre=dance","genre=rock"]}"#).unwrap();
        assert_eq!(listed.tags.len(), 2, "a repeated tag name as a list");
    }

    #[test]
    fn bad_hooks_say_why() {
        for (body, says) in [
            (&b"{"[..], "not a valid deploy hook"),
            (br#"{"files":[]}"#, "missing field `service`"),
            (br#"{"service":"a","file":["x"]}"#, "unknown field `file`"),
            (br#"{"service":"  "}"#, "`service` must not be empty"),
            (br#"{"service":"a","tags":{"g":1}}"#, "`tags` must be"),
            (br#"{"service":"a","tags":["nokey"]}"#, "not of the form name=value"),
            (br#"{"service":"a","id":""}"#, "`id` must not be empty"),
            (br#"{"service":"a","files":[""]}"#, "empty paths"),
            (br#"["service"]"#, "must be a JSON object"),
            (br#"{"service":"a","service":"b"}"#, "duplicate field `service`"),
        ] {
            let err = parse(body).unwrap_err();
            assert!(err.contains(says), "{}: {err}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn the_token_must_match_exactly() {
        let mut headers = HeaderMap::new();
        assert!(!authorized(&headers, "0123456789abcdef"));
        for (value, ok) in [
            ("Bearer 0123456789abcdef", true),
            ("Bearer 0123456789abcdeg", false),
            ("Bearer 0123456789abcde", false),
            ("bearer 0123456789abcdef", false),
            ("0123456789abcdef", false),
        ] {
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(authorized(&headers, "0123456789abcdef"), ok, "{value}");
        }
    }
}
