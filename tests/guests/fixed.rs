// Shared by the `fixed-a` and `fixed-b` fixtures, which differ only in ADDRESS: two
// versions of "the same" plugin, for hot-reload tests.

use wasd_sdk::{Configuration, Endpoint, Error, Provider, Query, Resolution};

struct Fixed;

impl Provider for Fixed {
    fn configure(config: Configuration) -> Result<Self, Error> {
        // A settings table saying `{"refuse": true}` is refused, as bad settings are.
        if config.settings.contains("\"refuse\":true") {
            return Err(Error::InvalidSettings("refused by request".into()));
        }
        Ok(Fixed)
    }

    fn resolve(&self, query: Query) -> Result<Resolution, Error> {
        if query.service != "fixed" {
            return Ok(Resolution::empty());
        }
        Ok(Resolution::new(vec![Endpoint::new(ADDRESS, Some(80)).with_scheme("http")]))
    }
}

wasd_sdk::export!(Fixed);
