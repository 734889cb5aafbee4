//! Host-side bindings of the `cachepol:policy` world (`wit/`).
//!
//! Imports are async (they talk to Redis) and trappable: a host function can
//! return an error the guest sees (`Ok(Err(e))`) or trap the call (`Err`).

wasmtime::component::bindgen!({
    world: "policy",
    path: "../wit",
    imports: { default: async | trappable },
    exports: { default: async },
    additional_derives: [PartialEq, Eq],
});

pub use self::cachepol::policy::types::{
    Denial, DeployEvent, ExpireCondition, Grant, KeyEvent, KeyOps, KeySubscription, KeyTtl, ScanPage, SetCondition,
    SetOptions, Subscriptions, SweepEvent, SweepReason, ValueKind,
};
pub use self::cachepol::policy::{clock, log, redis, types};
