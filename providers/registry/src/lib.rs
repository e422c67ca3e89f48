//! What the registry providers (etcd, zookeeper) share: Kratos ServiceInstance values
//! and how they become endpoints, and the settings every registry takes (durations,
//! sizes, credentials). A plain library in the providers' workspace, compiled into each
//! component; pure functions, so tested (and fuzzed) natively.

mod instance;
mod settings;

pub use instance::{Instance, matches_name, parse_endpoint};
pub use settings::{credentials, parse_duration, parse_size};

use wasd_sdk::Endpoint;

/// Append the endpoints of one stored value to `endpoints`, if it is a Kratos instance
/// of `service`. A value that is not one, and an endpoint URL that does not parse, are
/// logged naming `place` (where the value is stored) and skipped: one broken value must
/// not hide the healthy instances.
pub fn push_endpoints(value: &[u8], service: &str, place: &str, endpoints: &mut Vec<Endpoint>) {
    let instance = match Instance::parse(value) {
        Ok(instance) => instance,
        Err(e) => {
            wasd_sdk::warn!("skipping {place}: {e}");
            return;
        }
    };
    // Under the service's path, but registered as another service: not this one's.
    if instance.name != service {
        return;
    }
    for endpoint in instance.endpoints() {
        match endpoint {
            Ok(endpoint) => endpoints.push(endpoint),
            Err(e) => wasd_sdk::warn!("skipping an endpoint of {place}: {e}"),
        }
    }
}
