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
    Denial, DeployEvent, ExpireCondition, ExpireRow, Grant, KeyOps, KeySubscription, KeyTtl, ScanPage, SetCondition,
    SetOptions, Subscriptions, SweepEvent, SweepReason, ValueKind,
};
pub use self::cachepol::policy::{clock, log, redis, types};

/// The imports of policies built against contract 0.1.0, linked beside
/// 0.2.0's so that they keep loading. Its types are 0.2.0's (unchanged
/// since), so only the import traits are new; [`crate::sandbox::hostapi`]
/// implements them by calling the 0.2.0 ones. The exports are the same
/// functions with the same types, so one set of export bindings serves
/// both.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        world: "cachepol:policy/policy@0.1.0",
        path: "../wit/compat/policy-0.1.0.wit",
        imports: { default: async | trappable },
        exports: { default: async },
        with: { "cachepol:policy/types@0.1.0": crate::wit::types },
    });

    pub use self::cachepol::policy::{clock, log, redis};
}

/// How a person reads a contract error: in log lines, dead-letter reasons
/// and CLI output. (The generated `Display` of [`Error`] is its `Debug`.)
pub struct Shown<'a>(pub &'a Error);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Error::Denied(d) => write!(f, "denied: {} `{}`: {}", d.op, d.target.escape_debug(), d.reason),
            Error::BudgetExceeded(what) => write!(f, "budget exceeded: {what}"),
            Error::InvalidArgument(what) => write!(f, "invalid argument: {what}"),
            Error::Redis(what) => write!(f, "redis: {what}"),
            Error::Policy(what) => write!(f, "{what}"),
        }
    }
}

/// Every sweep reason, in the WIT's order.
pub const SWEEP_REASONS: [SweepReason; 6] = [
    SweepReason::Start,
    SweepReason::Reconnect,
    SweepReason::Gap,
    SweepReason::Periodic,
    SweepReason::Manual,
    SweepReason::Reload,
];

/// A sweep's reason as the WIT spells it, for log lines and scenario files.
pub fn sweep_reason_name(reason: SweepReason) -> &'static str {
    match reason {
        SweepReason::Start => "start",
        SweepReason::Reconnect => "reconnect",
        SweepReason::Gap => "gap",
        SweepReason::Periodic => "periodic",
        SweepReason::Manual => "manual",
        SweepReason::Reload => "reload",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_as_sentences() {
        let denied = Error::Denied(Denial {
            op: "delete-matching".into(),
            target: "*".into(),
            reason: "the pattern can match `a`, which no grant allows delete on".into(),
        });
        assert_eq!(
            Shown(&denied).to_string(),
            "denied: delete-matching `*`: the pattern can match `a`, which no grant allows delete on"
        );
        assert_eq!(Shown(&Error::Policy("bad tag".into())).to_string(), "bad tag");
    }
}
