//! MQTT protocol types kept apart from the broker logic, so that the wire format and the
//! topic rules can be read, tested and fuzzed without a running server.

pub mod codec;
pub mod topic;
