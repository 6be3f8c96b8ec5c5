//! The black-box test suite: one binary, so `tests/it/common` (the TLS fixtures, raw
//! MQTT client and subprocess harnesses) is compiled once. Each module is one area;
//! `cargo test --test it MODULE::` runs one of them.

mod auth;
mod bench_smoke;
mod cli;
mod cli_registry;
mod common;
mod conformance;
mod durability;
mod flow_control;
mod hardening;
mod integrity;
mod interop;
mod keys;
mod lifecycle;
mod limits;
mod logging;
mod mqtt_core;
mod mqtt_core_routing;
mod mqtt_core_sessions;
mod mqtt_v5;
mod mqtt_v5_subscriptions;
mod operator;
mod ops;
mod quotas;
mod store_integrity;
