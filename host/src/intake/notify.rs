//! `notify-keyspace-events`: which flags the loaded policies and the key
//! index need, and whether Redis sends them.
//!
//! Redis sends no keyspace notifications by default, and each class of
//! command has its own flag. The daemon subscribes to keyevent channels
//! (flag `E`) and works out the class flags from the event names the
//! policies subscribe to. It either sets them (`--configure-notifications`)
//! or refuses to start naming exactly what is missing, because running
//! without them looks healthy while no policy ever fires.
//!
//! **Observed, not only read.** Redis prints `A` whenever every class of it
//! is on and then leaves `n` out, on or off ([`crate::store::flags`]):
//! `AKEn` reads back `AKE`. Where the value cannot say whether a needed
//! class is sent, the subscriber asks Redis itself with a [`Probe`]: it
//! creates a key of its own, publishes a marker on its fence channel, and
//! sees whether the key's `new` came back through the subscription before
//! the marker (Redis queues a write's notifications before the message of a
//! `PUBLISH` sent after it on the same connection). A "sent" holds for as
//! long as the value reads the same on that connection; a changed value, a
//! reconnect, or a `CONFIG SET` of the daemon's own asks again. A "not
//! sent" is asked again at every check: `AKEn` turned on by an operator
//! reads `AKE`, as before, and only a probe can see the difference.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::sandbox::manifest::Manifest;
pub use crate::store::flags::text;
use crate::store::flags::{ALL_CLASSES, Flags, value};
use crate::store::redis::is_connection_error;

/// The class flag that makes Redis emit `op`, or `None` if unknown (then
/// every class is needed).
pub fn class_of(op: &str) -> Option<char> {
    Some(match op {
        "del" | "expire" | "rename_from" | "rename_to" | "persist" | "copy_to" | "move_from" | "move_to"
        | "restore" | "sortstore" => 'g',
        "set" | "setrange" | "incrby" | "incrbyfloat" | "append" => '$',
        "expired" => 'x',
        "evicted" => 'e',
        "new" => 'n',
        op if op.starts_with('h') => 'h',
        op if op.starts_with('l') || op.starts_with('r') && op.ends_with("push") || op == "rpop" => 'l',
        op if op.starts_with('s') => 's',
        op if op.starts_with('z') => 'z',
        op if op.starts_with('x') => 't',
        _ => return None,
    })
}

/// The flags the key index needs ([`crate::store::index::FLAGS`]).
pub fn for_index() -> BTreeSet<char> {
    crate::store::index::FLAGS.chars().collect()
}

/// The flags needed for these manifests' key subscriptions (empty if none
/// subscribes to keyspace events).
pub fn required(manifests: &[&Manifest]) -> BTreeSet<char> {
    let mut flags = BTreeSet::new();
    for m in manifests {
        for sub in &m.key_subscriptions {
            if sub.ops.is_empty() {
                flags.extend(ALL_CLASSES.chars());
            }
            for op in &sub.ops {
                match class_of(op) {
                    Some(c) => {
                        flags.insert(c);
                    }
                    None => flags.extend(ALL_CLASSES.chars()),
                }
            }
        }
    }
    if !flags.is_empty() {
        flags.insert('E');
    }
    flags
}

/// Why the daemon cannot get the notifications it needs.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "Redis's notify-keyspace-events is `{current}` but the loaded policies need `{needed}`; missing `{missing}`{why}. \
         Run `redis-cli CONFIG SET notify-keyspace-events {wanted}` (and persist it in redis.conf), \
         or start cachepol with --configure-notifications"
    )]
    Missing { current: String, needed: String, missing: String, wanted: String, why: String },
    #[error("cannot read or set notify-keyspace-events: {0}")]
    Redis(String),
    #[error("no answer about notify-keyspace-events in time (a backlog of notifications?)")]
    NoAnswer,
}

/// What a probe found out about `new` ([`Probe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probed {
    Sent,
    NotSent,
    /// It could not be asked: the write refused (an ACL without the probe
    /// key), a class no probe can show.
    Failed(String),
}

impl std::fmt::Display for Probed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probed::Sent => f.write_str("a probe's `new` notification came back"),
            Probed::NotSent => f.write_str("a probe's `new` notification did not come back"),
            Probed::Failed(why) => write!(f, "cannot probe: {why}"),
        }
    }
}

/// What one check of a node's flags found.
#[derive(Clone, Debug, Default)]
pub struct Checked {
    /// The value read before any change.
    pub read: String,
    /// The value as it stands after the check (after a `CONFIG SET`, read
    /// again).
    pub now: String,
    /// Needed flags found off in `read` (by the value, or by a probe).
    pub off: BTreeSet<char>,
    /// Those still off now (not set, or set in vain).
    pub missing: BTreeSet<char>,
    /// What a probe found where the value could not say.
    pub probed: Option<Probed>,
    /// Why the flags in `missing` were not set.
    pub not_set: Option<String>,
    /// The daemon tried to set them (`--configure-notifications`).
    pub tried: bool,
}

impl Checked {
    /// The flags the check turned on.
    pub fn added(&self) -> BTreeSet<char> {
        self.off.difference(&self.missing).copied().collect()
    }

    /// Why flags are taken for off beyond what the value shows (the
    /// probe's answer), for messages: empty when the value shows it.
    pub fn why(&self) -> String {
        match &self.probed {
            Some(probed) if *probed != Probed::Sent => {
                format!(" (`{}` does not show `n`: {probed})", self.read)
            }
            _ => String::new(),
        }
    }

    /// Of `needed`, what is still off.
    pub fn missing_of(&self, needed: &BTreeSet<char>) -> BTreeSet<char> {
        self.missing.intersection(needed).copied().collect()
    }

    /// The value that turns `needed` on beside what is set.
    pub fn wanted(&self, needed: &BTreeSet<char>) -> String {
        value(&Flags::parse(&self.now).on.union(needed).copied().collect())
    }

    /// The error for `needed` when some are missing; what was added
    /// otherwise.
    pub fn require(&self, needed: &BTreeSet<char>) -> Result<BTreeSet<char>, NotifyError> {
        let missing = self.missing_of(needed);
        if missing.is_empty() {
            return Ok(self.added());
        }
        // Said when setting them failed: the advice to pass
        // --configure-notifications is no help then.
        let refused = self.not_set.as_deref().filter(|_| self.tried).map(|why| format!("; {why}"));
        Err(NotifyError::Missing {
            why: format!("{}{}", self.why(), refused.unwrap_or_default()),
            current: self.read.clone(),
            needed: text(needed),
            missing: text(&missing),
            wanted: self.wanted(needed),
        })
    }

    /// What `/status` shows of this check, for the flags the `policies` and
    /// the key index (`index`) need.
    pub fn state(&self, policies: &BTreeSet<char>, index: &BTreeSet<char>) -> FlagsState {
        let needs = [
            (policies, "policies", "the policies miss the events these flags send (the daemon is not ready)"),
            (index, "key index", "bulk operations SCAN the keyspace instead of walking the key index"),
        ];
        let missing = needs
            .into_iter()
            .map(|(needed, by, cost)| (self.missing_of(needed), by, cost))
            .filter(|(missing, _, _)| !missing.is_empty())
            .map(|(missing, by, cost)| MissingFlags {
                flags: text(&missing),
                needed_by: by.to_owned(),
                cost: cost.to_owned(),
                not_set: self.not_set.clone().unwrap_or_default(),
            })
            .collect();
        FlagsState { value: self.now.clone(), probe: self.probed.as_ref().map(Probed::to_string), missing }
    }
}

/// A node's `notify-keyspace-events` as the daemon last checked it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FlagsState {
    /// The value Redis prints.
    pub value: String,
    /// What a probe found where the value cannot say (`A` hides `n`).
    pub probe: Option<String>,
    /// Flags needed and not sent.
    pub missing: Vec<MissingFlags>,
}

/// Flags one part of the daemon needs and does not get.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct MissingFlags {
    pub flags: String,
    /// `policies` or `key index`.
    pub needed_by: String,
    /// What their absence costs.
    pub cost: String,
    /// Why the daemon did not set them.
    pub not_set: String,
}

/// How long a probe's marker may take to come back through the
/// subscription (behind a backlog of notifications).
const PROBE_WAIT: Duration = Duration::from_secs(5);

/// How long a probe key lives if its delete never runs.
const PROBE_TTL_MS: u64 = 10_000;

/// One subscription's probe of its node, and what it found (see the module
/// doc). Made per connection: its findings are void once the connection is.
pub struct Probe {
    /// A key of this daemon's, on the node probed (its hash tag picks a slot
    /// of the node's on a cluster).
    key: Vec<u8>,
    fence_channel: String,
    next: AtomicU64,
    /// The probe in flight: its marker, whether its `new` came back, and
    /// who waits for the marker.
    pending: Mutex<Option<Pending>>,
    /// The value a "sent" was found under.
    sent_under: Mutex<Option<String>>,
    /// The needed flags found sent at the last check: one found off later
    /// was turned off meanwhile.
    sent_flags: Mutex<BTreeSet<char>>,
}

struct Pending {
    marker: String,
    heard: bool,
    back: Option<oneshot::Sender<bool>>,
}

/// The prefix of probe keys (`cachepol acl` grants it).
pub const PROBE_PREFIX: &str = "cachepol:probe:";

impl Probe {
    /// A probe publishing its markers on `fence_channel`, for the node
    /// serving `slots` (empty: a single server).
    pub fn new(fence_channel: &str, slots: &[(u16, u16)]) -> Probe {
        let me = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        let serves = |slot: u16| slots.iter().any(|(a, b)| (*a..=*b).contains(&slot));
        let key = match slots.is_empty() {
            true => format!("{PROBE_PREFIX}{me}"),
            false => (0u32..)
                .map(|n| format!("{PROBE_PREFIX}{{{me}-{n}}}"))
                .find(|key| serves(crate::store::target::slot(key.as_bytes())))
                .unwrap_or_default(),
        };
        Probe {
            key: key.into_bytes(),
            fence_channel: fence_channel.to_owned(),
            next: AtomicU64::new(0),
            pending: Mutex::default(),
            sent_under: Mutex::default(),
            sent_flags: Mutex::default(),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Option<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A notification read on the subscription: `true` if it is of the
    /// probe key (then it is nobody else's).
    pub fn observe(&self, op: &str, key: &[u8]) -> bool {
        if key != self.key.as_slice() {
            return false;
        }
        if op == crate::store::index::NEW
            && let Some(pending) = self.pending().as_mut()
        {
            pending.heard = true;
        }
        true
    }

    /// A message on the fence channel: `true` if it is the marker of the
    /// probe in flight (which is then answered).
    pub fn marker_seen(&self, payload: &[u8]) -> bool {
        let mut pending = self.pending();
        let Some(p) = pending.as_mut().filter(|p| p.marker.as_bytes() == payload) else { return false };
        if let Some(back) = p.back.take() {
            let _ = back.send(p.heard);
        }
        *pending = None;
        true
    }

    /// Whether `unsure` (classes value `read` cannot show) are sent: the
    /// finding under this value if it was "sent", else a probe.
    async fn answer(
        &self,
        conn: &mut (impl redis::aio::ConnectionLike + Send),
        read: &str,
        unsure: &BTreeSet<char>,
    ) -> Result<Probed, NotifyError> {
        if let Some(c) = unsure.iter().find(|c| **c != 'n') {
            return Ok(Probed::Failed(format!("no probe shows whether `{c}` is sent")));
        }
        if self.sent_under.lock().unwrap_or_else(|p| p.into_inner()).as_deref() == Some(read) {
            return Ok(Probed::Sent);
        }
        let probed = self.ask(conn).await?;
        *self.sent_under.lock().unwrap_or_else(|p| p.into_inner()) = (probed == Probed::Sent).then(|| read.to_owned());
        Ok(probed)
    }

    /// Create the probe key, publish a marker, delete the key: whether its
    /// `new` came back before the marker.
    async fn ask(&self, conn: &mut (impl redis::aio::ConnectionLike + Send)) -> Result<Probed, NotifyError> {
        let marker = format!("p{}", self.next.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        *self.pending() = Some(Pending { marker: marker.clone(), heard: false, back: Some(tx) });
        let mut pipe = redis::pipe();
        // Deleted first: a key left by a probe whose delete never ran would
        // not be new.
        pipe.cmd("UNLINK").arg(&self.key).ignore();
        pipe.cmd("SET").arg(&self.key).arg(&marker).arg("PX").arg(PROBE_TTL_MS).ignore();
        pipe.cmd("PUBLISH").arg(&self.fence_channel).arg(&marker).ignore();
        pipe.cmd("UNLINK").arg(&self.key).ignore();
        if let Err(e) = pipe.query_async::<()>(conn).await {
            *self.pending() = None;
            return match is_connection_error(&e) || e.is_timeout() {
                true => Err(NotifyError::Redis(e.to_string())),
                false => Ok(Probed::Failed(format!("writing {} refused: {e}", String::from_utf8_lossy(&self.key)))),
            };
        }
        match tokio::time::timeout(PROBE_WAIT, rx).await {
            Ok(Ok(true)) => Ok(Probed::Sent),
            Ok(Ok(false)) => Ok(Probed::NotSent),
            _ => {
                *self.pending() = None;
                Err(NotifyError::NoAnswer)
            }
        }
    }

    /// The daemon set the flags: a value may read the same and mean more.
    fn forget(&self) {
        *self.sent_under.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The needed flags found sent now; returns those found sent at the
    /// check before.
    pub fn swap_sent(&self, now: BTreeSet<char>) -> BTreeSet<char> {
        std::mem::replace(&mut *self.sent_flags.lock().unwrap_or_else(|p| p.into_inner()), now)
    }
}

async fn read(conn: &mut (impl redis::aio::ConnectionLike + Send)) -> Result<String, NotifyError> {
    // A flat list of pairs over RESP2, a map over RESP3 (the subscription
    // connection checks the flags on itself).
    let reply: std::collections::HashMap<String, String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query_async(conn)
        .await
        .map_err(|e| NotifyError::Redis(e.to_string()))?;
    Ok(reply.get("notify-keyspace-events").cloned().unwrap_or_default())
}

/// Of `needed`, what `value` leaves off: shown off, or not shown and not
/// found sent by `probe` (without a probe, what the value cannot show is
/// left to the subscriber's check).
async fn lacking(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    value: &str,
    needed: &BTreeSet<char>,
    probe: Option<&Probe>,
    probed: &mut Option<Probed>,
) -> Result<BTreeSet<char>, NotifyError> {
    let (mut off, unsure) = Flags::parse(value).lacks(needed);
    if let (false, Some(probe)) = (unsure.is_empty(), probe) {
        let answer = probe.answer(conn, value, &unsure).await?;
        if answer != Probed::Sent {
            off.extend(unsure);
        }
        *probed = Some(answer);
    }
    Ok(off)
}

/// Check that Redis sends what `needed` asks for, probing with `probe`
/// where the value cannot show it. With `configure`, add what is off to
/// what is set (never removing any) and check again.
pub async fn ensure(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    needed: &BTreeSet<char>,
    configure: bool,
    probe: Option<&Probe>,
) -> Result<Checked, NotifyError> {
    let current = read(conn).await?;
    let mut checked = Checked { read: current.clone(), now: current, ..Checked::default() };
    if needed.is_empty() {
        return Ok(checked);
    }
    checked.off = lacking(conn, &checked.read, needed, probe, &mut checked.probed).await?;
    checked.missing = checked.off.clone();
    if checked.off.is_empty() {
        return Ok(checked);
    }
    if !configure {
        checked.not_set = Some("the daemon may not set them (no --configure-notifications)".into());
        return Ok(checked);
    }
    checked.tried = true;
    let wanted: BTreeSet<char> = Flags::parse(&checked.read).on.union(needed).copied().collect();
    let mut set = redis::cmd("CONFIG");
    set.arg("SET").arg("notify-keyspace-events").arg(value(&wanted));
    match set.query_async::<()>(conn).await {
        Ok(()) => {}
        Err(e) if is_connection_error(&e) || e.is_timeout() => return Err(NotifyError::Redis(e.to_string())),
        Err(e) => {
            checked.not_set = Some(format!("Redis refused CONFIG SET: {e}"));
            return Ok(checked);
        }
    }
    if let Some(probe) = probe {
        probe.forget();
    }
    // Set, then seen: what Redis prints now, and what a probe finds under it.
    checked.now = read(conn).await?;
    checked.missing = lacking(conn, &checked.now, needed, probe, &mut checked.probed).await?;
    if !checked.missing.is_empty() {
        checked.not_set = Some("set, but Redis still does not send them".into());
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_of_common_events() {
        assert_eq!(class_of("set"), Some('$'));
        assert_eq!(class_of("del"), Some('g'));
        assert_eq!(class_of("expire"), Some('g'));
        assert_eq!(class_of("expired"), Some('x'));
        assert_eq!(class_of("hset"), Some('h'));
        assert_eq!(class_of("lpush"), Some('l'));
        assert_eq!(class_of("rpush"), Some('l'));
        assert_eq!(class_of("zadd"), Some('z'));
        assert_eq!(class_of("xadd"), Some('t'));
        assert_eq!(class_of("new"), Some('n'));
        assert_eq!(class_of("weird"), None);
    }

    #[test]
    fn the_error_says_what_the_value_hid_and_why_nothing_was_set() {
        let needed: BTreeSet<char> = "En".chars().collect();
        let n: BTreeSet<char> = ['n'].into();
        let checked = Checked {
            read: "AKE".into(),
            now: "AKE".into(),
            off: n.clone(),
            missing: n,
            probed: Some(Probed::NotSent),
            not_set: Some("Redis refused CONFIG SET: NOPERM".into()),
            tried: true,
        };
        let e = checked.require(&needed).unwrap_err().to_string();
        assert!(e.contains("missing `n` (`AKE` does not show `n`: a probe's `new` notification did not come back); Redis refused CONFIG SET: NOPERM"), "{e}");
        assert!(e.contains("CONFIG SET notify-keyspace-events AKEn"), "{e}");
        let not_allowed = Checked { tried: false, not_set: Some("no --configure-notifications".into()), ..checked };
        let e = not_allowed.require(&needed).unwrap_err().to_string();
        assert!(!e.contains("; no --configure-notifications"), "the message ends with that advice: {e}");
        let state = not_allowed.state(&BTreeSet::new(), &needed);
        assert_eq!((state.missing[0].flags.as_str(), state.missing[0].needed_by.as_str()), ("n", "key index"));
    }

    #[test]
    fn a_probe_key_lies_on_its_node() {
        let single = Probe::new("f", &[]);
        assert!(single.key.starts_with(PROBE_PREFIX.as_bytes()));
        let slots = [(5461, 10922)];
        let on_node = Probe::new("f", &slots);
        let slot = crate::store::target::slot(&on_node.key);
        assert!((5461..=10922).contains(&slot), "slot {slot}");
        assert!(on_node.key.starts_with(PROBE_PREFIX.as_bytes()));
    }

    #[test]
    fn a_probe_is_answered_by_its_marker_after_its_new() {
        let probe = Probe::new("f", &[]);
        let key = probe.key.clone();
        let (tx, mut rx) = oneshot::channel();
        *probe.pending() = Some(Pending { marker: "p0".into(), heard: false, back: Some(tx) });
        assert!(!probe.observe("new", b"other"), "another key is not the probe's");
        assert!(probe.observe("set", &key), "the probe key's notifications are its own");
        assert!(!probe.marker_seen(b"p1"), "another marker");
        assert!(probe.marker_seen(b"p0"));
        assert_eq!(rx.try_recv(), Ok(false), "no `new` before the marker");
        let (tx, mut rx) = oneshot::channel();
        *probe.pending() = Some(Pending { marker: "p1".into(), heard: false, back: Some(tx) });
        assert!(probe.observe("new", &key));
        assert!(probe.marker_seen(b"p1"));
        assert_eq!(rx.try_recv(), Ok(true));
    }
}
