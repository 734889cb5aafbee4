//! End-to-end tests: the `cachepol` daemon against a real `redis-server`,
//! with real policy components on disk.

mod support;

mod acl;
mod admin;
mod cluster;
mod daemon;
mod deploy_hooks;
mod echo;
mod failures;
mod faults;
mod flags;
mod grants;
mod hostile_host;
mod hostile_ops;
mod index;
mod lanes;
mod ops;
mod policies;
mod production;
mod reload;
mod replicas;
mod replicas_default;
mod resync;
mod triggers;
