//! The black-box test suite: one binary, so `tests/it/common` (the TLS fixtures, raw
//! MQTT client and subprocess harnesses) is compiled once. Each module is one area;
//! `cargo test --test it MODULE::` runs one of them.

mod architecture;
mod auth;
mod bench_smoke;
mod check_problems;
mod cli;
mod cli_operator;
mod cli_registry;
mod cluster;
mod cluster_registry;
mod common;
mod conformance;
mod crl_url;
mod durability;
mod flow_control;
mod hardening;
mod integrity;
mod interop;
mod keys;
mod lifecycle;
mod limits;
mod logging;
mod metrics;
mod mqtt_core;
mod mqtt_core_routing;
mod mqtt_core_sessions;
mod mqtt_v5;
mod mqtt_v5_subscriptions;
mod operator;
mod ops;
mod proxy_protocol;
mod quotas;
mod recheck;
mod refusal_detail;
mod store_integrity;
mod tls_log;
