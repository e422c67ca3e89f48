//! Generated bindings for `wit/provider.wit`. Private: the public API maps these to
//! hand-written types, so a WIT change never leaks into users' code.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "provider",
    imports: {
        "wasd:provider/dns": async | trappable,
        default: trappable,
    },
    exports: { default: async },
});

pub(crate) use self::exports::wasd::provider::resolver::{
    Configuration, Error as GuestError, Query, Resolution,
};
pub(crate) use self::wasd::provider::types::{Endpoint as GuestEndpoint, File};
