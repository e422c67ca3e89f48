//! The pass-through provider: the service name is itself the host to connect to.
//!
//! The host always runs it last (Microsoft.Extensions.ServiceDiscovery does the same),
//! so that a name no provider knows still resolves through ordinary DNS.

use wasd_sdk::{Configuration, Endpoint, Error, Provider, Query, Resolution};

struct PassThrough;

impl Provider for PassThrough {
    fn configure(config: Configuration) -> Result<Self, Error> {
        match config.settings.trim() {
            "" | "{}" => Ok(PassThrough),
            other => Err(Error::InvalidSettings(format!(
                "pass-through takes no settings, got {other}"
            ))),
        }
    }

    fn resolve(&self, query: Query) -> Result<Resolution, Error> {
        let mut endpoint = Endpoint::new(query.service, query.port);
        // The most preferred scheme is the one the caller would use first.
        endpoint.scheme = query.schemes.into_iter().next();
        Ok(Resolution::new(vec![endpoint]))
    }
}

wasd_sdk::export!(PassThrough);
