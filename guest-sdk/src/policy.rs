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
/// The host runs several instances of a policy at once (its lanes, 8 by
/// default), each with its own memory, and shares keyspace events out among
/// them by key: all events of one key reach the same instance, in order,
/// but an instance sees only its share of the keys. Deploy hooks and sweeps
/// run on one instance while the others are idle. So keep state that
/// matters in Redis, not in the policy's memory; a per-key cache in memory
/// is fine, a global counter is not (or ask the operator for `lanes = 1`).
pub trait Policy: Sized + 'static {
    /// Settings from the operator's config file, deserialized from JSON.
    /// `{}` when the operator gave none: use `#[serde(default)]` for
    /// defaults, and `#[serde(deny_unknown_fields)]` to catch typos.
    type Config: DeserializeOwned;

    /// Name, version, subscriptions and grants. Called after [`Policy::new`],
    /// so grants and subscriptions can follow the config. Must not call Redis.
    fn manifest(&self) -> Manifest;

    /// Build the policy from its config; an `Err` refuses the load and its
    /// message is shown to the operator.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// A keyspace notification matching one of the manifest's key
    /// subscriptions.
    fn on_key(&mut self, event: KeyEvent) -> Result<Outcome, Error> {
        let _ = event;
        Ok(Outcome::done())
    }

    /// A deploy hook from a subscribed service.
    fn on_deploy(&mut self, event: DeployEvent) -> Result<Outcome, Error> {
        let _ = event;
        Ok(Outcome::done())
    }

    /// Reconcile with Redis: events may have been missed (see `reason`).
    fn on_sweep(&mut self, reason: SweepReason) -> Result<Outcome, Error> {
        let _ = reason;
        Ok(Outcome::done())
    }
}

/// Config type for policies without settings: accepts `{}` and `null`, and
/// rejects any field so that an operator's typo is not silently ignored.
#[derive(Clone, Copy, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// Where the export macro keeps the configured policy. The component model
/// gives a policy one thread, so a thread-local is the whole state.
pub type Slot<P> = LocalKey<RefCell<Option<P>>>;

pub fn describe<P: Policy>(slot: &'static Slot<P>) -> Manifest {
    slot.with(|s| match s.borrow().as_ref() {
        Some(policy) => policy.manifest(),
        // The host always configures first; an empty name makes it refuse
        // the manifest with a clear error if one ever does not.
        None => Manifest::new("", "0.0.0").description("describe called before configure"),
    })
}

pub fn configure<P: Policy>(slot: &'static Slot<P>, config: &str) -> Result<(), String> {
    let text = if config.trim().is_empty() { "{}" } else { config };
    let parsed: P::Config = serde_json::from_str(text).map_err(|e| format!("invalid config: {e}"))?;
    let policy = P::new(parsed)?;
    slot.with(|s| *s.borrow_mut() = Some(policy));
    Ok(())
}

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
