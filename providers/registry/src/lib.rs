//! What the registry providers (etcd, zookeeper) share: Kratos ServiceInstance values
//! and how they become endpoints, and the settings every registry takes (durations,
//! sizes, credentials). A plain library in the providers' workspace, compiled into each
//! component; pure functions, so tested (and fuzzed) natively.

mod instance;
mod settings;

pub use instance::{Instance, matches_name, parse_endpoint};
pub use settings::{credentials, parse_duration, parse_size};
