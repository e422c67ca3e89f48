//! A provider that would answer every service if it could be instantiated: its
//! function table starts past the host's table limit (see build.rs). Calls through
//! function pointers keep the table in use.

use wasd_sdk::{Configuration, Endpoint, Error, Provider, Query, Resolution};

struct BigTable {
    answer: fn(&str) -> Endpoint,
}

fn answer(service: &str) -> Endpoint {
    Endpoint::new(format!("{service}.big-table"), Some(80))
}

impl Provider for BigTable {
    fn configure(_config: Configuration) -> Result<Self, Error> {
        Ok(BigTable {
            answer: std::hint::black_box(answer as fn(&str) -> Endpoint),
        })
    }

    fn resolve(&self, query: Query) -> Result<Resolution, Error> {
        Ok(Resolution::new(vec![(self.answer)(&query.service)]))
    }
}

wasd_sdk::export!(BigTable);
