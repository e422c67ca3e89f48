//! The host side of the WIT imports, one file per interface. Each is a trait impl on
//! [`ProviderState`], the data of one provider's store, and checks that provider's
//! grants itself: nothing a guest asks for is trusted.

mod dns;
pub(crate) mod http;
mod log;

use crate::bindings::wasd::provider::types;
use crate::provider::ProviderState;

impl types::Host for ProviderState {}
