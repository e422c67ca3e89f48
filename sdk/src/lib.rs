//! Write [wasd](https://github.com/wasd-rs/wasd) service-discovery providers in Rust.
//!
//! A provider is a WebAssembly component (`wasm32-wasip2`) that answers "where is this
//! service?" for the wasd host. Implement [`Provider`] and call [`export!`] once:
//!
//! ```
//! use wasd_sdk::{Configuration, Endpoint, Error, Provider, Query, Resolution};
//!
//! /// Answers every query for `basket` with one fixed endpoint.
//! struct Fixed {
//!     port: u16,
//! }
//!
//! impl Provider for Fixed {
//!     fn configure(config: Configuration) -> Result<Self, Error> {
//!         // `settings` is the provider's table from the host config, as JSON.
//!         let port = if config.settings.contains("8443") { 8443 } else { 8080 };
//!         Ok(Fixed { port })
//!     }
//!
//!     fn resolve(&self, query: Query) -> Result<Resolution, Error> {
//!         if query.service != "basket" {
//!             return Ok(Resolution::empty());
//!         }
//!         let endpoint = Endpoint::new("10.0.0.7", Some(self.port)).with_scheme("https");
//!         Ok(Resolution::new(vec![endpoint]))
//!     }
//! }
//!
//! wasd_sdk::export!(Fixed);
//! # fn main() {}
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (a `cdylib` crate) and
//! drop the `.wasm` file into the host's plugin folder.
//!
//! The provider runs in a sandbox: it sees no files, no environment variables and no
//! network unless the host config grants them. Files it is granted arrive in
//! [`Configuration::files`]; granted environment variables through [`std::env`]; DNS
//! through [`dns`]; HTTP through `wasi:http` (the [`http`] module is a small blocking
//! client over it).
//!
//! A provider backed by a registry can also register service instances: implement
//! [`Registrar`] as well and export with `wasd_sdk::export!(MyProvider, registrar)`.
#![deny(missing_docs)]

// The generated bindings name this crate by path, from inside it and from providers.
extern crate self as wasd_sdk;

use std::fmt;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "provider",
        pub_export_macro: true,
        export_macro_name: "__export_provider_world",
        default_bindings_module: "::wasd_sdk::bindings",
        runtime_path: "::wasd_sdk::__private::wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub mod registry_bindings {
    // Only the registrar export: a second `resolver` would clash with the one in
    // `bindings`. The component's world is the union of both (the `registry` world).
    wit_bindgen::generate!({
        inline: "package wasd:sdk; world registrar-exports { export wasd:provider/registrar@0.1.0; }",
        path: "wit",
        world: "wasd:sdk/registrar-exports",
        pub_export_macro: true,
        export_macro_name: "__export_registrar",
        default_bindings_module: "::wasd_sdk::registry_bindings",
        runtime_path: "::wasd_sdk::__private::wit_bindgen::rt",
        with: {
            "wasd:provider/types@0.1.0": crate::bindings::wasd::provider::types,
        },
    });
}

pub mod http;

pub use bindings::wasd::provider::types::{Configuration, Endpoint, Error, File, Query, Resolution};
pub use registry_bindings::exports::wasd::provider::registrar::ServiceInstance;

/// DNS lookups done by the host, for the names the host config grants this provider.
pub mod dns {
    pub use crate::bindings::wasd::provider::dns::{
        AddressAnswer, DnsError, SrvRecord, kubernetes_suffix, lookup_addresses, lookup_srv,
    };
}

/// Log through the host, tagged with the provider's name. Prefer the [`info!`] family
/// of macros.
pub mod log {
    pub use crate::bindings::wasd::provider::log::{Level, log};
}

/// A service-discovery provider.
///
/// The host creates one value per sandbox instance with [`Provider::configure`], then
/// calls [`Provider::resolve`] (and, for push providers, [`Provider::watch`]). An
/// instance handles one call at a time; the host runs more instances when it needs
/// concurrency, so keep `configure` cheap.
pub trait Provider: Sized + 'static {
    /// Build the provider from its settings and granted files. An error refuses the
    /// provider: the host keeps serving the last good one.
    fn configure(config: Configuration) -> Result<Self, Error>;

    /// Answer one query. Return [`Resolution::empty`] (or [`Error::NotFound`]) when
    /// this provider knows nothing of the service, so that the host asks the next one.
    fn resolve(&self, query: Query) -> Result<Resolution, Error>;

    /// Wait until the answer to `query` differs from the one tagged `version`, for at
    /// most `timeout_ms`; `Ok(None)` on timeout. Only push providers (those whose
    /// answers carry a [`Resolution::version`]) need this.
    fn watch(&self, query: Query, version: String, timeout_ms: u64) -> Result<Option<Resolution>, Error> {
        let _ = (query, version, timeout_ms);
        Err(Error::Unsupported(
            "this provider does not watch; the host polls it".into(),
        ))
    }
}

/// A provider that registers service instances in its registry (Kratos's Registrar).
///
/// The host drives the lease: it calls [`Registrar::register`], then
/// [`Registrar::keep_alive`] every third of the TTL, registers again when the lease is
/// lost, and [`Registrar::deregister`]s on shutdown. Keep no state between calls: the
/// lease id travels through the host.
pub trait Registrar: Provider {
    /// Write `instance` under a new lease of `ttl_ms`; return the lease's id.
    fn register(&self, instance: ServiceInstance, ttl_ms: u64) -> Result<String, Error>;

    /// Refresh a lease and check that `instance` is still registered under it;
    /// `Ok(false)` when not (the host then registers again).
    fn keep_alive(&self, instance: ServiceInstance, lease: String) -> Result<bool, Error>;

    /// Delete `instance` if it is still registered under `lease` (unconditionally
    /// without one), and revoke the lease.
    fn deregister(&self, instance: ServiceInstance, lease: Option<String>) -> Result<(), Error>;
}

/// Export a [`Provider`] implementation as the component's `wasd:provider/resolver`;
/// with `, registrar`, also its [`Registrar`] implementation as
/// `wasd:provider/registrar` (the `registry` world).
///
/// Use it exactly once, at the crate root of a `cdylib` crate.
#[macro_export]
macro_rules! export {
    ($provider:ty) => {
        $crate::__export_resolver!($provider, {});
    };
    ($provider:ty, registrar) => {
        $crate::__export_resolver!($provider, {
            impl $crate::registry_bindings::exports::wasd::provider::registrar::Guest for Exports {
                fn register(
                    instance: $crate::ServiceInstance,
                    ttl_ms: u64,
                ) -> ::std::result::Result<::std::string::String, Error> {
                    with_provider(|provider| $crate::Registrar::register(provider, instance, ttl_ms))
                }

                fn keep_alive(
                    instance: $crate::ServiceInstance,
                    lease: ::std::string::String,
                ) -> ::std::result::Result<bool, Error> {
                    with_provider(|provider| $crate::Registrar::keep_alive(provider, instance, lease))
                }

                fn deregister(
                    instance: $crate::ServiceInstance,
                    lease: ::std::option::Option<::std::string::String>,
                ) -> ::std::result::Result<(), Error> {
                    with_provider(|provider| $crate::Registrar::deregister(provider, instance, lease))
                }
            }

            // Adds the registrar export to the provider world's: the `registry` world.
            $crate::registry_bindings::__export_registrar!(Exports with_types_in $crate::registry_bindings);
        });
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_resolver {
    ($provider:ty, { $($extra:item)* }) => {
        const _: () = {
            use $crate::bindings::exports::wasd::provider::resolver::Guest;
            use $crate::{Configuration, Error, Provider, Query, Resolution};

            ::std::thread_local! {
                static PROVIDER: ::std::cell::RefCell<::std::option::Option<$provider>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }

            fn with_provider<R>(
                f: impl FnOnce(&$provider) -> ::std::result::Result<R, Error>,
            ) -> ::std::result::Result<R, Error> {
                PROVIDER.with(|slot| match slot.borrow().as_ref() {
                    ::std::option::Option::Some(provider) => f(provider),
                    ::std::option::Option::None => {
                        ::std::result::Result::Err(Error::Internal("called before configure".into()))
                    }
                })
            }

            struct Exports;

            impl Guest for Exports {
                fn configure(config: Configuration) -> ::std::result::Result<(), Error> {
                    let provider = <$provider as Provider>::configure(config)?;
                    PROVIDER.with(|slot| *slot.borrow_mut() = ::std::option::Option::Some(provider));
                    ::std::result::Result::Ok(())
                }

                fn resolve(query: Query) -> ::std::result::Result<Resolution, Error> {
                    with_provider(|provider| provider.resolve(query))
                }

                fn watch(
                    query: Query,
                    version: ::std::string::String,
                    timeout_ms: u64,
                ) -> ::std::result::Result<::std::option::Option<Resolution>, Error> {
                    with_provider(|provider| provider.watch(query, version, timeout_ms))
                }
            }

            $($extra)*

            $crate::bindings::__export_provider_world!(Exports with_types_in $crate::bindings);
        };
    };
}

/// Log a formatted message at `info` level through the host.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Info, &::std::format!($($arg)*)) };
}

/// Log a formatted message at `warn` level through the host.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Warn, &::std::format!($($arg)*)) };
}

/// Log a formatted message at `debug` level through the host.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Debug, &::std::format!($($arg)*)) };
}

#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;
}

impl Resolution {
    /// An answer with these endpoints, cached for the host's refresh period.
    pub fn new(endpoints: Vec<Endpoint>) -> Self {
        Resolution {
            endpoints,
            ttl_ms: None,
            version: None,
        }
    }

    /// "Nothing here": the host asks the next provider.
    pub fn empty() -> Self {
        Self::new(Vec::new())
    }

    /// Let the host cache this answer for `ttl_ms` milliseconds.
    pub fn with_ttl_ms(mut self, ttl_ms: u64) -> Self {
        self.ttl_ms = Some(ttl_ms);
        self
    }

    /// Tag the answer with a version, so that the host calls [`Provider::watch`].
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }
}

impl Endpoint {
    /// An endpoint with no scheme, path or metadata.
    pub fn new(host: impl Into<String>, port: Option<u16>) -> Self {
        Endpoint {
            scheme: None,
            host: host.into(),
            port,
            path: None,
            metadata: Vec::new(),
        }
    }

    /// Set the scheme (`https`, `grpc`, ...).
    pub fn with_scheme(mut self, scheme: impl Into<String>) -> Self {
        self.scheme = Some(scheme.into());
        self
    }

    /// Add one metadata pair.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// Parse a URI (`https://10.0.0.1:8443/api`) or a `host:port` / `host` value, as
    /// they appear in configuration files.
    pub fn parse(value: &str) -> Result<Endpoint, InvalidEndpoint> {
        let invalid = |reason: &'static str| InvalidEndpoint {
            value: value.to_owned(),
            reason,
        };
        let value = value.trim();
        let (scheme, rest) = match value.split_once("://") {
            Some((scheme, rest)) => {
                let valid = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
                if !valid {
                    return Err(invalid("the scheme is not valid"));
                }
                (Some(scheme.to_ascii_lowercase()), rest)
            }
            None => (None, value),
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(at) => (&rest[..at], Some(&rest[at..])),
            None => (rest, None),
        };
        if authority.contains('@') {
            return Err(invalid("user information is not allowed in an endpoint"));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| invalid("an IPv6 address is missing its ']'"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(invalid("the IPv6 address is not valid"));
            }
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| invalid("junk after ']'"))?),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(invalid("the host is empty"));
        }
        if !authority.starts_with('[')
            && !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(invalid("the host has characters a host name cannot have"));
        }
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .map_err(|_| invalid("the port is not a number from 0 to 65535"))?,
            ),
        };
        let path = path
            .map(|p| p.split(['?', '#']).next().unwrap_or_default())
            .filter(|p| !p.is_empty() && *p != "/")
            .map(str::to_owned);
        if scheme.is_none() && path.is_some() {
            return Err(invalid("a path needs a scheme (write a URI)"));
        }
        Ok(Endpoint {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
            path,
            metadata: Vec::new(),
        })
    }
}

/// A configuration value that is neither a URI nor `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidEndpoint {
    /// The value as written.
    pub value: String,
    /// Why it was refused.
    pub reason: &'static str,
}

impl fmt::Display for InvalidEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}' is not a URI or host:port ({})", self.value, self.reason)
    }
}

impl std::error::Error for InvalidEndpoint {}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &str) -> (Option<String>, String, Option<u16>, Option<String>) {
        let e = Endpoint::parse(v).unwrap();
        (e.scheme, e.host, e.port, e.path)
    }

    #[test]
    fn parses_uris_and_host_port() {
        assert_eq!(
            parse("https://10.46.24.90:443"),
            (Some("https".into()), "10.46.24.90".into(), Some(443), None)
        );
        assert_eq!(
            parse("HTTP://Catalog/api/v1?x=1"),
            (
                Some("http".into()),
                "catalog".into(),
                None,
                Some("/api/v1".into())
            )
        );
        assert_eq!(
            parse("localhost:8080"),
            (None, "localhost".into(), Some(8080), None)
        );
        assert_eq!(parse("basket"), (None, "basket".into(), None, None));
        assert_eq!(
            parse("grpc://[::1]:9000/"),
            (Some("grpc".into()), "::1".into(), Some(9000), None)
        );
        assert_eq!(parse("[fe80::1]"), (None, "fe80::1".into(), None, None));
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "https://",
            "https://host:99999",
            "host:port",
            "1http://x",
            "https://user@host",
            "[::1",
            "[nope]:80",
            "a b:80",
            "host/path",
            "x:y:80",
            "a b:c:80",
        ] {
            let err = Endpoint::parse(bad).expect_err(bad);
            assert!(err.to_string().contains("is not a URI or host:port"), "{err}");
        }
    }
}
