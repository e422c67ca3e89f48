//! Generated bindings for `wit/provider.wit`. Private: the public API maps these to
//! hand-written types, so a WIT change never leaks into users' code.
//!
//! Generated for the `registry` world, the superset: every provider exports
//! `resolver`, and the host looks `registrar` up per component.

wasmtime::component::bindgen!({
    path: "wit",
    world: "registry",
    imports: {
        "wasd:provider/dns": async | trappable,
        default: trappable,
    },
    exports: { default: async },
});

pub(crate) use self::exports::wasd::provider::registrar::{
    Guest as RegistrarGuest, GuestIndices as RegistrarIndices, ServiceInstance as GuestInstance,
};
pub(crate) use self::exports::wasd::provider::resolver::{
    Configuration, Error as GuestError, Guest as ResolverGuest, GuestIndices as ResolverIndices, Query,
    Resolution,
};
pub(crate) use self::wasd::provider::types::{Endpoint as GuestEndpoint, File};
