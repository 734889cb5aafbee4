//! An in-memory keyspace with Redis semantics, on a virtual clock.
//!
//! What it models, because policies depend on it:
//! - String values, `SET` with `NX`/`XX`/`PX`/`KEEPTTL`, `UNLINK`, `PEXPIRE`
//!   with `NX`/`XX`/`GT`/`LT` (a persistent key counts as an infinite TTL),
//!   `PERSIST`, `PTTL`, `TYPE`, `MGET`.
//! - Lists, hashes, sets and sorted sets the application writes
//!   ([`FakeRedis::app_write`]: `RPUSH`, `LPUSH`, `LPOP`, `RPOP`, `HSET`,
//!   `HDEL`, `SADD`, `SREM`, `ZADD`, `ZREM`), with Redis's events (`rpush`,
//!   ..., and `del` when the last element goes) and its type rules: `GET` of
//!   a list is `WRONGTYPE`, `MGET` gives nil for it, `SET` replaces any
//!   type.
//! - Expiry on a virtual clock: [`FakeRedis::advance`] moves time, and every
//!   operation first removes what is due, emitting `expired` like Redis's
//!   active expiry does.
//! - `SCAN` with cursors, `MATCH` (the same glob matcher Redis uses) and
//!   `COUNT`: each key gets a slot number when created; the cursor walks
//!   slots, so a key present for the whole iteration is returned exactly once
//!   and `COUNT` bounds the slots looked at, not the keys returned.
//! - Keyspace notifications for every write, with the event names Redis uses
//!   (`set`, `expire`, `del`, `expired`, `persist`), each tagged with who
//!   caused it, so echo suppression can be tested.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use cachepol_guest_sdk::glob::Glob;

use crate::store::backend::{Backend, BackendError, BulkPlan, BulkResult, Rows, ScanResult, expire_applies};
use crate::store::walks::{NodeAt, Position};
use crate::wit::{ExpireCondition, ExpireRow, KeyTtl, SetCondition, SetOptions, ValueKind};

/// The fake clock starts here (2024-01-01T00:00:00Z), so `now-ms` looks real.
pub const EPOCH_MS: u64 = 1_704_067_200_000;

/// A keyspace notification the fake emitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyspaceEvent {
    pub db: u32,
    pub op: String,
    pub key: String,
    /// The policy whose call caused it; `None` for the application (and for
    /// expiry, which Redis performs itself).
    pub origin: Option<Arc<str>>,
}

/// A key as seen by a test: value and remaining TTL.
#[derive(Clone, Debug, PartialEq)]
pub struct KeySnapshot {
    pub value: Value,
    pub ttl_ms: Option<u64>,
}

/// A key's value, of each type the fake models.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    String(Vec<u8>),
    List(VecDeque<Vec<u8>>),
    Hash(BTreeMap<Vec<u8>, Vec<u8>>),
    Set(BTreeSet<Vec<u8>>),
    /// Member -> score.
    ZSet(BTreeMap<Vec<u8>, f64>),
}

impl Value {
    /// The string's bytes; `None` for the other types.
    pub fn as_string(&self) -> Option<&[u8]> {
        match self {
            Value::String(v) => Some(v),
            _ => None,
        }
    }

    pub fn kind(&self) -> ValueKind {
        match self {
            Value::String(_) => ValueKind::String,
            Value::List(_) => ValueKind::List,
            Value::Hash(_) => ValueKind::Hash,
            Value::Set(_) => ValueKind::Set,
            Value::ZSet(_) => ValueKind::Zset,
        }
    }

    /// A list, hash, set or sorted set with no element (Redis removes
    /// those keys).
    pub fn is_empty(&self) -> bool {
        match self {
            Value::String(_) => false,
            Value::List(l) => l.is_empty(),
            Value::Hash(h) => h.is_empty(),
            Value::Set(s) => s.is_empty(),
            Value::ZSet(z) => z.is_empty(),
        }
    }

    /// One line, the same for the fake and for what a test reads back from
    /// Redis: `list[a,b]`, `hash{f=v}`, `set{a,b}`, `zset[a=1,b=2]` (by
    /// score, then member), or the string itself.
    pub fn render(&self) -> String {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match self {
            Value::String(v) => text(v),
            Value::List(l) => format!("list[{}]", l.iter().map(|v| text(v)).collect::<Vec<_>>().join(",")),
            Value::Hash(h) => {
                format!(
                    "hash{{{}}}",
                    h.iter().map(|(f, v)| format!("{}={}", text(f), text(v))).collect::<Vec<_>>().join(",")
                )
            }
            Value::Set(s) => format!("set{{{}}}", s.iter().map(|v| text(v)).collect::<Vec<_>>().join(",")),
            Value::ZSet(z) => {
                let mut members: Vec<(&Vec<u8>, &f64)> = z.iter().collect();
                members.sort_by(|a, b| a.1.total_cmp(b.1).then(a.0.cmp(b.0)));
                format!(
                    "zset[{}]",
                    members.iter().map(|(m, s)| format!("{}={s}", text(m))).collect::<Vec<_>>().join(",")
                )
            }
        }
    }
}

/// What an application write to a list, hash, set or sorted set does.
#[derive(Clone, Debug, PartialEq)]
pub enum AppWrite {
    Rpush(Vec<String>),
    Lpush(Vec<String>),
    Lpop(usize),
    Rpop(usize),
    Hset(BTreeMap<String, String>),
    Hdel(Vec<String>),
    Sadd(Vec<String>),
    Srem(Vec<String>),
    Zadd(BTreeMap<String, f64>),
    Zrem(Vec<String>),
}

impl AppWrite {
    /// What Redis refuses before running the command: no elements (an
    /// arity error), a count of 0, a score that is not a number.
    pub fn check(&self) -> Result<(), String> {
        let empty = match self {
            AppWrite::Rpush(v) | AppWrite::Lpush(v) | AppWrite::Hdel(v) | AppWrite::Sadd(v) => v.is_empty(),
            AppWrite::Srem(v) | AppWrite::Zrem(v) => v.is_empty(),
            AppWrite::Lpop(n) | AppWrite::Rpop(n) => *n == 0,
            AppWrite::Hset(m) => m.is_empty(),
            AppWrite::Zadd(m) => {
                if m.values().any(|s| s.is_nan()) {
                    return Err("a score must be a number, not NaN".into());
                }
                m.is_empty()
            }
        };
        if empty { Err("needs at least one element (or a count of at least 1)".into()) } else { Ok(()) }
    }

    /// The command's (and its keyspace event's) name.
    pub fn name(&self) -> &'static str {
        match self {
            AppWrite::Rpush(_) => "rpush",
            AppWrite::Lpush(_) => "lpush",
            AppWrite::Lpop(_) => "lpop",
            AppWrite::Rpop(_) => "rpop",
            AppWrite::Hset(_) => "hset",
            AppWrite::Hdel(_) => "hdel",
            AppWrite::Sadd(_) => "sadd",
            AppWrite::Srem(_) => "srem",
            AppWrite::Zadd(_) => "zadd",
            AppWrite::Zrem(_) => "zrem",
        }
    }

    /// The type the command works on, and the empty value it creates a
    /// missing key with (`None`: it never creates one).
    fn creates(&self) -> (ValueKind, Option<Value>) {
        match self {
            AppWrite::Rpush(_) | AppWrite::Lpush(_) => (ValueKind::List, Some(Value::List(VecDeque::new()))),
            AppWrite::Lpop(_) | AppWrite::Rpop(_) => (ValueKind::List, None),
            AppWrite::Hset(_) => (ValueKind::Hash, Some(Value::Hash(BTreeMap::new()))),
            AppWrite::Hdel(_) => (ValueKind::Hash, None),
            AppWrite::Sadd(_) => (ValueKind::Set, Some(Value::Set(BTreeSet::new()))),
            AppWrite::Srem(_) => (ValueKind::Set, None),
            AppWrite::Zadd(_) => (ValueKind::Zset, Some(Value::ZSet(BTreeMap::new()))),
            AppWrite::Zrem(_) => (ValueKind::Zset, None),
        }
    }

    /// Apply to `value` (of the right type); whether anything changed.
    fn apply(&self, value: &mut Value) -> bool {
        let b = |s: &String| s.as_bytes().to_vec();
        match (self, value) {
            (AppWrite::Rpush(items), Value::List(l)) => {
                l.extend(items.iter().map(b));
                !items.is_empty()
            }
            (AppWrite::Lpush(items), Value::List(l)) => {
                items.iter().for_each(|i| l.push_front(b(i)));
                !items.is_empty()
            }
            (AppWrite::Lpop(n), Value::List(l)) => (0..*n).filter(|_| l.pop_front().is_some()).count() > 0,
            (AppWrite::Rpop(n), Value::List(l)) => (0..*n).filter(|_| l.pop_back().is_some()).count() > 0,
            (AppWrite::Hset(fields), Value::Hash(h)) => {
                fields.iter().for_each(|(f, v)| {
                    h.insert(b(f), b(v));
                });
                !fields.is_empty()
            }
            (AppWrite::Hdel(fields), Value::Hash(h)) => {
                fields.iter().filter(|f| h.remove(f.as_bytes()).is_some()).count() > 0
            }
            (AppWrite::Sadd(members), Value::Set(set)) => members.iter().filter(|m| set.insert(b(m))).count() > 0,
            (AppWrite::Srem(members), Value::Set(set)) => {
                members.iter().filter(|m| set.remove(m.as_bytes())).count() > 0
            }
            // Redis notifies `zadd` only if a member was added or its score
            // changed.
            (AppWrite::Zadd(members), Value::ZSet(z)) => {
                members.iter().filter(|(m, score)| z.insert(b(m), **score) != Some(**score)).count() > 0
            }
            (AppWrite::Zrem(members), Value::ZSet(z)) => {
                members.iter().filter(|m| z.remove(m.as_bytes()).is_some()).count() > 0
            }
            _ => false,
        }
    }
}

/// What Redis answers to a command on a key of another type.
pub const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

#[derive(Debug)]
struct Entry {
    value: Value,
    expires_at: Option<u64>,
    slot: u64,
}

#[derive(Debug)]
struct State {
    keys: HashMap<String, Entry>,
    /// Slot number -> key, for `SCAN` cursors.
    slots: BTreeMap<u64, String>,
    next_slot: u64,
    now_ms: u64,
    events: Vec<KeyspaceEvent>,
    next_token: u64,
    unavailable: Option<String>,
}

/// The fake Redis keyspace. Cheap to clone; clones share the keyspace.
#[derive(Clone, Debug)]
pub struct FakeRedis {
    state: Arc<Mutex<State>>,
}

impl Default for FakeRedis {
    fn default() -> FakeRedis {
        FakeRedis::new()
    }
}

impl FakeRedis {
    /// An empty keyspace at [`EPOCH_MS`].
    pub fn new() -> FakeRedis {
        FakeRedis {
            state: Arc::new(Mutex::new(State {
                keys: HashMap::new(),
                slots: BTreeMap::new(),
                next_slot: 1,
                now_ms: EPOCH_MS,
                events: Vec::new(),
                next_token: 1,
                unavailable: None,
            })),
        }
    }

    /// A [`Backend`] over this keyspace whose writes are tagged with
    /// `origin` (a policy name).
    pub fn client(&self, origin: &str) -> FakeClient {
        FakeClient { redis: self.clone(), origin: Some(Arc::from(origin)) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock can only come from a bug in this
        // file; the keyspace is still consistent enough to inspect.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The virtual time, in ms since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.lock().now_ms
    }

    /// Move the clock forward; keys that expire meanwhile are removed with an
    /// `expired` event.
    pub fn advance(&self, ms: u64) {
        let mut s = self.lock();
        s.now_ms += ms;
        s.expire_due();
    }

    /// Make every operation fail as if Redis were down (`Some(reason)`), or
    /// bring it back (`None`).
    pub fn set_unavailable(&self, reason: Option<&str>) {
        self.lock().unavailable = reason.map(str::to_owned);
    }

    /// Take the keyspace notifications emitted since the last call.
    pub fn take_events(&self) -> Vec<KeyspaceEvent> {
        std::mem::take(&mut self.lock().events)
    }

    /// Every live key with its value and remaining TTL, sorted by name.
    pub fn snapshot(&self) -> BTreeMap<String, KeySnapshot> {
        let mut s = self.lock();
        s.expire_due();
        let now = s.now_ms;
        s.keys
            .iter()
            .map(|(k, e)| {
                let snap = KeySnapshot { value: e.value.clone(), ttl_ms: e.expires_at.map(|at| at - now) };
                (k.clone(), snap)
            })
            .collect()
    }

    /// The application writes a list, hash, set or sorted set: Redis's
    /// command semantics and events (`rpush`, ..., then `del` if the last
    /// element went). Fails with [`WRONGTYPE`] on a key of another type.
    pub fn app_write(&self, key: &str, write: &AppWrite) -> Result<(), String> {
        write.check()?;
        let mut s = self.lock();
        s.expire_due();
        s.app_write(key, write)
    }

    /// Create `key` holding `value` (a scenario's starting keys), with no
    /// event, replacing what was there.
    pub fn app_insert(&self, key: &str, value: Value, ttl_ms: Option<u64>) {
        let mut s = self.lock();
        s.remove(key);
        let expires_at = ttl_ms.map(|ttl| s.now_ms + ttl);
        s.insert(key, value, expires_at);
    }

    /// The application writes `key` (not a policy): `SET key value [PX ttl]`.
    pub fn app_set(&self, key: &str, value: &[u8], ttl_ms: Option<u64>) {
        let options = SetOptions { ttl_ms, condition: SetCondition::Always, keep_ttl: false };
        self.lock().set(key, value, &options, None);
    }

    /// The application deletes keys; returns how many existed.
    pub fn app_del(&self, keys: &[String]) -> u64 {
        self.lock().del(keys, None)
    }

    /// The application sets a TTL.
    pub fn app_expire(&self, key: &str, ttl_ms: u64) -> bool {
        self.lock().expire(key, ttl_ms, ExpireCondition::Always, None)
    }

    /// The application removes a TTL.
    pub fn app_persist(&self, key: &str) -> bool {
        self.lock().persist(key, None)
    }
}

impl State {
    fn emit(&mut self, op: &str, key: &str, origin: Option<&Arc<str>>) {
        self.events.push(KeyspaceEvent { db: 0, op: op.to_owned(), key: key.to_owned(), origin: origin.cloned() });
    }

    /// Remove every key whose time has come, in slot order (deterministic).
    fn expire_due(&mut self) {
        let now = self.now_ms;
        let mut due: Vec<(u64, String)> = self
            .keys
            .iter()
            .filter(|(_, e)| e.expires_at.is_some_and(|at| at <= now))
            .map(|(k, e)| (e.slot, k.clone()))
            .collect();
        due.sort();
        for (_, key) in due {
            self.remove(&key);
            self.emit("expired", &key, None);
        }
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.keys.remove(key) {
            Some(entry) => {
                self.slots.remove(&entry.slot);
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, key: &str, value: Value, expires_at: Option<u64>) {
        let slot = self.next_slot;
        self.next_slot += 1;
        self.slots.insert(slot, key.to_owned());
        self.keys.insert(key.to_owned(), Entry { value, expires_at, slot });
    }

    fn app_write(&mut self, key: &str, write: &AppWrite) -> Result<(), String> {
        let (kind, created) = write.creates();
        match self.keys.get(key).map(|e| e.value.kind()) {
            Some(k) if k != kind => return Err(WRONGTYPE.to_owned()),
            Some(_) => {}
            None => match created {
                Some(empty) => self.insert(key, empty, None),
                None => return Ok(()),
            },
        }
        let entry = self.keys.get_mut(key).expect("present");
        let changed = write.apply(&mut entry.value);
        let emptied = entry.value.is_empty();
        if changed {
            self.emit(write.name(), key, None);
        }
        if emptied {
            self.remove(key);
            if changed {
                self.emit("del", key, None);
            }
        }
        Ok(())
    }

    fn set(&mut self, key: &str, value: &[u8], options: &SetOptions, origin: Option<&Arc<str>>) -> bool {
        let exists = self.keys.contains_key(key);
        let allowed = match options.condition {
            SetCondition::Always => true,
            SetCondition::IfAbsent => !exists,
            SetCondition::IfPresent => exists,
        };
        if !allowed {
            return false;
        }
        let expires_at = match (options.ttl_ms, options.keep_ttl) {
            (Some(ttl), _) => Some(self.now_ms + ttl),
            (None, true) => self.keys.get(key).and_then(|e| e.expires_at),
            (None, false) => None,
        };
        match self.keys.get_mut(key) {
            Some(entry) => {
                entry.value = Value::String(value.to_vec());
                entry.expires_at = expires_at;
            }
            None => self.insert(key, Value::String(value.to_vec()), expires_at),
        }
        self.emit("set", key, origin);
        if options.ttl_ms.is_some() {
            self.emit("expire", key, origin);
        }
        true
    }

    fn del(&mut self, keys: &[String], origin: Option<&Arc<str>>) -> u64 {
        let mut n = 0;
        for key in keys {
            if self.remove(key) {
                self.emit("del", key, origin);
                n += 1;
            }
        }
        n
    }

    fn expire(&mut self, key: &str, ttl_ms: u64, condition: ExpireCondition, origin: Option<&Arc<str>>) -> bool {
        let now = self.now_ms;
        let Some(entry) = self.keys.get_mut(key) else {
            return false;
        };
        let at = now + ttl_ms;
        let allowed = expire_applies(condition, entry.expires_at.map(|e| e - now), ttl_ms);
        if allowed {
            entry.expires_at = Some(at);
            self.emit("expire", key, origin);
        }
        allowed
    }

    fn persist(&mut self, key: &str, origin: Option<&Arc<str>>) -> bool {
        match self.keys.get_mut(key) {
            Some(entry) if entry.expires_at.is_some() => {
                entry.expires_at = None;
                self.emit("persist", key, origin);
                true
            }
            _ => false,
        }
    }
}

/// A [`Backend`] over a [`FakeRedis`], tagging its writes with an origin.
#[derive(Clone, Debug)]
pub struct FakeClient {
    redis: FakeRedis,
    origin: Option<Arc<str>>,
}

impl FakeClient {
    /// Lock the state, run due expiry, and fail if the fake is "down".
    fn begin(&self) -> Result<MutexGuard<'_, State>, BackendError> {
        let mut s = self.redis.lock();
        if let Some(reason) = &s.unavailable {
            return Err(BackendError::Unavailable(reason.clone()));
        }
        s.expire_due();
        Ok(s)
    }

    /// A bulk operation over the keys matching `pattern`, in `SCAN` order
    /// from where the plan resumes, stopping (and saying where) when the
    /// plan's limits are reached, as the daemon's walks do.
    fn bulk(
        &self,
        pattern: &str,
        plan: &BulkPlan<'_>,
        mut apply: impl FnMut(&mut State, &str, Option<&Arc<str>>) -> bool,
    ) -> Result<BulkResult, BackendError> {
        let mut s = self.begin()?;
        let mut result = BulkResult::default();
        let Some(from) = plan.resume.map_or(Some(0), |at| at.resume_on("", FAKE_RUN_ID)) else {
            return Ok(result);
        };
        let glob = Glob::new(pattern);
        let keys: Vec<(u64, String)> = s.slots.range(from..).map(|(slot, key)| (*slot, key.clone())).collect();
        for (slot, key) in keys {
            let full = result.affected >= plan.limit || result.examined >= plan.examine;
            if !(glob.is_match_all() || glob.matches(&key)) {
                result.examined += 1;
                continue;
            }
            if !(plan.allow)(key.as_bytes()) {
                result.refused += 1;
                continue;
            }
            if full {
                result.truncated = true;
                let at = NodeAt { run_id: FAKE_RUN_ID.into(), cursor: slot, done: false };
                result.stopped = Some(Position { nodes: [(String::new(), at)].into(), index: None });
                break;
            }
            result.examined += 1;
            if apply(&mut s, &key, self.origin.as_ref()) {
                result.record(key.as_bytes());
            }
        }
        Ok(result)
    }
}

/// The fake's `run_id`: its cursors (slots) stay valid for its life.
const FAKE_RUN_ID: &str = "fake";

#[async_trait]
impl Backend for FakeClient {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        match self.begin()?.keys.get(key).map(|e| &e.value) {
            None => Ok(None),
            Some(Value::String(v)) => Ok(Some(v.clone())),
            Some(_) => Err(BackendError::Command(WRONGTYPE.to_owned())),
        }
    }

    async fn mget(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, BackendError> {
        let s = self.begin()?;
        Ok(keys.iter().map(|k| s.keys.get(k).and_then(|e| e.value.as_string()).map(<[u8]>::to_vec)).collect())
    }

    async fn exists(&self, key: &str) -> Result<bool, BackendError> {
        Ok(self.begin()?.keys.contains_key(key))
    }

    async fn ttl(&self, key: &str) -> Result<KeyTtl, BackendError> {
        let s = self.begin()?;
        Ok(match s.keys.get(key) {
            None => KeyTtl::Missing,
            Some(Entry { expires_at: None, .. }) => KeyTtl::Persistent,
            Some(Entry { expires_at: Some(at), .. }) => KeyTtl::ExpiresInMs(at - s.now_ms),
        })
    }

    async fn key_type(&self, key: &str) -> Result<Option<ValueKind>, BackendError> {
        Ok(self.begin()?.keys.get(key).map(|e| e.value.kind()))
    }

    async fn scan(&self, cursor: u64, pattern: &str, count: u32) -> Result<ScanResult, BackendError> {
        let s = self.begin()?;
        let glob = Glob::new(pattern);
        let mut slots = s.slots.range(cursor..);
        let mut keys = Vec::new();
        for (_, key) in slots.by_ref().take(count.max(1) as usize) {
            if glob.is_match_all() || glob.matches(key) {
                keys.push(key.as_bytes().to_vec());
            }
        }
        let next = slots.next().map_or(0, |(slot, _)| *slot);
        Ok((next, keys))
    }

    async fn set(&self, key: &str, value: &[u8], options: &SetOptions) -> Result<bool, BackendError> {
        Ok(self.begin()?.set(key, value, options, self.origin.as_ref()))
    }

    async fn del(&self, keys: &[String]) -> Result<u64, BackendError> {
        Ok(self.begin()?.del(keys, self.origin.as_ref()))
    }

    async fn expire(&self, key: &str, ttl_ms: u64, condition: ExpireCondition) -> Result<bool, BackendError> {
        Ok(self.begin()?.expire(key, ttl_ms, condition, self.origin.as_ref()))
    }

    async fn persist(&self, key: &str) -> Result<bool, BackendError> {
        Ok(self.begin()?.persist(key, self.origin.as_ref()))
    }

    async fn delete_matching(&self, pattern: &str, plan: &BulkPlan<'_>) -> Result<BulkResult, BackendError> {
        self.bulk(pattern, plan, |s, key, origin| s.del(&[key.to_owned()], origin) > 0)
    }

    async fn expire_matching(&self, rows: &[ExpireRow], plan: &BulkPlan<'_>) -> Result<BulkResult, BackendError> {
        let rows = Rows::new(rows);
        // Keys no row matches are passed over, not refused.
        let allow = |key: &[u8]| rows.row_of(key).is_none() || (plan.allow)(key);
        self.bulk(&rows.scan_pattern(), &BulkPlan { allow: &allow, ..*plan }, |s, key, origin| {
            rows.row_of(key.as_bytes()).is_some_and(|row| s.expire(key, row.ttl_ms, Rows::condition(row), origin))
        })
    }

    async fn lock_acquire(&self, name: &str, ttl_ms: u64) -> Result<Option<String>, BackendError> {
        let mut s = self.begin()?;
        let token = format!("fake-token-{}", s.next_token);
        let options = SetOptions { ttl_ms: Some(ttl_ms), condition: SetCondition::IfAbsent, keep_ttl: false };
        if s.set(name, token.as_bytes(), &options, self.origin.as_ref()) {
            s.next_token += 1;
            Ok(Some(token))
        } else {
            Ok(None)
        }
    }

    async fn lock_release(&self, name: &str, token: &str) -> Result<bool, BackendError> {
        let mut s = self.begin()?;
        // The release script's `GET` fails on a key of another type.
        let holds = match s.keys.get(name).map(|e| &e.value) {
            Some(Value::String(v)) => v == token.as_bytes(),
            Some(_) => return Err(BackendError::Command(WRONGTYPE.to_owned())),
            None => false,
        };
        Ok(holds && s.del(&[name.to_owned()], self.origin.as_ref()) > 0)
    }

    fn now_ms(&self) -> u64 {
        self.redis.now_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow_all() -> impl Fn(&[u8]) -> bool + Send + Sync {
        |_: &[u8]| true
    }

    fn ops(events: &[KeyspaceEvent]) -> Vec<(&str, &str)> {
        events.iter().map(|e| (e.op.as_str(), e.key.as_str())).collect()
    }

    #[tokio::test]
    async fn the_applications_list_hash_set_and_zset_writes_emit_what_redis_does() {
        let redis = FakeRedis::new();
        let items = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        redis.app_write("q", &AppWrite::Rpush(items(&["a", "b"]))).unwrap();
        redis.app_write("q", &AppWrite::Lpop(5)).unwrap();
        redis.app_write("q", &AppWrite::Lpop(1)).unwrap();
        redis.app_write("h", &AppWrite::Hset([("f".to_owned(), "v".to_owned())].into())).unwrap();
        redis.app_write("z", &AppWrite::Zadd([("m".to_owned(), 1.0)].into())).unwrap();
        redis.app_write("z", &AppWrite::Zadd([("m".to_owned(), 1.0)].into())).unwrap();
        redis.app_write("s", &AppWrite::Srem(items(&["x"]))).unwrap();
        let events = redis.take_events();
        assert_eq!(
            ops(&events),
            [("rpush", "q"), ("lpop", "q"), ("del", "q"), ("hset", "h"), ("zadd", "z")],
            "popping the last element deletes the key; an unchanged zadd or an srem of nothing is silent"
        );
        assert_eq!(redis.app_write("h", &AppWrite::Sadd(items(&["a"]))), Err(WRONGTYPE.to_owned()));
        let client = redis.client("p");
        assert!(client.get("h").await.is_err(), "GET of a hash is WRONGTYPE");
        assert_eq!(client.mget(&items(&["h", "nothing"])).await.unwrap(), vec![None, None]);
        assert_eq!(client.key_type("z").await.unwrap(), Some(ValueKind::Zset));
        let plain = SetOptions { ttl_ms: None, condition: SetCondition::Always, keep_ttl: false };
        assert!(client.set("h", b"now a string", &plain).await.unwrap(), "SET replaces any type");
        assert_eq!(client.get("h").await.unwrap().as_deref(), Some(&b"now a string"[..]));
    }

    #[tokio::test]
    async fn set_with_ttl_emits_set_then_expire_and_expires_on_the_clock() {
        let redis = FakeRedis::new();
        let c = redis.client("p");
        let opts = SetOptions { ttl_ms: Some(1000), condition: SetCondition::Always, keep_ttl: false };
        assert!(c.set("k", b"v", &opts).await.unwrap());
        assert_eq!(c.ttl("k").await.unwrap(), KeyTtl::ExpiresInMs(1000));
        let events = redis.take_events();
        assert_eq!(ops(&events), [("set", "k"), ("expire", "k")]);
        assert_eq!(events[0].origin.as_deref(), Some("p"));
        redis.advance(999);
        assert!(c.exists("k").await.unwrap());
        redis.advance(1);
        assert!(!c.exists("k").await.unwrap());
        let events = redis.take_events();
        assert_eq!(ops(&events), [("expired", "k")]);
        assert_eq!(events[0].origin, None, "expiry is Redis's own doing");
    }

    #[tokio::test]
    async fn set_conditions_and_keepttl() {
        let redis = FakeRedis::new();
        let c = redis.client("p");
        redis.app_set("k", b"1", Some(5000));
        let nx = SetOptions { ttl_ms: None, condition: SetCondition::IfAbsent, keep_ttl: false };
        assert!(!c.set("k", b"2", &nx).await.unwrap());
        let xx_keep = SetOptions { ttl_ms: None, condition: SetCondition::IfPresent, keep_ttl: true };
        assert!(c.set("k", b"3", &xx_keep).await.unwrap());
        assert_eq!(c.ttl("k").await.unwrap(), KeyTtl::ExpiresInMs(5000));
        assert!(!c.set("missing", b"x", &xx_keep).await.unwrap());
        redis.app_set("k", b"4", None);
        assert_eq!(c.ttl("k").await.unwrap(), KeyTtl::Persistent, "plain SET clears the TTL");
    }

    #[tokio::test]
    async fn expire_conditions_treat_persistent_as_infinite() {
        let redis = FakeRedis::new();
        let c = redis.client("p");
        redis.app_set("p", b"", None);
        redis.app_set("v", b"", Some(10_000));
        assert!(!c.expire("p", 100, ExpireCondition::IfLonger).await.unwrap());
        assert!(!c.expire("p", 100, ExpireCondition::IfVolatile).await.unwrap());
        assert!(c.expire("p", 100_000, ExpireCondition::IfShorter).await.unwrap());
        assert!(!c.expire("v", 100, ExpireCondition::IfPersistent).await.unwrap());
        assert!(!c.expire("v", 20_000, ExpireCondition::IfShorter).await.unwrap());
        assert!(c.expire("v", 5_000, ExpireCondition::IfShorter).await.unwrap());
        assert!(c.expire("v", 50_000, ExpireCondition::IfLonger).await.unwrap());
        assert_eq!(c.ttl("v").await.unwrap(), KeyTtl::ExpiresInMs(50_000));
        assert!(!c.expire("missing", 1, ExpireCondition::Always).await.unwrap());
        assert!(c.persist("v").await.unwrap());
        assert!(!c.persist("v").await.unwrap());
    }

    #[tokio::test]
    async fn scan_returns_each_stable_key_once_across_pages() {
        let redis = FakeRedis::new();
        let c = redis.client("p");
        for i in 0..25 {
            redis.app_set(&format!("quiz:{i}"), b"", None);
            redis.app_set(&format!("other:{i}"), b"", None);
        }
        let mut seen = Vec::new();
        let mut cursor = 0;
        let mut pages = 0;
        loop {
            let (next, keys) = c.scan(cursor, "quiz:*", 7).await.unwrap();
            assert!(keys.len() <= 7);
            // Keys created mid-iteration may or may not be seen; keys present
            // throughout must be seen exactly once.
            redis.app_set(&format!("quiz:new{pages}"), b"", None);
            seen.extend(keys.into_iter().map(|k| String::from_utf8(k).unwrap()));
            pages += 1;
            if next == 0 {
                break;
            }
            cursor = next;
        }
        for i in 0..25 {
            assert_eq!(seen.iter().filter(|k| **k == format!("quiz:{i}")).count(), 1);
        }
        assert!(seen.iter().all(|k| k.starts_with("quiz:")));
    }

    #[tokio::test]
    async fn bulk_operations_respect_filter_and_limit() {
        let redis = FakeRedis::new();
        let c = redis.client("p");
        for i in 0..10 {
            redis.app_set(&format!("quiz:{i}"), b"", None);
        }
        redis.app_set("quiz:secret", b"", None);
        let allow = |k: &[u8]| k != b"quiz:secret";
        let plan = BulkPlan::new(&allow, 4);
        let r = c.delete_matching("quiz:*", &plan).await.unwrap();
        assert_eq!((r.affected, r.truncated), (4, true));
        assert_eq!(r.sample.len(), 4);
        let everything = allow_all();
        let plan = BulkPlan::new(&allow, u64::MAX);
        let r = c.delete_matching("quiz:*", &plan).await.unwrap();
        assert_eq!((r.affected, r.refused, r.truncated), (6, 1, false));
        assert!(redis.snapshot().contains_key("quiz:secret"));
        redis.app_set("job:1", b"", None);
        redis.app_set("job:2", b"", Some(10));
        let plan = BulkPlan::new(&everything, u64::MAX);
        let row = |pattern: &str, ttl_ms| ExpireRow { pattern: pattern.into(), ttl_ms, only_if_persistent: true };
        let r = c.expire_matching(&[row("job:*", 86_400_000)], &plan).await.unwrap();
        assert_eq!(r.affected, 1, "only the persistent key gets a TTL");
        assert_eq!(redis.snapshot()["job:2"].ttl_ms, Some(10));
        // Several rows, one pass, first match wins.
        redis.app_set("job:lock:1", b"", None);
        redis.app_set("lock:2", b"", None);
        redis.app_set("other", b"", None);
        let r =
            c.expire_matching(&[row("job:lock:*", 300), row("job:*", 900), row("lock:*", 60)], &plan).await.unwrap();
        assert_eq!(r.affected, 2);
        let keys = redis.snapshot();
        assert_eq!(
            (keys["job:lock:1"].ttl_ms, keys["lock:2"].ttl_ms, keys["other"].ttl_ms),
            (Some(300), Some(60), None)
        );
    }

    #[tokio::test]
    async fn locks_are_compare_and_delete() {
        let redis = FakeRedis::new();
        let c = redis.client("p");
        let token = c.lock_acquire("lock:a", 1000).await.unwrap().unwrap();
        assert_eq!(c.lock_acquire("lock:a", 1000).await.unwrap(), None);
        assert!(!c.lock_release("lock:a", "wrong").await.unwrap());
        assert!(c.lock_release("lock:a", &token).await.unwrap());
        assert!(!c.lock_release("lock:a", &token).await.unwrap());
        let again = c.lock_acquire("lock:a", 1000).await.unwrap().unwrap();
        assert_ne!(again, token, "tokens are never reused");
        redis.advance(1000);
        assert!(c.lock_acquire("lock:a", 1000).await.unwrap().is_some(), "an expired lock is free");
    }

    #[tokio::test]
    async fn an_unavailable_fake_fails_every_call() {
        let redis = FakeRedis::new();
        let c = redis.client("p");
        redis.set_unavailable(Some("connection refused"));
        assert_eq!(c.get("k").await.unwrap_err(), BackendError::Unavailable("connection refused".into()));
        redis.set_unavailable(None);
        assert_eq!(c.get("k").await.unwrap(), None);
    }
}
