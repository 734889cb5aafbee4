//! The [`Policy`] trait and the glue the export macro expands to.

use std::cell::RefCell;
use std::thread::LocalKey;

use serde::de::DeserializeOwned;

use crate::{DeployEvent, Error, Event, KeyEvent, Manifest, Outcome, SweepReason};

/// A cache policy.
///
/// Modelled on proxy-wasm's SDK: every hook has a default that does nothing,
/// so a policy implements only what it reacts to. An instance lives for as
/// long as the host keeps the component loaded; the host may re-create it
/// (calling `new` again with the same config) after a trap.
///
/// The host runs several instances of a policy at once (its lanes, 16 by
/// default), each with its own memory, and shares keyspace events out among
/// them by key: all events of one key reach the same instance, in order,
/// but an instance sees only its share of the keys. Deploy hooks and sweeps
/// run on one instance while the others are idle. So keep state that
/// matters in Redis, not in the policy's memory; a per-key cache in memory
/// is fine, a global counter is not (or ask the operator for `lanes = 1`).
///
/// ```no_run
/// use cachepol_guest_sdk::prelude::*;
///
/// /// Operator settings, from `[policies.drop-stale] config = { ... }`.
/// #[derive(Deserialize)]
/// #[serde(default, deny_unknown_fields)]
/// struct Config {
///     prefix: String,
/// }
///
/// impl Default for Config {
///     fn default() -> Config {
///         Config { prefix: "quiz".into() }
///     }
/// }
///
/// struct DropStale {
///     pattern: String,
/// }
///
/// impl Policy for DropStale {
///     type Config = Config;
///
///     fn new(config: Config) -> Result<Self, String> {
///         if config.prefix.is_empty() {
///             return Err("`prefix` is empty: that would be every key".into());
///         }
///         Ok(DropStale { pattern: format!("{}:*", glob::escape(&config.prefix)) })
///     }
///
///     fn manifest(&self) -> Manifest {
///         Manifest::new("drop-stale", env!("CARGO_PKG_VERSION"))
///             .on_deploys(&["*"])
///             .grant(&self.pattern, KeyOps::DELETE)
///     }
///
///     fn on_deploy(&mut self, _: DeployEvent) -> Result<Outcome, Error> {
///         let deleted = redis::delete_matching(&self.pattern)?;
///         Ok(Outcome::done().with_note(format!("{deleted} deleted")))
///     }
/// }
///
/// export_policy!(DropStale);
/// ```
pub trait Policy: Sized + 'static {
    /// Settings from the operator's config file, deserialized from JSON.
    /// `{}` when the operator gave none: use `#[serde(default)]` for
    /// defaults, and `#[serde(deny_unknown_fields)]` to catch typos.
    type Config: DeserializeOwned;

    /// Name, version, subscriptions and grants. Called after [`Policy::new`],
    /// so grants and subscriptions can follow the config. Must not call Redis.
    ///
    /// Ask for exactly what the config needs: a policy configured to delete
    /// `graph:{genre}` asks for `graph:*`, not `*`. The operator can only
    /// narrow these grants, and `cachepol check` prints them for review.
    /// See [`Policy`] for an example.
    fn manifest(&self) -> Manifest;

    /// Build the policy from its config; an `Err` refuses the load and its
    /// message is shown to the operator.
    ///
    /// Validate everything here (templates, globs, TTLs): a config refused
    /// at load keeps the running version serving, where one that fails at
    /// each event fails every event. See [`Policy`] for an example.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// A keyspace notification matching one of the manifest's key
    /// subscriptions.
    ///
    /// Events of one key arrive in order, on the same instance; waiting
    /// events come in batches, each still a call of this hook. Keep it
    /// cheap: it runs for every write the subscription matches.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use cachepol_guest_sdk::prelude::*;
    /// # struct P;
    /// # impl Policy for P {
    /// #     type Config = NoConfig;
    /// #     fn new(_: NoConfig) -> Result<Self, String> { Ok(P) }
    /// #     fn manifest(&self) -> Manifest { Manifest::new("p", "1.0.0") }
    /// fn on_key(&mut self, event: KeyEvent) -> Result<Outcome, Error> {
    ///     redis::expire_in_queued(&event.key, Duration::from_secs(3600), ExpireCondition::IfPersistent)?;
    ///     Ok(Outcome::done())
    /// }
    /// # }
    /// ```
    fn on_key(&mut self, event: KeyEvent) -> Result<Outcome, Error> {
        let _ = event;
        Ok(Outcome::done())
    }

    /// A deploy hook from a subscribed service.
    ///
    /// A hook is acknowledged only once every subscribed policy handled it.
    /// An error here makes the daemon retry it for this policy, then
    /// dead-letter it (a grant's refusal at once, as retrying cannot help),
    /// so make the hook idempotent: deleting twice is fine.
    ///
    /// ```no_run
    /// # use cachepol_guest_sdk::prelude::*;
    /// # struct P;
    /// # impl Policy for P {
    /// #     type Config = NoConfig;
    /// #     fn new(_: NoConfig) -> Result<Self, String> { Ok(P) }
    /// #     fn manifest(&self) -> Manifest { Manifest::new("p", "1.0.0") }
    /// fn on_deploy(&mut self, event: DeployEvent) -> Result<Outcome, Error> {
    ///     let mut deleted = 0;
    ///     for genre in event.tags_named("genre") {
    ///         deleted += redis::delete_matching(&format!("service_playlist:{}:*", glob::escape(genre)))?;
    ///     }
    ///     Ok(Outcome::done().with_note(format!("{deleted} deleted")))
    /// }
    /// # }
    /// ```
    fn on_deploy(&mut self, event: DeployEvent) -> Result<Outcome, Error> {
        let _ = event;
        Ok(Outcome::done())
    }

    /// Reconcile with Redis: events may have been missed (see `reason`).
    ///
    /// Keyspace notifications are fire-and-forget, so the host sweeps after
    /// every start, reconnect and dropped event; a policy that reacts to
    /// keys should bring the keyspace to where its events would have left
    /// it, with bulk calls rather than key by key. A policy that reacts to
    /// a few trigger keys can have a [`TriggerLedger`](crate::TriggerLedger)
    /// tell it which of them moved since it last acted.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use cachepol_guest_sdk::prelude::*;
    /// # struct P;
    /// # impl Policy for P {
    /// #     type Config = NoConfig;
    /// #     fn new(_: NoConfig) -> Result<Self, String> { Ok(P) }
    /// #     fn manifest(&self) -> Manifest { Manifest::new("p", "1.0.0") }
    /// fn on_sweep(&mut self, reason: SweepReason) -> Result<Outcome, Error> {
    ///     let fixed = redis::expire_matching_in("job:*", Duration::from_secs(86_400), true)?;
    ///     Ok(Outcome::done().with_note(format!("{}: {fixed} keys got a TTL", reason.name())))
    /// }
    /// # }
    /// ```
    fn on_sweep(&mut self, reason: SweepReason) -> Result<Outcome, Error> {
        let _ = reason;
        Ok(Outcome::done())
    }
}

/// Config type for policies without settings: accepts `{}` and `null`, and
/// rejects any field so that an operator's typo is not silently ignored.
///
/// ```
/// use cachepol_guest_sdk::NoConfig;
///
/// let _: NoConfig = serde_json::from_str("{}").unwrap();
/// assert!(serde_json::from_str::<NoConfig>(r#"{"ttl": 60}"#).is_err());
/// ```
#[derive(Clone, Copy, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// Where the export macro keeps the configured policy. The component model
/// gives a policy one thread, so a thread-local is the whole state.
pub type Slot<P> = LocalKey<RefCell<Option<P>>>;

/// `describe`: the configured policy's manifest.
pub fn describe<P: Policy>(slot: &'static Slot<P>) -> Manifest {
    slot.with(|s| match s.borrow().as_ref() {
        Some(policy) => policy.manifest(),
        // The host always configures first; an empty name makes it refuse
        // the manifest with a clear error if one ever does not.
        None => Manifest::new("", "0.0.0").description("describe called before configure"),
    })
}

/// `configure`: parse the config (empty means `{}`) and build the policy.
pub fn configure<P: Policy>(slot: &'static Slot<P>, config: &str) -> Result<(), String> {
    let text = if config.trim().is_empty() { "{}" } else { config };
    let parsed: P::Config = serde_json::from_str(text).map_err(|e| format!("invalid config: {e}"))?;
    let policy = P::new(parsed)?;
    slot.with(|s| *s.borrow_mut() = Some(policy));
    Ok(())
}

/// `handle`: one event, to the hook it belongs to.
pub fn handle<P: Policy>(slot: &'static Slot<P>, event: Event) -> Result<Outcome, Error> {
    slot.with(|s| {
        let mut guard = s.borrow_mut();
        let policy = guard.as_mut().ok_or_else(|| Error::policy("handle called before configure"))?;
        match event {
            Event::Key(e) => policy.on_key(e),
            Event::Deploy(e) => policy.on_deploy(e),
            Event::Sweep(e) => policy.on_sweep(e.reason),
        }
    })
}

/// `handle-keys`: a batch of keyspace events, `on_key` for each, in order.
pub fn handle_keys<P: Policy>(slot: &'static Slot<P>, events: Vec<KeyEvent>) -> Vec<Result<Outcome, Error>> {
    slot.with(|s| {
        let mut guard = s.borrow_mut();
        match guard.as_mut() {
            Some(policy) => events.into_iter().map(|e| policy.on_key(e)).collect(),
            None => events.iter().map(|_| Err(Error::policy("handle-keys called before configure"))).collect(),
        }
    })
}

/// Export a [`Policy`] implementation as the component's `policy` world.
/// Use it once per policy crate.
///
/// It generates the functions the host calls (`configure`, `describe`,
/// `handle`, `handle-keys`) and keeps the configured policy between calls,
/// so the crate itself contains no WIT glue.
///
/// ```no_run
/// use cachepol_guest_sdk::prelude::*;
///
/// struct Noop;
///
/// impl Policy for Noop {
///     type Config = NoConfig;
///     fn new(_: NoConfig) -> Result<Self, String> {
///         Ok(Noop)
///     }
///     fn manifest(&self) -> Manifest {
///         Manifest::new("noop", "1.0.0")
///     }
/// }
///
/// export_policy!(Noop);
/// ```
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        const _: () = {
            ::std::thread_local! {
                static SLOT: ::std::cell::RefCell<::std::option::Option<$policy>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }

            struct Export;

            impl $crate::bindings::Guest for Export {
                fn describe() -> $crate::Manifest {
                    $crate::__private::describe::<$policy>(&SLOT)
                }
                fn configure(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::configure::<$policy>(&SLOT, &config)
                }
                fn handle(event: $crate::Event) -> ::std::result::Result<$crate::Outcome, $crate::Error> {
                    $crate::__private::handle::<$policy>(&SLOT, event)
                }
                fn handle_keys(
                    events: ::std::vec::Vec<$crate::KeyEvent>,
                ) -> ::std::vec::Vec<::std::result::Result<$crate::Outcome, $crate::Error>> {
                    $crate::__private::handle_keys::<$policy>(&SLOT, events)
                }
            }

    $crate::bindings::export!(Export with_types_in $crate::bindings);
        };
    };
}
